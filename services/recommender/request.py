"""A recommendation request's query string, parsed and checked: pure, no I/O.

`parse_query` turns `user_id=…|anonymous_id=…&k=…&exclude_seen=…` into a
`Query` or raises `BadRequest` with a reason the client can act on (the
handler answers 400 with it). The visitor is the user id when given, else the
anonymous id, as `schemas.clicks.visitor_key` keys everything else.

`in_shadow` decides whether a request is also scored by the shadow model: a
hash of its request id, so the same request id always gives the same answer
(a replayed request lands in the same sample) whatever process serves it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

MAX_K = 100
DEFAULT_K = 10
MAX_ID_CHARS = 200
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class BadRequest(ValueError):
    """A query the service cannot answer; str() is the reason sent back with the 400."""


@dataclass(frozen=True, slots=True)
class Query:
    """What a client asked for."""

    visitor: str
    user_id: str | None
    anonymous_id: str | None
    k: int
    exclude_seen: bool


def _id(query: Mapping[str, str], name: str) -> str | None:
    value = query.get(name)
    if value is None or value == "":
        return None
    if len(value) > MAX_ID_CHARS:
        raise BadRequest(f"{name} is {len(value)} characters long, at most {MAX_ID_CHARS}")
    if not value.isprintable():
        raise BadRequest(f"{name} holds non-printable characters")
    if "\ufffd" in value:   # what the query decoder makes of bytes that are not UTF-8
        raise BadRequest(f"{name} is not valid UTF-8 once percent-decoded")
    return value


_PARAMETERS = ("user_id", "anonymous_id", "k", "exclude_seen")


def parse_query(query: Mapping[str, str]) -> Query:
    """The request's parameters; BadRequest with the reason when one is missing or wrong
    (or given twice: `k=5&k=500` has no one meaning)."""
    getall = getattr(query, "getall", None)   # a multidict (aiohttp's query) keeps repeats
    if getall is not None:
        for name in _PARAMETERS:
            if len(getall(name, ())) > 1:
                raise BadRequest(f"{name} is given {len(getall(name))} times: give it once")
    user_id, anonymous_id = _id(query, "user_id"), _id(query, "anonymous_id")
    visitor = user_id or anonymous_id
    if visitor is None:
        raise BadRequest("give user_id or anonymous_id")
    raw_k = query.get("k")
    if raw_k is None or raw_k == "":
        k = DEFAULT_K
    else:
        # ASCII digits only: int() would also take " 5", "+7", "1_0" and other scripts' digits.
        if not (raw_k.isascii() and raw_k.isdigit()):
            raise BadRequest(f"k={raw_k[:20]!r} is not a whole number")
        k = int(raw_k) if len(raw_k) <= 4 else 0
        if not 1 <= k <= MAX_K:
            raise BadRequest(f"k={raw_k[:20]} must be between 1 and {MAX_K}")
    raw_seen = query.get("exclude_seen")
    if raw_seen is None or raw_seen == "":
        exclude_seen = True
    elif raw_seen.lower() in _TRUE:
        exclude_seen = True
    elif raw_seen.lower() in _FALSE:
        exclude_seen = False
    else:
        raise BadRequest(f"exclude_seen={raw_seen[:20]!r}: use true or false")
    return Query(visitor, user_id, anonymous_id, k, exclude_seen)


def in_shadow(request_id: str, fraction: float) -> bool:
    """Whether this request is in the shadow sample: deterministic per request id."""
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2.0 ** 64
