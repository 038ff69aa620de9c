"""`service.known`: the answers that need no scoring (precomputed, memoized), and only those."""
from __future__ import annotations

from types import SimpleNamespace

from services.recommender.profile import Profile, TopK
from services.recommender.ranking import Ranking
from services.recommender.request import Query
from services.recommender.service import known, score

# `known` reads only the model's identity; a stand-in keeps this test free of a catalogue.
MODEL = SimpleNamespace(name="als", version="v2", content_sha256="abc")


def query(k: int = 2, exclude_seen: bool = True) -> Query:
    return Query("u1", "u1", None, k, exclude_seen)


def profile(topk: TopK | None = None, seen=("i1",)) -> Profile:
    return Profile(tuple((i, "view", 1) for i in seen), frozenset(seen),
                   {"activity": "fresh", "recent": "fresh"}, topk)


def test_precomputed_by_the_served_version_with_k_unseen_items():
    topk = TopK("als", "v2", [("i1", 0.9), ("i2", 0.8), ("i3", 0.7)], 0)
    ranking, source = known(MODEL, query(), profile(topk))
    assert (ranking.items, ranking.scores, ranking.path, source) == \
        (["i2", "i3"], [0.8, 0.7], "model", "precomputed")


def test_precomputed_not_known_for_another_version_too_few_items_or_seen_kept():
    other = TopK("als", "v1", [("i2", 0.8), ("i3", 0.7)], 0)
    short = TopK("als", "v2", [("i1", 0.9), ("i2", 0.8)], 0)   # one unseen left for k=2
    full = TopK("als", "v2", [("i2", 0.8), ("i3", 0.7)], 0)
    assert known(MODEL, query(), profile(other)) is None
    assert known(MODEL, query(), profile(short)) is None
    assert known(MODEL, query(exclude_seen=False), profile(full)) is None, \
        "the list left seen items out: not an answer when they are wanted"


def test_memoized_ranking_for_the_same_model_k_and_exclude_seen_only():
    p = profile()
    memo = (Ranking(["i7", "i8"], [0.5, 0.4], "model"), "online")
    p.rankings[("v2", "abc", 2, True)] = memo
    assert known(MODEL, query(), p) is memo
    assert known(MODEL, query(k=3), p) is None
    assert known(MODEL, query(exclude_seen=False), p) is None
    assert known(SimpleNamespace(name="als", version="v2", content_sha256="def"), query(), p) is None
    assert score(MODEL, query(), p) is memo, "score answers what known knows without scoring"
