"""The hot-key TTL cache: expiry by store time, bounded size (oldest stored goes), disabled at 0."""
from __future__ import annotations

import pytest

from services.recommender.cache import TTLCache


@pytest.mark.parametrize("stored_at,read_at,hit,why", [
    (0, 0, True, "just stored"),
    (0, 999, True, "inside the TTL"),
    (0, 1000, False, "at the TTL: expired (half-open [stored, stored + ttl))"),
    (0, 5000, False, "long gone"),
])
def test_expiry(stored_at, read_at, hit, why):
    cache: TTLCache[str, str] = TTLCache(1000, 10)
    cache.put("k", "v", stored_at)
    assert (cache.get("k", read_at) == "v") is hit, why


def test_reads_do_not_extend_an_entry():
    cache: TTLCache[str, int] = TTLCache(1000, 10)
    cache.put("k", 1, 0)
    assert cache.get("k", 900) == 1
    assert cache.get("k", 1000) is None, "a key read all the time is still re-fetched every TTL"


def test_size_bound_evicts_the_oldest_stored():
    cache: TTLCache[str, int] = TTLCache(10_000, 3)
    for i, key in enumerate("abc"):
        cache.put(key, i, i)
    cache.put("a", 10, 5)          # re-stored: now the newest
    cache.put("d", 3, 6)           # evicts b, the oldest stored
    assert len(cache) == 3
    assert cache.get("b", 7) is None
    assert [cache.get(k, 7) for k in "acd"] == [10, 2, 3]


def test_counts_hits_and_misses():
    cache: TTLCache[str, int] = TTLCache(100, 3)
    cache.get("x", 0)
    cache.put("x", 1, 0)
    cache.get("x", 50)
    cache.get("x", 150)
    assert (cache.hits, cache.misses) == (1, 2)


@pytest.mark.parametrize("ttl,size", [(0, 10), (1000, 0)])
def test_disabled_cache_stores_nothing(ttl, size):
    cache: TTLCache[str, int] = TTLCache(ttl, size)
    cache.put("k", 1, 0)
    assert cache.get("k", 0) is None and len(cache) == 0


def test_negative_settings_are_refused():
    with pytest.raises(ValueError):
        TTLCache(-1, 10)
