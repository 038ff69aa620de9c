"""The recommender's model choice from `models` records, without Kafka: which announcements
are kept (`Candidates`), and which one `ModelWatcher` serves once it has folded a topic's
records (real artifacts on disk, loaded and verified as in service)."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import orjson
import pytest

from services.model import artifact as artifacts
from services.recommender.models import Candidates, ModelError, ModelWatcher, ServedModel
from services.recommender.synthetic import random_model
from services.settings import Settings


def ann(name: str = "als", version: str = "v1", path: str = "/m", sha: str = "0" * 64) -> bytes:
    return orjson.dumps({"v": 1, "name": name, "version": version, "path": path,
                         "content_sha256": sha, "created_ms": 1})


@pytest.mark.parametrize("records,kept,why", [
    ([(b"als", ann(version="v1")), (b"als", ann(version="v2"))], ["v2", "v1"],
     "every announcement is kept, newest first"),
    ([(b"als", ann(version="v1")), (b"als", ann(version="v2")), (b"als", ann(version="v1"))],
     ["v1", "v2"], "one seen again moves to the newest place, not kept twice"),
    ([(b"other", ann(name="other")), (None, ann()), (b"als", None)], [],
     "a name not served, no key, a tombstone: nothing"),
    ([(b"als", ann(version=f"v{i}")) for i in range(5)], ["v4", "v3", "v2"],
     "at most the limit (3 here): the oldest dropped"),
])
def test_candidates_kept(records, kept, why):
    c = Candidates({"als"}, limit=3)
    for key, value in records:
        c.add(key, value)
    assert [a.version for a in c.take().get("als", [])] == kept, why
    assert not c and c.take() == {}, "take forgets"


@pytest.mark.parametrize("value,message", [
    (ann(name="other", version="o1"), "model 'other' o1 under the key 'als'"),
    (b"not json", "unreadable announcement"),
    (b"[1, 2]", "unreadable announcement"),
    (orjson.dumps({"v": 2, "name": "als"}), "announcement format 2"),
])
def test_candidates_refuse(value, message):
    c = Candidates({"als"})
    with pytest.raises(ModelError, match=message):
        c.add(b"als", value)
    assert not c


def watcher(tmp_path, names=("als",)) -> ModelWatcher:
    return ModelWatcher(dataclasses.replace(Settings.from_env(), model_dir=str(tmp_path)), names)


def record(offset: int, value: bytes | None, key: bytes = b"als"):
    return SimpleNamespace(topic="models", partition=0, offset=offset, key=key, value=value)


def announced(art) -> bytes:
    return orjson.dumps(artifacts.announcement(art))


def rewritten(root, art, version, **arrays):
    """A verified artifact with other arrays (e.g. NaN factors), as a careless writer makes it."""
    manifest = dataclasses.replace(art.manifest, version=version, arrays={}, content_sha256="")
    return artifacts.write(root, manifest, {**art.arrays, **arrays})


async def test_start_up_serves_the_newest_announcement_that_loads(tmp_path):
    """The topic as a restarted recommender reads it: v1 good, then announcements that fail
    in every way (a path this host cannot reach, a content hash that does not match, NaN
    factors, key ≠ name, unreadable): v1 is served, each refusal is in model_error."""
    v1 = random_model(tmp_path, "als", "v1", n_items=30, factors=4, n_users=5, seed=1)
    nan_items = v1.arrays["item_factors"].copy()
    nan_items[3, 1] = np.nan
    v4 = rewritten(tmp_path, v1, "v4", item_factors=nan_items)
    other = random_model(tmp_path, "other", "o1", n_items=30, factors=4, n_users=5, seed=2)
    w = watcher(tmp_path)
    w._fold([record(0, announced(v1)),
             record(1, ann(version="v2", path="/nowhere/als/v2")),
             record(2, orjson.dumps({**artifacts.announcement(v1), "version": "v3"})),
             record(3, announced(v4)),
             record(4, announced(other)),
             record(5, b"not json")])
    await w._load_pending()
    assert w.get("als").version == "v1"
    error = w.last_error
    for refused in ("als v4: ", "not all finite", "als v3: ", "holds als v1", "als v2: ",
                    "/nowhere/als/v2", "(serving als v1)", "'other' o1 under the key 'als'",
                    "unreadable announcement"):
        assert refused in error, (refused, error)
    assert error.index("als v4") < error.index("als v3") < error.index("als v2"), "newest first"


async def test_the_newest_good_one_wins_and_refusals_stop_there(tmp_path):
    v1 = random_model(tmp_path, "als", "v1", n_items=30, factors=4, n_users=5, seed=1)
    v2 = random_model(tmp_path, "als", "v2", n_items=30, factors=4, n_users=5, seed=2)
    w = watcher(tmp_path)
    w._fold([record(0, announced(v1)), record(1, announced(v2))])
    await w._load_pending()
    assert w.get("als").version == "v2" and w.last_error is None, "v1 is not even tried"


async def test_a_re_read_topic_never_goes_back_behind_the_model_served(tmp_path):
    """After a reconnect the whole topic is folded again: the newest (bad) one is retried,
    the one served stops the search, so an older one is never swapped in."""
    v1 = random_model(tmp_path, "als", "v1", n_items=30, factors=4, n_users=5, seed=1)
    v2 = random_model(tmp_path, "als", "v2", n_items=30, factors=4, n_users=5, seed=2)
    w = watcher(tmp_path)
    w._fold([record(0, announced(v1)), record(1, announced(v2))])
    await w._load_pending()
    served = w.get("als")
    w._fold([record(0, announced(v1)), record(1, announced(v2)),
             record(2, ann(version="v3", path="/nowhere/als/v3"))])
    await w._load_pending()
    assert w.get("als") is served and "als v3" in w.last_error and "als v1" not in w.last_error


async def test_a_live_announcement_under_another_key_keeps_the_model(tmp_path):
    v1 = random_model(tmp_path, "als", "v1", n_items=30, factors=4, n_users=5, seed=1)
    other = random_model(tmp_path, "other", "o1", n_items=30, factors=4, n_users=5, seed=2)
    w = watcher(tmp_path)
    w._fold([record(0, announced(v1))])
    await w._load_pending()
    assert w._fold([record(1, announced(other))]), "a refusal is something to report"
    await w._load_pending()
    assert w.get("als").version == "v1" and w.get("als").name == "als"
    assert "'other' o1 under the key 'als'" in w.last_error


async def test_model_error_names_the_newest_refusals_and_counts_the_rest(tmp_path):
    w = watcher(tmp_path)
    w._fold([record(i, ann(version=f"v{i}", path=f"/nowhere/{i}")) for i in range(8)])
    await w._load_pending()
    assert w.get("als") is None
    assert "als v7" in w.last_error and "als v3" in w.last_error and "als v2" not in w.last_error
    assert "and 3 older refused" in w.last_error


@pytest.mark.parametrize("array,value", [("item_factors", np.nan), ("user_factors", np.inf),
                                         ("item_factors", -np.inf)])
def test_a_model_with_factors_that_are_not_finite_is_refused(tmp_path, array, value):
    good = random_model(tmp_path, "als", "v1", n_items=20, factors=4, n_users=3)
    bad = good.arrays[array].copy()
    bad[1, 2] = value
    art = rewritten(tmp_path, good, "v2", **{array: bad})
    with pytest.raises(ModelError, match="not all finite"):
        ServedModel(artifacts.read(art.path))
    assert ServedModel(artifacts.read(good.path)).version == "v1"


async def test_a_refusal_leaves_model_error_once_a_newer_model_loads(tmp_path):
    """model_error tells what is wrong now: a name's refusals go when a later announcement
    of it loads, unreadable records when any model loads after them."""
    v1 = random_model(tmp_path, "als", "v1", n_items=30, factors=4, n_users=5, seed=1)
    v3 = random_model(tmp_path, "als", "v3", n_items=30, factors=4, n_users=5, seed=3)
    w = watcher(tmp_path)
    w._fold([record(0, announced(v1))])
    await w._load_pending()
    w._fold([record(1, ann(version="v2", path="/nowhere/als/v2")), record(2, b"not json")])
    await w._load_pending()
    assert "als v2" in w.last_error and "unreadable announcement" in w.last_error
    w._fold([record(3, announced(v3))])
    await w._load_pending()
    assert w.get("als").version == "v3" and w.last_error is None
