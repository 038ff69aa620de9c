//! The session windows of one partition: per-visitor open sessions, the
//! partition's event-time watermark, dedupe, expiry and retention (forgetting
//! visitors idle for long). The rules are those documented in
//! streams/sessions.py, which wraps this for Python.

use crate::event::{murmur2, parse_envelope, Event, Scalar};
use crate::session::{Names, OpenSession};
use rustc_hash::{FxBuildHasher, FxHashSet};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::hash_map::RandomState;
use std::collections::BinaryHeap;
use std::hash::BuildHasher;
use std::sync::Arc;

type Visitors = hashbrown::HashMap<String, VisitorState, FxBuildHasher>;

pub const NOT_AN_OBJECT: &str = "event is not a JSON object";
pub const INCOMPLETE: &str =
    "event lacks an integer timestamp, a message_id, a type or a user_id/anonymous_id";
pub const AHEAD: &str =
    "timestamp is more than CLICKLOOP_MAX_CLOCK_AHEAD_S after its record's Kafka timestamp";
pub const LATE: &str =
    "older than the watermark allows: its session would already be closed (gap + grace passed)";
/// An open session remembers at least this many of its latest message ids for dedupe
/// (between this and twice this): a client's retry comes within seconds, and a session
/// of a bot sending for a day must not grow its changelog entry past the broker's
/// record limit (one entry of ~22,500 ids did, and the worker stopped on it).
pub const KEPT_IDS: usize = 1_000;

#[derive(Clone, Copy)]
pub struct Config {
    pub gap_ms: i64,
    pub grace_ms: i64,
    pub max_ms: i64,
    /// A visitor without open sessions is forgotten once the watermark is this far
    /// past the end of its last session; 0: never.
    pub retention_ms: i64,
}

/// A visitor's open sessions (disjoint, by start) and what closed before them.
#[derive(Serialize, Deserialize, Default, Debug)]
pub struct VisitorState {
    pub open: Vec<OpenSession>,
    pub closed_count: i64,
    pub last_session_id: Option<String>,
    /// End of the last closed session; None until one closed. A changelog written
    /// before retention existed lacks it: `load` takes the watermark then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_end: Option<i64>,
    /// Changed since the last `take_dirty` (then listed in `Partition::dirty`).
    #[serde(skip)]
    pub dirty: bool,
    /// Has an entry in `Partition::forget` (at most one per visitor).
    #[serde(skip)]
    pub forget_queued: bool,
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
    /// (forget at, visitor): one entry per visitor without open sessions that has
    /// closed one, at or before the time it is to be forgotten (last end +
    /// retention); an entry found early is pushed again at the visitor's time, one
    /// whose visitor has open sessions again is dropped (it is pushed anew when they
    /// close). At most one entry per visitor, so the heap stays within the map's size.
    forget: BinaryHeap<Reverse<(i64, String)>>,
    /// (visitor, message id) of the ids the open sessions remember, as keyed 64-bit
    /// hashes (SipHash, a key of this process: rebuilt from the sessions on load):
    /// dedupe is per visitor, so another visitor reusing an id loses nothing.
    seen: FxHashSet<u64>,
    keys: RandomState,
    /// Visitors whose state changed since the last `take_dirty`.
    dirty: Vec<String>,
}

impl Partition {
    pub fn new(config: Config, names: Names, watermark: i64, next_offset: i64) -> Self {
        Partition { config, names, visitors: Visitors::default(), watermark, next_offset,
                    expiry: BinaryHeap::new(), forget: BinaryHeap::new(), seen: FxHashSet::default(),
                    keys: RandomState::new(), dirty: Vec::new() }
    }

    fn slack(&self) -> i64 {
        self.config.gap_ms + self.config.grace_ms
    }

    /// When a visitor whose last session ended at `end` is to be forgotten.
    fn forget_at(&self, end: i64) -> i64 {
        end.saturating_add(self.config.retention_ms)
    }

    /// Put back a visitor's state read from the changelog (the watermark first).
    pub fn load(&mut self, visitor: String, mut state: VisitorState) {
        if let Some(first) = state.open.first() {
            self.expiry.push(Reverse((first.end + self.slack(), visitor.clone())));
        }
        for session in &state.open {
            let keys = &self.keys;
            self.seen.extend(session.message_ids.iter().map(|mid| keys.hash_one((visitor.as_str(), &**mid))));
        }
        if self.config.retention_ms > 0 && state.closed_count > 0 && state.last_end.is_none() {
            // Written before retention existed: count the idle time from now, so an
            // upgrade does not forget everyone at once; written back at the next
            // checkpoint, so later restarts do not push it further. (Retention 0 has
            // no use for it: no rewrite of the whole changelog then.)
            state.last_end = Some(self.watermark);
            state.dirty = true;
            self.dirty.push(visitor.clone());
        }
        if self.config.retention_ms > 0 && state.open.is_empty() {
            if let Some(end) = state.last_end {
                state.forget_queued = true;
                self.forget.push(Reverse((self.forget_at(end), visitor.clone())));
            }
        }
        self.visitors.insert(visitor, state);
    }

    /// How many visitors the partition holds state for.
    pub fn len(&self) -> usize {
        self.visitors.len()
    }

    /// Fold a record's events in, then close what the new watermark allows. An event
    /// stamped after `not_after` (its record's Kafka timestamp plus the clock bound) is
    /// bad: believed, it would move the watermark into the future and close every session.
    pub fn process(&mut self, record: &[u8], next_offset: Option<i64>, not_after: Option<i64>)
                   -> Result<Outputs, String> {
        let events = parse_envelope(record)?;
        let mut out = Outputs { events: events.len(), ..Default::default() };
        for (index, event) in events.iter().enumerate() {
            self.step(event, index, not_after, &mut out);
        }
        self.close_for(self.watermark, &mut out);
        if let Some(offset) = next_offset {
            self.next_offset = offset;
        }
        Ok(out)
    }

    fn step(&mut self, ev: &Event, index: usize, not_after: Option<i64>, out: &mut Outputs) {
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
        if not_after.is_some_and(|limit| ts > limit) {
            out.bad.push((index, AHEAD));
            return;
        }
        // Claim the id first; a late event gives it back.
        let key = self.keys.hash_one((visitor, mid));
        if !self.seen.insert(key) {
            out.duplicates += 1;
            return;
        }
        let mid: Arc<str> = Arc::from(mid);
        let Config { gap_ms: gap, grace_ms: grace, max_ms: max, retention_ms: retention } = self.config;
        let state = self.visitors.entry_ref(visitor).or_default();
        // A session the watermark has passed by gap + grace is closed by the rules even
        // if the pass that emits it (after each record) has not run yet: emit it now, so
        // that no event joins it and sessions do not depend on how events were packed
        // into records (a replay may pack them differently). Open sessions are disjoint
        // and sorted, so if any is due the first is.
        if state.open.first().is_some_and(|s| s.end + gap + grace <= self.watermark) {
            // (Their expiry entries stay in the heap: the pass queues the visitor for
            // forgetting when it pops them, as for any closed session.)
            close_due(visitor, state, self.watermark, gap + grace, &self.keys, &mut self.seen,
                      &mut self.dirty, out);
        }
        let sessions = &mut state.open;
        let fast = sessions.len() == 1 && {
            // the common case: the visitor's one open session takes the event
            let s = &sessions[0];
            s.start - gap < ts && ts < s.end + gap && s.end.max(ts) - s.start.min(ts) < max
        };
        if fast {
            sessions[0].add(ev, ts, &mid, kind, &self.names);
            forget_oldest_ids(visitor, &mut sessions[0], &self.keys, &mut self.seen);
        } else {
            let fits: Vec<usize> = (0..sessions.len())
                .filter(|&i| sessions[i].start - gap < ts && ts < sessions[i].end + gap)
                .collect();
            match place(sessions, &fits, ts, max) {
                None => {
                    if ts + gap + grace <= self.watermark {
                        let unknown = sessions.is_empty() && state.closed_count == 0;
                        self.seen.remove(&key);
                        if unknown {
                            self.visitors.remove(visitor);
                        }
                        out.late.push((index, LATE));
                        return;
                    }
                    if retention > 0 && sessions.is_empty() && state.last_end
                        .is_some_and(|end| end.saturating_add(retention) <= self.watermark) {
                        // Its due sessions are closed (above); the pass after the previous
                        // event would also have forgotten it, had that event ended a record:
                        // do the same, so forgetting does not depend on how events were packed.
                        state.closed_count = 0;
                        state.last_session_id = None;
                        state.last_end = None;
                    }
                    let session = OpenSession::of(ev, ts, &mid, kind, &self.names);
                    let expiry = session.end + gap + grace;
                    let at = state.open.partition_point(|s| s.start <= session.start);
                    state.open.insert(at, session);
                    self.expiry.push(Reverse((expiry, visitor.to_owned())));
                }
                Some((i, merged)) => {
                    sessions[i].add(ev, ts, &mid, kind, &self.names);
                    forget_oldest_ids(visitor, &mut sessions[i], &self.keys, &mut self.seen);
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

    /// Emit every session the watermark has passed by gap + grace, each once; then
    /// forget the visitors idle for the retention.
    pub fn close_for(&mut self, watermark: i64, out: &mut Outputs) {
        let slack = self.slack();
        let retention = self.config.retention_ms;
        while let Some(Reverse((expiry, _))) = self.expiry.peek() {
            if *expiry > watermark {
                break;
            }
            let Reverse((_, visitor)) = self.expiry.pop().expect("peeked");
            let Some(state) = self.visitors.get_mut(&visitor) else { continue };
            close_due(&visitor, state, watermark, slack, &self.keys, &mut self.seen, &mut self.dirty, out);
            if let Some(first) = state.open.first() {
                self.expiry.push(Reverse((first.end + slack, visitor)));
            } else if retention > 0 && !state.forget_queued {
                if let Some(end) = state.last_end {
                    state.forget_queued = true;
                    self.forget.push(Reverse((end.saturating_add(retention), visitor)));
                }
            }
        }
        if retention > 0 {
            self.forget_for(watermark);
        }
    }

    /// Remove the visitors without open sessions whose last one ended `retention`
    /// or more before the watermark; their changelog entries become tombstones.
    fn forget_for(&mut self, watermark: i64) {
        while let Some(Reverse((at, _))) = self.forget.peek() {
            if *at > watermark {
                break;
            }
            let Reverse((_, visitor)) = self.forget.pop().expect("peeked");
            let Some(state) = self.visitors.get_mut(&visitor) else { continue };
            if !state.open.is_empty() {
                state.forget_queued = false;   // pushed again when they close
                continue;
            }
            let Some(end) = state.last_end else {
                state.forget_queued = false;
                continue;
            };
            let due = end.saturating_add(self.config.retention_ms);
            if due > watermark {
                self.forget.push(Reverse((due, visitor)));   // its last end moved on
                continue;
            }
            let was_dirty = state.dirty;
            self.visitors.remove(&visitor);
            if !was_dirty {
                self.dirty.push(visitor);
            }
        }
    }

    /// The visitors changed since the last call, with their state (None: removed).
    pub fn take_dirty(&mut self) -> Vec<(String, Option<&VisitorState>)> {
        let mut dirty = std::mem::take(&mut self.dirty);
        // A visitor forgotten and back before this call is listed twice: once is enough.
        dirty.retain(|visitor| match self.visitors.get_mut(visitor) {
            Some(state) => std::mem::replace(&mut state.dirty, false),
            None => true,
        });
        dirty.into_iter().map(|v| {
            let state = self.visitors.get(&v);
            (v, state)
        }).collect()
    }
}

/// Close a visitor's sessions the watermark has passed by `slack`, in start order,
/// each with the visitor's next index and the previous session's id.
fn close_due(visitor: &str, state: &mut VisitorState, watermark: i64, slack: i64, keys: &RandomState,
             seen: &mut FxHashSet<u64>, dirty: &mut Vec<String>, out: &mut Outputs) {
    while state.open.first().is_some_and(|s| s.end + slack <= watermark) {
        let session = state.open.remove(0);
        for mid in &session.message_ids {
            seen.remove(&keys.hash_one((visitor, &**mid)));
        }
        state.closed_count += 1;
        let (id, record) = session.summary(visitor, state.closed_count, &state.last_session_id);
        state.last_session_id = Some(id);
        state.last_end = Some(state.last_end.map_or(session.end, |e| e.max(session.end)));
        out.closed.push((visitor.to_owned(), record, murmur2(visitor.as_bytes())));
        if !state.dirty {
            state.dirty = true;
            dirty.push(visitor.to_owned());
        }
    }
}

/// Past 2 × KEPT_IDS remembered ids, a session forgets its oldest KEPT_IDS (amortized:
/// one drain per KEPT_IDS events), in its state and in the partition's dedupe set.
fn forget_oldest_ids(visitor: &str, session: &mut OpenSession, keys: &RandomState, seen: &mut FxHashSet<u64>) {
    if session.message_ids.len() < 2 * KEPT_IDS {
        return;
    }
    let excess = session.message_ids.len() - KEPT_IDS;
    for mid in session.message_ids.drain(..excess) {
        seen.remove(&keys.hash_one((visitor, &*mid)));
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
