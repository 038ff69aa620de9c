"""Dead-letter records: the original bytes, the reason, and where they came from.

The original key and value are kept base64-encoded (+33 %), each up to
`KEPT_BYTES`: a record near the broker's 1 MB limit would otherwise make a
dead-letter record over it, the transaction that carries it would fail, and the
worker would stop on that record at every restart. Past the limit the bytes are
cut, `truncated` says so, and `value_bytes` and `value_sha256` name the whole
original, which the position fetches from its topic."""
from __future__ import annotations

import base64
import hashlib

import orjson

KEPT_BYTES = 256 * 1024


def position(topic: str, partition: int, offset: int) -> str:
    return f"{topic}[{partition}]@{offset}"


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data[:KEPT_BYTES]).decode()


def dlq_record(topic: str, partition: int, offset: int, error: str,
               key: bytes | None, value: bytes | None, processor: str) -> bytes:
    """A `<topic>.dlq` record: the original bytes base64-encoded, untouched up to
    `KEPT_BYTES` each (then cut, `truncated: true`)."""
    return orjson.dumps({
        "v": 1,
        "position": position(topic, partition, offset),
        "topic": topic, "partition": partition, "offset": offset,
        "processor": processor,
        "error": error,
        "key_b64": _b64(key),
        "value_b64": _b64(value),
        "value_bytes": None if value is None else len(value),
        "value_sha256": None if value is None else hashlib.sha256(value).hexdigest(),
        "truncated": any(b is not None and len(b) > KEPT_BYTES for b in (key, value)),
    })
