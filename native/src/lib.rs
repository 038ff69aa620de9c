//! `streams._native`: clickloop's compiled hot paths — the session-window core
//! of the sessionizer, Kafka's partitioner hash and the recommender's exact
//! top-k (`ScoreIndex`, score.rs) and ALS fold-in (`FoldSolver`, foldin.rs).
//!
//! The rules are documented (and tested) through their Python face,
//! streams/sessions.py. Here a record is parsed and folded in one pass without
//! building Python objects, which is what lets the sessionizer run near the
//! speed of a raw Kafka consumer (README, "Performance"). The GIL is released
//! while a record (~130 µs) is folded in and while changelog entries are
//! serialized, so Faust's consumer thread fetches meanwhile (measured on
//! bench/stream_throughput.py: 160-170k -> 190-240k events/s).

mod event;
mod foldin;
mod partition;
mod score;
mod session;

use partition::{Config, Partition as Core, VisitorState};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use session::Names;

#[pyclass(module = "streams._native")]
struct Partition {
    core: Core,
}

#[pymethods]
impl Partition {
    #[new]
    /// `retention_ms`: forget a visitor without open sessions once the watermark is
    /// this far past the end of its last one (0: never).
    #[pyo3(signature = (gap_ms, grace_ms, max_ms, search_events, item_events, watermark=-1, next_offset=0,
                        retention_ms=0))]
    #[allow(clippy::too_many_arguments)]
    fn new(gap_ms: i64, grace_ms: i64, max_ms: i64, search_events: Vec<String>,
           item_events: Vec<String>, watermark: i64, next_offset: i64, retention_ms: i64) -> PyResult<Self> {
        if retention_ms < 0 {
            return Err(PyValueError::new_err(format!("retention_ms must be >= 0, got {retention_ms}")));
        }
        let names = Names { search: search_events.into_iter().collect(), item: item_events.into_iter().collect() };
        let config = Config { gap_ms, grace_ms, max_ms, retention_ms };
        Ok(Partition { core: Core::new(config, names, watermark, next_offset) })
    }

    #[getter]
    fn watermark(&self) -> i64 {
        self.core.watermark
    }

    #[getter]
    fn next_offset(&self) -> i64 {
        self.core.next_offset
    }

    #[setter]
    fn set_next_offset(&mut self, offset: i64) {
        self.core.next_offset = offset;
    }

    /// Fold one `clicks` record in. Returns (events, closed, late, bad, duplicates):
    /// closed as [(visitor key, session JSON, murmur2(key))], late and bad as
    /// [(event JSON, reason)].
    /// ValueError with the reason when the record is not a ClickBatch. `not_after`: an
    /// event stamped later is bad (the record's Kafka timestamp plus the clock bound).
    #[pyo3(signature = (record, next_offset=None, not_after=None))]
    fn process<'py>(&mut self, py: Python<'py>, record: &[u8], next_offset: Option<i64>,
                    not_after: Option<i64>)
                    -> PyResult<(usize, Bound<'py, PyList>, Bound<'py, PyList>, Bound<'py, PyList>, usize)> {
        let core = &mut self.core;
        let out = py.allow_threads(|| core.process(record, next_offset, not_after))
            .map_err(PyValueError::new_err)?;
        let closed = PyList::empty_bound(py);
        for (visitor, json, hash) in &out.closed {
            closed.append((PyBytes::new_bound(py, visitor.as_bytes()), PyBytes::new_bound(py, json), *hash))?;
        }
        let (late, bad) = (PyList::empty_bound(py), PyList::empty_bound(py));
        if !(out.late.is_empty() && out.bad.is_empty()) {
            let raw = event::raw_events(record);
            for (list, events) in [(&late, &out.late), (&bad, &out.bad)] {
                for (index, reason) in events {
                    let text = raw.get(*index).map_or(b"null".as_slice(), |r| r.as_slice());
                    list.append((PyBytes::new_bound(py, text), *reason))?;
                }
            }
        }
        Ok((out.events, closed, late, bad, out.duplicates))
    }

    /// Put back one visitor's state (JSON, as `take_dirty` wrote it).
    fn load(&mut self, visitor: String, state: &[u8]) -> PyResult<()> {
        let state: VisitorState = serde_json::from_slice(state)
            .map_err(|e| PyValueError::new_err(format!("visitor {visitor}: bad state: {e}")))?;
        self.core.load(visitor, state);
        Ok(())
    }

    /// [(visitor, state JSON or None when removed)] changed since the last call.
    fn take_dirty<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        // Serializing is most of the cost: do it without the GIL, so that the
        // consumer thread fetches meanwhile.
        let core = &mut self.core;
        let entries: Vec<(String, Option<Vec<u8>>)> = py.allow_threads(|| {
            core.take_dirty().into_iter()
                .map(|(visitor, state)| (visitor, state.map(|s| serde_json::to_vec(s).expect("state serializes"))))
                .collect()
        });
        let out = PyList::empty_bound(py);
        for (visitor, value) in entries {
            out.append((PyBytes::new_bound(py, visitor.as_bytes()), value.map(|v| PyBytes::new_bound(py, &v))))?;
        }
        Ok(out)
    }

    fn visitors(&self) -> Vec<String> {
        self.core.visitors.keys().cloned().collect()
    }

    /// How many visitors the partition holds state for (without listing them).
    fn __len__(&self) -> usize {
        self.core.len()
    }
}

/// The deterministic session id: a hash of visitor, start and first message id.
#[pyfunction]
fn session_id(visitor: &str, start: i64, first_message_id: &str) -> String {
    session::session_id(visitor, start, first_message_id)
}

/// UTM parameters of an event's context (JSON) as [(key, value)].
#[pyfunction]
fn utm_of(context: &[u8]) -> PyResult<Vec<(String, String)>> {
    use serde::de::DeserializeSeed;
    let mut event = event::Event::default();
    let mut de = sonic_rs::Deserializer::from_slice(context);
    let fields = event::Into(event::ContextSink(&mut event)).deserialize(&mut de)
        .map_err(|e| PyValueError::new_err(format!("context: {e}")))?;
    event.context_len = fields.unwrap_or(0);
    Ok(session::utm_of(&event))
}

/// Kafka's default partitioner hash of a key: partition = (murmur2(key) & 0x7fffffff) % n.
#[pyfunction]
fn murmur2(key: &[u8]) -> u32 {
    event::murmur2(key)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(murmur2, m)?)?;
    m.add_class::<Partition>()?;
    m.add_function(wrap_pyfunction!(session_id, m)?)?;
    m.add_function(wrap_pyfunction!(utm_of, m)?)?;
    m.add_class::<score::ScoreIndex>()?;
    m.add_class::<foldin::FoldSolver>()?;
    Ok(())
}
