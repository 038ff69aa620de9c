"""Dead-letter records (streams/dlq.py): the original bytes kept, or cut and named."""
from __future__ import annotations

import base64
import hashlib

import orjson

from streams.dlq import KEPT_BYTES, dlq_record


def test_a_small_record_is_kept_whole():
    rec = orjson.loads(dlq_record("clicks", 2, 7, "not JSON", b"k", b"\xffv", "sessionize"))
    assert rec["position"] == "clicks[2]@7" and rec["error"] == "not JSON"
    assert base64.b64decode(rec["key_b64"]) == b"k" and base64.b64decode(rec["value_b64"]) == b"\xffv"
    assert rec["value_bytes"] == 2 and rec["truncated"] is False
    assert rec["value_sha256"] == hashlib.sha256(b"\xffv").hexdigest()


def test_a_record_near_the_broker_limit_is_cut_so_its_dead_letter_fits():
    value = bytes(range(256)) * 4000   # 1,024,000 bytes: base64 alone would be 1.37 MB
    out = dlq_record("clicks", 0, 1, "not JSON", b"key" * 200_000, value, "features")
    assert len(out) < 800_000
    rec = orjson.loads(out)
    assert rec["truncated"] is True and rec["value_bytes"] == len(value)
    assert base64.b64decode(rec["value_b64"]) == value[:KEPT_BYTES]
    assert rec["value_sha256"] == hashlib.sha256(value).hexdigest()


def test_tombstones_and_missing_keys_are_null():
    rec = orjson.loads(dlq_record("t", 0, 0, "tombstone", None, None, "p"))
    assert rec["key_b64"] is None and rec["value_b64"] is None and rec["value_bytes"] is None
    assert rec["truncated"] is False
