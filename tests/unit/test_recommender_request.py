"""Recommendation query parsing (400 reasons) and the deterministic shadow sample."""
from __future__ import annotations

import pytest
from multidict import MultiDict

from services.recommender.request import BadRequest, Query, in_shadow, parse_query


@pytest.mark.parametrize("query,expected,why", [
    ({"user_id": "u1"}, Query("u1", "u1", None, 10, True), "defaults: k 10, seen excluded"),
    ({"anonymous_id": "a1", "k": "5"}, Query("a1", None, "a1", 5, True), "anonymous visitor"),
    ({"user_id": "u1", "anonymous_id": "a1"}, Query("u1", "u1", "a1", 10, True),
     "user id wins as the visitor, like schemas.clicks.visitor_key"),
    ({"user_id": "", "anonymous_id": "a1"}, Query("a1", None, "a1", 10, True), "empty counts as absent"),
    ({"user_id": "u1", "k": "100"}, Query("u1", "u1", None, 100, True), "the largest k"),
    ({"user_id": "u1", "k": "1"}, Query("u1", "u1", None, 1, True), "the smallest k"),
    ({"user_id": "u1", "exclude_seen": "false"}, Query("u1", "u1", None, 10, False), "keep seen"),
    ({"user_id": "u1", "exclude_seen": "0"}, Query("u1", "u1", None, 10, False), "0 is false"),
    ({"user_id": "u1", "exclude_seen": "YES"}, Query("u1", "u1", None, 10, True), "case-blind"),
    ({"user_id": "u1", "unknown": "x"}, Query("u1", "u1", None, 10, True), "other parameters ignored"),
])
def test_good_queries(query, expected, why):
    assert parse_query(query) == expected, why


@pytest.mark.parametrize("query,reason", [
    ({}, "give user_id or anonymous_id"),
    ({"k": "3"}, "give user_id or anonymous_id"),
    ({"user_id": "u", "k": "0"}, "k=0 must be between 1 and 100"),
    ({"user_id": "u", "k": "-1"}, "k='-1' is not a whole number"),
    ({"user_id": "u", "k": "101"}, "k=101 must be between 1 and 100"),
    ({"user_id": "u", "k": "0005000"}, "k=0005000 must be between 1 and 100"),
    ({"user_id": "u", "k": "2.5"}, "k='2.5' is not a whole number"),
    ({"user_id": "u", "k": " 5"}, "k=' 5' is not a whole number"),
    ({"user_id": "u", "k": "+7"}, "k='+7' is not a whole number"),
    ({"user_id": "u", "k": "1_0"}, "k='1_0' is not a whole number"),
    ({"user_id": "u", "k": "\u0663"}, "k='\u0663' is not a whole number"),
    ({"user_id": "\ufffd"}, "user_id is not valid UTF-8 once percent-decoded"),
    (MultiDict([("user_id", "a"), ("user_id", "b")]), "user_id is given 2 times: give it once"),
    (MultiDict([("user_id", "a"), ("k", "5"), ("k", "500")]), "k is given 2 times: give it once"),
    ({"user_id": "u", "exclude_seen": "perhaps"}, "exclude_seen='perhaps': use true or false"),
    ({"user_id": "x" * 201}, "user_id is 201 characters long, at most 200"),
    ({"anonymous_id": "a\nb"}, "anonymous_id holds non-printable characters"),
])
def test_bad_queries_say_why(query, reason):
    with pytest.raises(BadRequest) as err:
        parse_query(query)
    assert str(err.value) == reason


def test_shadow_sample_is_deterministic_and_sized_by_the_fraction():
    ids = [f"req-{i}" for i in range(20_000)]
    picked = [in_shadow(i, 0.1) for i in ids]
    assert picked == [in_shadow(i, 0.1) for i in ids], "same request id, same answer"
    assert 0.09 < sum(picked) / len(ids) < 0.11
    assert all(in_shadow(i, 0.2) for i, p in zip(ids, picked) if p), "a bigger fraction keeps the sample"
    assert not any(in_shadow(i, 0.0) for i in ids[:100]) and all(in_shadow(i, 1.0) for i in ids[:100])
