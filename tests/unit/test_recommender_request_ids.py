"""Request ids: a client's X-Request-Id when usable, else 32 hex digits unique per process."""
from __future__ import annotations

import re

from aiohttp.test_utils import make_mocked_request

from services.recommender.app import MAX_REQUEST_ID, _request_id


def test_generated_ids_are_32_hex_digits_and_unique():
    ids = [_request_id(make_mocked_request("GET", "/v1/recommendations")) for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_usable_client_id_is_kept_and_others_replaced():
    def rid(value: str) -> str:
        return _request_id(make_mocked_request("GET", "/", headers={"X-Request-Id": value}))

    assert rid("req-42") == "req-42"
    assert rid("x" * (MAX_REQUEST_ID + 1)) != "x" * (MAX_REQUEST_ID + 1)
    assert re.fullmatch(r"[0-9a-f]{32}", rid("bad\x00id"))
