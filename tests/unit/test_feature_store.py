"""Online store rules: the overwrite rule, versions, encoding and staleness, as tables."""
from __future__ import annotations

import pytest

from streams.feature_store import (ENTITIES, ITEM, REFUSED_VERSION, SKIPPED_OLDER, USER, WRITE_SCRIPT,
                                   WRITTEN, EntitySpec, FeatureError, FeatureGroup, GroupWrite,
                                   apply_writes, decode_value, encode_value, may_overwrite, read,
                                   script_args)

MIN = 60_000
SPEC = EntitySpec("user", (FeatureGroup("a", ("x", "y"), max_age_ms=10 * MIN),
                           FeatureGroup("b", ("z",), max_age_ms=60 * MIN)), ttl_ms=1000)


@pytest.mark.parametrize("stored,ts,expected,why", [
    (None, 5, True, "nothing stored yet"),
    (5, 6, True, "newer wins"),
    (5, 5, True, "same event time overwrites: it can carry more events"),
    (5, 4, False, "older never overwrites newer"),
    (1_700_000_000_000, 1_699_999_999_999, False, "one ms older"),
])
def test_overwrite_rule(stored, ts, expected, why):
    assert may_overwrite(stored, ts) is expected, why


def a(ts: int, x=1, y=2.5) -> GroupWrite:
    return GroupWrite("a", ts, {"x": x, "y": y})


def b(ts: int, z="q") -> GroupWrite:
    return GroupWrite("b", ts, {"z": z})


V1_A100 = {"_v": "1", "_ts:a": "100", "a:x": "1", "a:y": "2.5"}


@pytest.mark.parametrize("stored,version,writes,after,codes,why", [
    ({}, 1, [a(100)], V1_A100, [WRITTEN], "empty hash: written with its version"),
    (V1_A100, 1, [a(99, x=7)], V1_A100, [SKIPPED_OLDER], "older write skipped, hash untouched"),
    (V1_A100, 1, [a(100, x=7)], {**V1_A100, "a:x": "7"}, [WRITTEN], "equal timestamp overwrites"),
    (V1_A100, 1, [a(50, x=7), b(60)], {**V1_A100, "_ts:b": "60", "b:z": '"q"'},
     [SKIPPED_OLDER, WRITTEN], "groups are judged each on its own timestamp"),
    (V1_A100, 1, [a(200, x=3), a(150, x=9)], {**V1_A100, "_ts:a": "200", "a:x": "3"},
     [WRITTEN, SKIPPED_OLDER], "writes apply in order: the second is now older"),
    (V1_A100, 2, [b(10)], {"_v": "2", "_ts:b": "10", "b:z": '"q"'}, [WRITTEN],
     "a newer version starts the hash over: no field of the old layout survives"),
    ({**V1_A100, "_v": "3"}, 2, [a(999)], {**V1_A100, "_v": "3"}, [REFUSED_VERSION],
     "an older version never writes into a newer layout"),
    ({"events": "4", "last_seen": "7"}, 1, [a(100)], V1_A100, [WRITTEN],
     "a hash without `_v` (pre-version layout) is replaced"),
    ({"_v": "x", "junk": "1"}, 1, [a(100)], V1_A100, [WRITTEN], "an unreadable `_v` too"),
    ({**V1_A100, "_ts:a": "garbage"}, 1, [a(1, x=0)], {**V1_A100, "_ts:a": "1", "a:x": "0"},
     [WRITTEN], "an unreadable group timestamp does not block writes"),
    (V1_A100, 1, [], V1_A100, [], "nothing to write"),
])
def test_apply_writes(stored, version, writes, after, codes, why):
    assert apply_writes(stored, SPEC, version, writes) == (after, codes), why


@pytest.mark.parametrize("write,why", [
    (GroupWrite("a", 1, {"x": 1}), "a group is written whole"),
    (GroupWrite("a", 1, {"x": 1, "y": 2, "w": 3}), "no undeclared features"),
    (GroupWrite("nope", 1, {"x": 1}), "no undeclared groups"),
    (GroupWrite("b", 1, {"z": float("nan")}), "no NaN"),
    (GroupWrite("b", 1, {"z": ["i", float("inf")]}), "no infinity, also inside lists"),
])
def test_bad_writes_are_refused(write, why):
    with pytest.raises(FeatureError):
        apply_writes({}, SPEC, 1, [write])


def test_script_args_layout():
    args = script_args(SPEC, 4, [a(100, x=1, y=0.5), b(90, z=["i1", "i2"])])
    assert args == [4, 1000, "_ts:a", 100, 2, "a:x", "1", "a:y", "0.5",
                    "_ts:b", 90, 1, "b:z", '["i1","i2"]']


def test_script_carries_the_same_rule():
    # The Lua is exercised against a real Redis by the integration tests; here we
    # only pin that it compares with `<` (equal overwrites), resets older or
    # unversioned hashes and refuses newer versions.
    assert "ts < current" in WRITE_SCRIPT
    assert "stored > version" in WRITE_SCRIPT and "stored == nil or stored < version" in WRITE_SCRIPT
    assert "PEXPIRE" in WRITE_SCRIPT


@pytest.mark.parametrize("value", [0, -3, 2**53, 0.25, "", "naïve ☃", True, False, None,
                                   ["i1", "i2"], [["i1", "view", 5]], []])
def test_values_round_trip(value):
    assert decode_value(encode_value(value)) == value
    assert decode_value(encode_value(value).encode()) == value


def test_ints_stay_ints_and_text_is_plain_json():
    assert encode_value(7) == "7" and type(decode_value(b"7")) is int
    assert encode_value(7.0) == "7.0" and type(decode_value(b"7.0")) is float
    with pytest.raises(FeatureError):
        decode_value(b"{not json")


NOW = 1_000 * MIN


def hash_of(version="1", **groups) -> dict[bytes, bytes]:
    """A hash as HGETALL returns it (bytes), from group -> (ts, values)."""
    out = {b"_v": version.encode()} if version is not None else {}
    for name, (ts, values) in groups.items():
        out[f"_ts:{name}".encode()] = str(ts).encode()
        out.update({f"{name}:{f}".encode(): encode_value(v).encode() for f, v in values.items()})
    return out


@pytest.mark.parametrize("raw,statuses,why", [
    ({}, {"a": "missing", "b": "missing"}, "no hash"),
    (hash_of(a=(NOW - 10 * MIN, {"x": 1, "y": 2})), {"a": "fresh", "b": "missing"},
     "exactly the max age is still fresh; absent group is missing"),
    (hash_of(a=(NOW - 10 * MIN - 1, {"x": 1, "y": 2})), {"a": "stale", "b": "missing"},
     "one ms past the max age is stale"),
    (hash_of(a=(NOW - 30 * MIN, {"x": 1, "y": 2}), b=(NOW - 30 * MIN, {"z": 3})),
     {"a": "stale", "b": "fresh"}, "max ages are per group"),
    (hash_of(a=(NOW + 5 * MIN, {"x": 1, "y": 2})), {"a": "fresh", "b": "missing"},
     "a timestamp ahead of now (clock skew) is fresh, age 0"),
    (hash_of(version="2", a=(NOW, {"x": 1, "y": 2})), {"a": "missing", "b": "missing"},
     "another feature-set version is not interpreted"),
    (hash_of(version=None, a=(NOW, {"x": 1, "y": 2})), {"a": "missing", "b": "missing"},
     "no version at all"),
    ({**hash_of(a=(NOW, {"x": 1, "y": 2})), b"a:y": b"{broken"}, {"a": "missing", "b": "missing"},
     "an unreadable value makes its group missing, never half-served"),
    ({k: v for k, v in hash_of(a=(NOW, {"x": 1, "y": 2})).items() if k != b"a:x"},
     {"a": "missing", "b": "missing"}, "a group with a field gone is missing"),
])
def test_staleness(raw, statuses, why):
    got = read(SPEC, 1, raw, NOW)
    assert {g: r.status for g, r in got.groups.items()} == statuses, why
    for name, r in got.groups.items():
        assert (r.status == "fresh") == (got.fresh(name) is not None), "only fresh is served"
        if r.status == "missing":
            assert r.values == {} and r.age_ms is None


def test_bytes_str_and_mixed_field_names_read_alike():
    raw = hash_of(a=(NOW - MIN, {"x": 1, "y": [2, "3"]}), b=(NOW - 40 * MIN, {"z": None}))
    as_str = {k.decode(): v.decode() for k, v in raw.items()}
    mixed = {(k.decode() if i % 2 else k): v for i, (k, v) in enumerate(raw.items())}
    reads = [read(SPEC, 1, h, NOW) for h in (raw, as_str, mixed)]
    assert reads[0].groups["a"].values == {"x": 1, "y": [2, "3"]}
    assert reads[0] == reads[1] == reads[2]


def test_stale_values_are_visible_but_not_served():
    got = read(SPEC, 1, hash_of(a=(NOW - 11 * MIN, {"x": 4, "y": 0.5})), NOW)
    assert got.groups["a"].values == {"x": 4, "y": 0.5} and got.groups["a"].age_ms == 11 * MIN
    assert got.fresh("a") is None and got.fresh("unknown") is None


def test_write_then_read_round_trip():
    stored, _ = apply_writes({}, SPEC, 1, [a(NOW - MIN, x=9, y=1.5), b(NOW, z=["i3"])])
    got = read(SPEC, 1, stored, NOW)
    assert got.version == 1
    assert got.fresh("a") == {"x": 9, "y": 1.5} and got.fresh("b") == {"z": ["i3"]}
    assert got.groups["a"].age_ms == MIN


def test_declared_feature_sets():
    assert set(ENTITIES) == {"user", "item", "popular"}
    assert USER.group("activity").ts_field == "_ts:activity"
    assert ITEM.group("engagement").field("ctr_24h") == "engagement:ctr_24h"
    with pytest.raises(FeatureError):
        USER.group("engagement")


@pytest.mark.parametrize("name,features", [("", ("x",)), ("a:b", ("x",)), ("_a", ("x",)),
                                           ("a", ()), ("a", ("x", "x"))])
def test_bad_group_declarations(name, features):
    with pytest.raises(ValueError):
        FeatureGroup(name, features, 1)
