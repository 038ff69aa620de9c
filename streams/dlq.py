"""Dead-letter records: the original bytes, the reason, and where they came from."""
from __future__ import annotations

import base64

import orjson


def position(topic: str, partition: int, offset: int) -> str:
    return f"{topic}[{partition}]@{offset}"


def dlq_record(topic: str, partition: int, offset: int, error: str,
               key: bytes | None, value: bytes | None, processor: str) -> bytes:
    """A `<topic>.dlq` record; the original bytes are kept base64-encoded, untouched."""
    return orjson.dumps({
        "v": 1,
        "position": position(topic, partition, offset),
        "topic": topic, "partition": partition, "offset": offset,
        "processor": processor,
        "error": error,
        "key_b64": None if key is None else base64.b64encode(key).decode(),
        "value_b64": None if value is None else base64.b64encode(value).decode(),
    })
