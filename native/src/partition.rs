//! The session windows of one partition: per-visitor open sessions, the
//! partition's event-time watermark, dedupe and expiry. The rules are those
//! documented in streams/sessions.py, which wraps this for Python.

use crate::event::{murmur2, parse_envelope, Event, Scalar};
use crate::session::{Names, OpenSession};
use rustc_hash::{FxBuildHasher, FxHashSet};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

type Visitors = hashbrown::HashMap<String, VisitorState, FxBuildHasher>;

pub const NOT_AN_OBJECT: &str = "event is not a JSON object";
pub const INCOMPLETE: &str =
    "event lacks an integer timestamp, a message_id, a type or a user_id/anonymous_id";
pub const LATE: &str =
    "older than the watermark allows: its session would already be closed (gap + grace passed)";

#[derive(Clone, Copy)]
pub struct Config {
    pub gap_ms: i64,
    pub grace_ms: i64,
    pub max_ms: i64,
}

/// A visitor's open sessions (disjoint, by start) and what closed before them.
#[derive(Serialize, Deserialize, Default, Debug)]
pub struct VisitorState {
    pub open: Vec<OpenSession>,
    pub closed_count: i64,
    pub last_session_id: Option<String>,
    /// Changed since the last `take_dirty` (then listed in `Partition::dirty`).
    #[serde(skip)]
    pub dirty: bool,
}

/// What folding one record in produced; events are named by their index in the record.
#[derive(Default)]
pub struct Outputs {
    pub events: usize,
    pub closed: Vec<(String, Vec<u8>, u32)>,     // visitor, session record (JSON), murmur2(visitor)
    pub late: Vec<(usize, &'static str)>,
    pub bad: Vec<(usize, &'static str)>,
    pub duplicates: usize,
}

pub struct Partition {
    pub config: Config,
    pub names: Names,
    pub visitors: Visitors,
    pub watermark: i64,
    pub next_offset: i64,
    /// (expiry, visitor): at least one entry per visitor with open sessions, at or
    /// before the expiry of its first one; stale entries are skipped when popped.
    expiry: BinaryHeap<Reverse<(i64, String)>>,
    /// Message ids of every open session of the partition.
    seen: FxHashSet<Arc<str>>,
    /// Visitors whose state changed since the last `take_dirty`.
    dirty: Vec<String>,
}

impl Partition {
    pub fn new(config: Config, names: Names, watermark: i64, next_offset: i64) -> Self {
        Partition { config, names, visitors: Visitors::default(), watermark, next_offset,
                    expiry: BinaryHeap::new(), seen: FxHashSet::default(), dirty: Vec::new() }
    }

    fn slack(&self) -> i64 {
        self.config.gap_ms + self.config.grace_ms
    }

    /// Put back a visitor's state read from the changelog.
    pub fn load(&mut self, visitor: String, state: VisitorState) {
        if let Some(first) = state.open.first() {
            self.expiry.push(Reverse((first.end + self.slack(), visitor.clone())));
        }
        for session in &state.open {
            self.seen.extend(session.message_ids.iter().cloned());
        }
        self.visitors.insert(visitor, state);
    }

    /// Fold a record's events in, then close what the new watermark allows.
    pub fn process(&mut self, record: &[u8], next_offset: Option<i64>) -> Result<Outputs, String> {
        let events = parse_envelope(record)?;
        let mut out = Outputs { events: events.len(), ..Default::default() };
        for (index, event) in events.iter().enumerate() {
            self.step(event, index, &mut out);
        }
        self.close_for(self.watermark, &mut out);
        if let Some(offset) = next_offset {
            self.next_offset = offset;
        }
        Ok(out)
    }

    fn step(&mut self, ev: &Event, index: usize, out: &mut Outputs) {
        if !ev.is_object {
            out.bad.push((index, NOT_AN_OBJECT));
            return;
        }
        let visitor = if ev.user_id.truthy() { ev.user_id.as_str() } else { ev.anonymous_id.as_str() };
        let (ts, mid, visitor, kind) = match (&ev.timestamp, ev.message_id.nonempty(), visitor, ev.kind.as_str()) {
            (Scalar::Int(ts), Some(mid), Some(visitor), Some(kind)) => (*ts, mid, visitor, kind),
            _ => {
                out.bad.push((index, INCOMPLETE));
                return;
            }
        };
        // Claim the id first (one hash, one allocation shared with the session);
        // a late event gives it back.
        let mid: Arc<str> = Arc::from(mid);
        if !self.seen.insert(Arc::clone(&mid)) {
            out.duplicates += 1;
            return;
        }
        let Config { gap_ms: gap, grace_ms: grace, max_ms: max } = self.config;
        let state = self.visitors.entry_ref(visitor).or_default();
        let sessions = &mut state.open;
        let fast = sessions.len() == 1 && {
            // the common case: the visitor's one open session takes the event
            let s = &sessions[0];
            s.start - gap < ts && ts < s.end + gap && s.end.max(ts) - s.start.min(ts) < max
        };
        if fast {
            sessions[0].add(ev, ts, &mid, kind, &self.names);
        } else {
            let fits: Vec<usize> = (0..sessions.len())
                .filter(|&i| sessions[i].start - gap < ts && ts < sessions[i].end + gap)
                .collect();
            match place(sessions, &fits, ts, max) {
                None => {
                    if ts + gap + grace <= self.watermark {
                        let unknown = sessions.is_empty() && state.closed_count == 0;
                        self.seen.remove(&*mid);
                        if unknown {
                            self.visitors.remove(visitor);
                        }
                        out.late.push((index, LATE));
                        return;
                    }
                    let session = OpenSession::of(ev, ts, &mid, kind, &self.names);
                    let expiry = session.end + gap + grace;
                    let at = sessions.partition_point(|s| s.start <= session.start);
                    sessions.insert(at, session);
                    self.expiry.push(Reverse((expiry, visitor.to_owned())));
                }
                Some((i, merged)) => {
                    sessions[i].add(ev, ts, &mid, kind, &self.names);
                    if merged {
                        let expiry = sessions[i].end + gap + grace;
                        self.expiry.push(Reverse((expiry, visitor.to_owned())));
                    }
                }
            }
        }
        if !state.dirty {
            state.dirty = true;
            self.dirty.push(visitor.to_owned());
        }
        if ts > self.watermark {
            self.watermark = ts;
        }
    }

    /// Emit every session the watermark has passed by gap + grace, each once.
    pub fn close_for(&mut self, watermark: i64, out: &mut Outputs) {
        let slack = self.slack();
        while let Some(Reverse((expiry, _))) = self.expiry.peek() {
            if *expiry > watermark {
                break;
            }
            let Reverse((_, visitor)) = self.expiry.pop().expect("peeked");
            let Some(state) = self.visitors.get_mut(&visitor) else { continue };
            while state.open.first().is_some_and(|s| s.end + slack <= watermark) {
                let session = state.open.remove(0);
                for mid in &session.message_ids {
                    self.seen.remove(&**mid);
                }
                state.closed_count += 1;
                let (id, record) = session.summary(&visitor, state.closed_count, &state.last_session_id);
                state.last_session_id = Some(id);
                out.closed.push((visitor.clone(), record, murmur2(visitor.as_bytes())));
                if !state.dirty {
                    state.dirty = true;
                    self.dirty.push(visitor.clone());
                }
            }
            if let Some(first) = state.open.first() {
                self.expiry.push(Reverse((first.end + slack, visitor)));
            }
        }
    }

    /// The visitors changed since the last call, with their state (None: removed).
    pub fn take_dirty(&mut self) -> Vec<(String, Option<&VisitorState>)> {
        let dirty = std::mem::take(&mut self.dirty);
        for visitor in &dirty {
            if let Some(state) = self.visitors.get_mut(visitor) {
                state.dirty = false;
            }
        }
        dirty.into_iter().map(|v| {
            let state = self.visitors.get(&v);
            (v, state)
        }).collect()
    }
}

/// The open session an event at `ts` joins, merging the ones it bridges (then
/// `true`); None when it joins none.
fn place(sessions: &mut Vec<OpenSession>, fits: &[usize], ts: i64, max: i64) -> Option<(usize, bool)> {
    let mut fits = fits.to_vec();
    if fits.is_empty() {
        return None;
    }
    if fits.len() > 1 {
        let start = fits.iter().map(|&i| sessions[i].start).min().expect("fits").min(ts);
        let end = fits.iter().map(|&i| sessions[i].end).max().expect("fits").max(ts);
        if end - start < max {
            let mut chosen: Vec<OpenSession> = Vec::with_capacity(fits.len());
            for &i in fits.iter().rev() {
                chosen.push(sessions.remove(i));
            }
            chosen.reverse();
            let mut chosen = chosen.into_iter();
            let mut merged = chosen.next().expect("fits");
            for other in chosen {
                merged = merged.merge(other);
            }
            let at = sessions.partition_point(|s| s.start <= merged.start);
            sessions.insert(at, merged);
            return Some((at, true));
        }
        // Too long merged: join the session before the event if that fits.
        let before: Vec<usize> = fits.iter().copied().filter(|&i| sessions[i].start <= ts).collect();
        fits = match before.last() {
            Some(&i) => vec![i],
            None => vec![fits[0]],
        };
    }
    let s = &sessions[fits[0]];
    if s.end.max(ts) - s.start.min(ts) >= max {
        return None;
    }
    Some((fits[0], false))
}
