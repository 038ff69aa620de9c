//! Click events as the session rules read them, parsed in one pass straight from
//! a `clicks` record's JSON (schemas/clicks.py).
//!
//! Only the fields the rules use are kept, borrowed from the record where the
//! JSON has no escapes; everything else (user agent strings, traits, ...) is
//! skipped without building a value. Fields are *loose*: one of an unexpected
//! JSON type reads as a non-string scalar or as absent instead of failing, so
//! an odd field never sends a whole envelope to the DLQ; the rules then decide
//! per event (a bad `timestamp` makes that one event bad, a bad `referrer` is
//! ignored).

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::borrow::Cow;
use std::fmt;

/// A JSON value reduced to a scalar; objects and arrays are `Other`.
#[derive(Debug, Default)]
pub enum Scalar<'a> {
    #[default]
    Absent,
    Null,
    Str(Cow<'a, str>),
    Int(i64),
    Float(f64),
    Bool(bool),
    Other,
}

impl Scalar<'_> {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Scalar::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A non-empty string: what Python's `value or ...` keeps of a string field.
    pub fn nonempty(&self) -> Option<&str> {
        self.as_str().filter(|s| !s.is_empty())
    }

    /// Python truthiness of the JSON value.
    pub fn truthy(&self) -> bool {
        match self {
            Scalar::Str(s) => !s.is_empty(),
            Scalar::Int(i) => *i != 0,
            Scalar::Float(f) => *f != 0.0,
            Scalar::Bool(b) => *b,
            Scalar::Other => true,
            Scalar::Absent | Scalar::Null => false,
        }
    }

    /// Python's `str(value)` of a scalar; None for null, absent, objects and arrays.
    pub fn to_text(&self) -> Option<String> {
        match self {
            Scalar::Str(s) => Some(s.to_string()),
            Scalar::Int(i) => Some(i.to_string()),
            Scalar::Float(f) => Some(py_float(*f)),
            Scalar::Bool(b) => Some(if *b { "True" } else { "False" }.to_string()),
            _ => None,
        }
    }
}

/// Python's `repr(float)`: shortest round trip, `.0` on integral values,
/// exponent form below 1e-4 and from 1e16.
fn py_float(f: f64) -> String {
    let a = f.abs();
    if a != 0.0 && (a >= 1e16 || a < 1e-4) {
        let text = format!("{f:e}");
        let (mantissa, exp) = text.split_once('e').unwrap_or((&text, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        format!("{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    } else if f.fract() == 0.0 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Scalar::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(i64::try_from(v).map(Scalar::Int).unwrap_or(Scalar::Other))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Scalar::Float(v))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Bool(v))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

/// Where the fields of one JSON object go: flat fields of an `Event`.
pub trait Sink<'de> {
    fn field<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error>;
}

/// Deserializes any JSON value: an object's fields go to the sink and the value
/// is how many it had (Python truthiness of a dict); anything else is skipped
/// and reads as `None`. Nested objects are written in place, never moved.
pub struct Into<S>(pub S);

impl<'de, S: Sink<'de>> DeserializeSeed<'de> for Into<S> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, S: Sink<'de>> Visitor<'de> for Into<S> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut len = 0;
        while let Some(key) = map.next_key::<Scalar<'de>>()? {
            len += 1;
            self.0.field(key.as_str().unwrap_or(""), &mut map)?;
        }
        Ok(Some(len))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_borrowed_str<E>(self, _: &'de str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// One click event, flat: the `context.page`, `context.ua`, `context.campaign`
/// and `properties` fields the rules read sit next to the top-level ones, with
/// the field count of each object (0: absent, empty or not an object).
#[derive(Debug, Default)]
pub struct Event<'a> {
    pub is_object: bool,
    pub message_id: Scalar<'a>,
    pub kind: Scalar<'a>,
    pub event: Scalar<'a>,
    pub user_id: Scalar<'a>,
    pub anonymous_id: Scalar<'a>,
    pub timestamp: Scalar<'a>,
    pub context_len: usize,
    pub page_len: usize,
    pub path: Scalar<'a>,
    pub url: Scalar<'a>,
    pub referrer: Scalar<'a>,
    pub search: Scalar<'a>,
    pub ua_len: usize,
    pub device: Scalar<'a>,
    pub campaign_len: usize,
    pub source: Scalar<'a>,
    pub medium: Scalar<'a>,
    pub name: Scalar<'a>,
    pub campaign: Scalar<'a>,
    pub term: Scalar<'a>,
    pub content: Scalar<'a>,
    pub props_len: usize,
    pub item_id: Scalar<'a>,
    pub product_id: Scalar<'a>,
}

/// A sink writing the listed keys of one object into fields of an `Event`.
macro_rules! sink {
    ($name:ident { $($key:literal => $field:ident),* $(,)? } $(nested { $($nkey:literal => $nlen:ident / $nsink:ident),* })?) => {
        pub struct $name<'e, 'a>(pub &'e mut Event<'a>);

        impl<'de> Sink<'de> for $name<'_, 'de> {
            fn field<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
                match key {
                    $($key => self.0.$field = map.next_value()?,)*
                    $($($nkey => {
                        self.0.$nlen = map.next_value_seed(Into($nsink(&mut *self.0)))?.unwrap_or(0);
                    })*)?
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(())
            }
        }
    };
}

sink!(EventSink { "message_id" => message_id, "type" => kind, "event" => event, "user_id" => user_id,
                  "anonymous_id" => anonymous_id, "timestamp" => timestamp }
      nested { "context" => context_len / ContextSink, "properties" => props_len / PropsSink });
sink!(ContextSink {} nested { "page" => page_len / PageSink, "ua" => ua_len / UaSink,
                              "campaign" => campaign_len / CampaignSink });
sink!(PageSink { "path" => path, "url" => url, "referrer" => referrer, "search" => search });
sink!(UaSink { "device" => device });
sink!(CampaignSink { "source" => source, "medium" => medium, "name" => name, "campaign" => campaign,
                     "term" => term, "content" => content });
sink!(PropsSink { "item_id" => item_id, "product_id" => product_id });

pub const NOT_A_BATCH: &str = "not a ClickBatch: expected an object with an \"events\" array";

/// The events of a `clicks` record, or the reason it is not a ClickBatch.
///
/// The whole record is parsed before any event is applied, so a record cut
/// short applies nothing. The vector is sized from the record's length up
/// front: events are a few hundred bytes each, and growing a vector of them
/// by doubling showed up as 10% of the core's time in `perf`.
pub fn parse_envelope(record: &[u8]) -> Result<Vec<Event<'_>>, String> {
    let mut de = sonic_rs::Deserializer::from_slice(record);
    let capacity = (record.len() / 200).clamp(1, 4096);
    let parsed = EnvelopeSeed { capacity }.deserialize(&mut de).and_then(|events| de.end().map(|_| events));
    match parsed {
        Ok(events) => Ok(events),
        Err(e) if e.is_syntax() || e.is_eof() => Err(format!("not JSON: {e}")),
        Err(_) => Err(NOT_A_BATCH.to_string()),
    }
}

struct EnvelopeSeed {
    capacity: usize,
}

impl<'de> DeserializeSeed<'de> for EnvelopeSeed {
    type Value = Vec<Event<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EnvelopeSeed {
    type Value = Vec<Event<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a ClickBatch object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut events = None;
        while let Some(key) = map.next_key::<Scalar<'de>>()? {
            if key.as_str() == Some("events") {
                events = Some(map.next_value_seed(EventsSeed { capacity: self.capacity })?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        events.ok_or_else(|| de::Error::custom(NOT_A_BATCH))
    }
}

struct EventsSeed {
    capacity: usize,
}

impl<'de> DeserializeSeed<'de> for EventsSeed {
    type Value = Vec<Event<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for EventsSeed {
    type Value = Vec<Event<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of events")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut events: Vec<Event<'de>> = Vec::with_capacity(self.capacity);
        loop {
            events.push(Event::default());
            let slot = events.last_mut().expect("pushed");
            match seq.next_element_seed(Into(EventSink(slot)))? {
                Some(fields) => slot.is_object = fields.is_some(),
                None => {
                    events.pop();
                    return Ok(events);
                }
            }
        }
    }
}

/// The raw JSON text of every event of a record (only for the rare late or bad one), as
/// the parse took them: sonic-rs, the last `events` key when there are several. A record
/// with invalid UTF-8 (which the parse accepts inside strings) is read with U+FFFD in
/// its place, so the event still reaches the DLQ, nearly byte for byte, never as `null`.
pub fn raw_events(record: &[u8]) -> Vec<Vec<u8>> {
    let text = String::from_utf8_lossy(record);
    let mut events = None;
    for pair in sonic_rs::to_object_iter(text.as_ref()) {
        match pair {
            Ok((key, value)) if &*key == "events" => events = Some(value.as_raw_str().to_owned()),
            Ok(_) => {}
            Err(_) => return Vec::new(),
        }
    }
    let Some(events) = events else { return Vec::new() };
    sonic_rs::to_array_iter(events.as_str())
        .map_while(Result::ok)
        .map(|event| event.as_raw_str().as_bytes().to_vec())
        .collect()
}

/// Kafka's default partitioner hash (murmur2, as the Java client computes it):
/// a record keyed by `key` goes to partition `(murmur2(key) & 0x7fffffff) % n`.
pub fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (i, b) in tail.iter().enumerate().rev() {
            h ^= (*b as u32) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}
