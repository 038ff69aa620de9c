//! One open session: mergeable sufficient statistics, its summary record, and
//! the rules that read an event's page, campaign and item (UTM parameters,
//! landing and exit page, device).

use crate::event::{Event, Scalar};
use std::sync::Arc;
use blake2::digest::{Update, VariableOutput};
use blake2::Blake2bVar;
use rustc_hash::FxHashSet;
use serde::{Deserialize, Serialize};

/// Event names that count as searches and as item views (Segment e-commerce spec).
pub struct Names {
    pub search: FxHashSet<String>,
    pub item: FxHashSet<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct OpenSession {
    pub start: i64,
    pub end: i64,
    pub first_message_id: String,
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub event_count: i64,
    #[serde(with = "pairs")]
    pub counts: Vec<(String, i64)>,
    pub page_views: i64,
    pub searches: i64,
    pub landing_page: Option<String>,
    pub landing_ts: i64,
    pub referrer: Option<String>,
    #[serde(with = "pairs")]
    pub utm: Vec<(String, String)>,
    pub device: Option<String>,
    pub device_ts: i64,
    pub exit_page: Option<String>,
    pub exit_ts: i64,
    /// item -> first time seen
    #[serde(with = "pairs")]
    pub items: Vec<(String, i64)>,
    /// The session's message ids, for dedupe (shared with the partition's set).
    pub message_ids: Vec<Arc<str>>,
}

/// The closed-session record of `schemas/sessions.py`.
#[derive(Serialize)]
struct Summary<'a> {
    v: i64,
    session_id: &'a str,
    visitor: &'a str,
    user_id: &'a Option<String>,
    anonymous_id: &'a Option<String>,
    start: i64,
    end: i64,
    duration_ms: i64,
    event_count: i64,
    counts: AsMap<'a, String, i64>,
    page_views: i64,
    searches: i64,
    landing_page: &'a Option<String>,
    exit_page: &'a Option<String>,
    referrer: &'a Option<String>,
    utm: AsMap<'a, String, String>,
    device: &'a str,
    items: Vec<&'a str>,
    session_index: i64,
    previous_session_id: &'a Option<String>,
}

pub const SCHEMA_VERSION: i64 = 1;
/// A session lists at most this many distinct items (the first seen) and counts at
/// most this many distinct event names (the rest under OTHER_NAMES): a crawler's
/// session must not grow its state and record without bound, nor each event's scan.
pub const MAX_ITEMS: usize = 1_000;
pub const MAX_NAMES: usize = 100;
pub const OTHER_NAMES: &str = "(other)";
const UTM_KEYS: [&str; 5] = ["source", "medium", "campaign", "term", "content"];

impl OpenSession {
    pub fn of(event: &Event, ts: i64, mid: &Arc<str>, kind: &str, names: &Names) -> Self {
        let mut session = OpenSession { start: ts, end: ts, first_message_id: mid.to_string(),
                                        ..Default::default() };
        session.add(event, ts, mid, kind, names);
        session
    }

    /// Fold one event in, whatever order events arrive in: landing is the page of
    /// the earliest event, exit the page of the latest, device the earliest's.
    pub fn add(&mut self, event: &Event, ts: i64, mid: &Arc<str>, kind: &str, names: &Names) {
        self.message_ids.push(Arc::clone(mid));
        if ts < self.start {
            self.start = ts;
            self.first_message_id = mid.to_string();
        } else if ts == self.start && **mid < *self.first_message_id {
            self.first_message_id = mid.to_string();
        }
        if ts > self.end {
            self.end = ts;
        }
        if self.user_id.is_none() {
            self.user_id = event.user_id.as_str().map(str::to_owned);
        }
        if self.anonymous_id.is_none() {
            self.anonymous_id = event.anonymous_id.as_str().map(str::to_owned);
        }
        self.event_count += 1;
        let name = if kind == "track" {
            let name = event.event.nonempty().unwrap_or(kind);
            if names.search.contains(name) {
                self.searches += 1;
            } else if names.item.contains(name) {
                let item = if event.item_id.truthy() { &event.item_id } else { &event.product_id };
                if let Some(item) = item.to_text() {
                    note_item(&mut self.items, item, ts);
                }
            }
            name
        } else {
            if kind == "page" {
                self.page_views += 1;
            }
            kind
        };
        count_name(&mut self.counts, name, 1);
        if event.context_len == 0 {
            return;
        }
        if event.ua_len > 0 && (self.device.is_none() || ts < self.device_ts) {
            self.device = event.device.as_str().map(str::to_owned);
            self.device_ts = ts;
        }
        if event.page_len == 0 {
            return;
        }
        let Some(path) = event.path.nonempty().or_else(|| event.url.nonempty()) else { return };
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        if self.landing_page.is_none() || ts < self.landing_ts {
            self.landing_page = Some(path.to_owned());
            self.landing_ts = ts;
            self.referrer = event.referrer.nonempty().map(str::to_owned);
            self.utm = utm_of(event);
        }
        if self.exit_page.is_none() || ts >= self.exit_ts {
            self.exit_page = Some(path.to_owned());
            self.exit_ts = ts;
        }
    }

    /// The session holding both: what a bridging late event joins.
    pub fn merge(self, other: OpenSession) -> OpenSession {
        let (first, last) = if self.start <= other.start { (&self, &other) } else { (&other, &self) };
        let mut merged = OpenSession {
            start: first.start,
            end: self.end.max(other.end),
            first_message_id: if first.start < last.start {
                first.first_message_id.clone()
            } else {
                first.first_message_id.clone().min(last.first_message_id.clone())
            },
            user_id: or_else(&first.user_id, &last.user_id),
            anonymous_id: or_else(&first.anonymous_id, &last.anonymous_id),
            event_count: self.event_count + other.event_count,
            counts: first.counts.clone(),
            page_views: self.page_views + other.page_views,
            searches: self.searches + other.searches,
            items: first.items.clone(),
            message_ids: [self.message_ids.as_slice(), other.message_ids.as_slice()].concat(),
            ..Default::default()
        };
        for (name, n) in &last.counts {
            count_name(&mut merged.counts, name, *n);
        }
        for (item, ts) in &last.items {
            note_item(&mut merged.items, item.clone(), *ts);
        }
        for src in [first, last] {
            if src.landing_page.is_some() && (merged.landing_page.is_none() || src.landing_ts < merged.landing_ts) {
                merged.landing_page = src.landing_page.clone();
                merged.landing_ts = src.landing_ts;
                merged.referrer = src.referrer.clone();
                merged.utm = src.utm.clone();
            }
            if src.device.is_some() && (merged.device.is_none() || src.device_ts < merged.device_ts) {
                merged.device = src.device.clone();
                merged.device_ts = src.device_ts;
            }
            if src.exit_page.is_some() && (merged.exit_page.is_none() || src.exit_ts >= merged.exit_ts) {
                merged.exit_page = src.exit_page.clone();
                merged.exit_ts = src.exit_ts;
            }
        }
        merged
    }

    /// The closed-session record (JSON) and its id.
    pub fn summary(&self, visitor: &str, index: i64, previous: &Option<String>) -> (String, Vec<u8>) {
        let id = session_id(visitor, self.start, &self.first_message_id);
        let mut items: Vec<&(String, i64)> = self.items.iter().collect();
        items.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        let record = Summary {
            v: SCHEMA_VERSION, session_id: &id, visitor, user_id: &self.user_id,
            anonymous_id: &self.anonymous_id, start: self.start, end: self.end,
            duration_ms: self.end - self.start, event_count: self.event_count, counts: AsMap(&self.counts),
            page_views: self.page_views, searches: self.searches, landing_page: &self.landing_page,
            exit_page: &self.exit_page, referrer: &self.referrer, utm: AsMap(&self.utm),
            device: self.device.as_deref().filter(|d| !d.is_empty()).unwrap_or("other"),
            items: items.into_iter().map(|(k, _)| k.as_str()).collect(),
            session_index: index, previous_session_id: previous,
        };
        let json = serde_json::to_vec(&record).expect("a session serializes");
        (id, json)
    }
}

/// An item seen at `ts` (its first time kept); past MAX_ITEMS items, new ones are not listed.
fn note_item(items: &mut Vec<(String, i64)>, item: String, ts: i64) {
    if let Some((_, seen)) = items.iter_mut().find(|(k, _)| *k == item) {
        *seen = (*seen).min(ts);
    } else if items.len() < MAX_ITEMS {
        items.push((item, ts));
    }
}

/// Count `n` events named `name`; past MAX_NAMES names, under OTHER_NAMES.
fn count_name(counts: &mut Vec<(String, i64)>, name: &str, n: i64) {
    if let Some((_, m)) = counts.iter_mut().find(|(k, _)| k == name) {
        *m += n;
    } else if counts.len() < MAX_NAMES {
        counts.push((name.to_owned(), n));
    } else if let Some((_, m)) = counts.iter_mut().find(|(k, _)| k == OTHER_NAMES) {
        *m += n;
    } else {
        counts.push((OTHER_NAMES.to_owned(), n));
    }
}

/// Python's `a or b` for optional strings.
fn or_else(a: &Option<String>, b: &Option<String>) -> Option<String> {
    match a {
        Some(s) if !s.is_empty() => a.clone(),
        _ => b.clone(),
    }
}

/// Deterministic: a replay of the same events yields the same id.
pub fn session_id(visitor: &str, start: i64, first_message_id: &str) -> String {
    let mut hasher = Blake2bVar::new(12).expect("12 is a valid blake2b size");
    hasher.update(format!("{visitor}|{start}|{first_message_id}").as_bytes());
    let mut digest = [0u8; 12];
    hasher.finalize_variable(&mut digest).expect("digest size");
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// UTM parameters: Segment's `context.campaign` when it is a non-empty object,
/// else the `utm_*` query parameters of the page (`search`, else the URL's query).
pub fn utm_of(c: &Event) -> Vec<(String, String)> {
    if c.campaign_len > 0 {
        let name = if c.name.truthy() { &c.name } else { &c.campaign };
        let values: [&Scalar; 5] = [&c.source, &c.medium, name, &c.term, &c.content];
        return UTM_KEYS.iter().zip(values)
            .filter(|(_, v)| v.truthy())
            .filter_map(|(k, v)| v.to_text().map(|t| (k.to_string(), t)))
            .collect();
    }
    let query = match c.search.nonempty() {
        Some(search) => search,
        None => {
            let url = c.url.nonempty().or_else(|| c.path.nonempty()).unwrap_or("");
            let url = url.split_once('#').map_or(url, |(u, _)| u);
            url.split_once('?').map_or("", |(_, q)| q)
        }
    };
    if !query.contains("utm_") {
        return vec![];
    }
    let pairs = parse_query(query.trim_start_matches('?'));
    UTM_KEYS.iter()
        .filter_map(|k| {
            let wanted = format!("utm_{k}");
            // last value wins, as in dict(parse_qsl(...)); empty values are skipped
            pairs.iter().rev().find(|(n, _)| *n == wanted).map(|(_, v)| (k.to_string(), v.clone()))
        })
        .collect()
}

/// `urllib.parse.parse_qsl`: `&`-separated `name=value`, `+` as space,
/// percent-decoding (invalid UTF-8 replaced); pairs without `=` or with an
/// empty value are skipped.
fn parse_query(query: &str) -> Vec<(String, String)> {
    query.split('&')
        .filter_map(|piece| piece.split_once('='))
        .filter(|(_, v)| !v.is_empty())
        .map(|(n, v)| (unquote_plus(n), unquote_plus(v)))
        .collect()
}

fn unquote_plus(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' && i + 2 < bytes.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(if b == b'+' { b' ' } else { b });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Pairs written as a JSON object (small maps: a vector beats hashing).
pub struct AsMap<'a, K, V>(pub &'a [(K, V)]);

impl<K: Serialize, V: Serialize> Serialize for AsMap<'_, K, V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// `Vec<(K, V)>` fields stored as JSON objects.
mod pairs {
    use super::AsMap;
    use serde::de::{Deserialize, Deserializer};
    use serde::{Serialize, Serializer};
    use std::collections::BTreeMap;

    #[allow(clippy::ptr_arg)]
    pub fn serialize<S: Serializer, K: Serialize, V: Serialize>(
        pairs: &Vec<(K, V)>, s: S,
    ) -> Result<S::Ok, S::Error> {
        AsMap(pairs.as_slice()).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, K, V>(d: D) -> Result<Vec<(K, V)>, D::Error>
    where K: Deserialize<'de> + Ord, V: Deserialize<'de> {
        Ok(BTreeMap::<K, V>::deserialize(d)?.into_iter().collect())
    }
}
