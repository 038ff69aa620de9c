"""`clickloop train`'s pipeline without I/O: hold-out evaluation, the final model on all data,
the artifact's arrays and manifest, too-little-data errors, and the `models` record's schema."""
from __future__ import annotations

import argparse
import random
import typing

import fastjsonschema
import numpy as np
import pytest

from schemas import json_schema
from schemas.models import ModelAnnouncement, ModelMetrics
from services.model import artifact
from services.model.train import TrainError, TrainOptions, fit, manifest_params, version_for
from services.model.transform import Interaction

DAY = 86_400_000


def planted(users: int = 120, groups: int = 3, per_group: int = 10, seed: int = 4) -> list[Interaction]:
    """Users of a group interact with its items (5 % noise); group 0 is the biggest."""
    rng = random.Random(seed)
    items = [[f"g{g}i{j}" for j in range(per_group)] for g in range(groups)]
    rows = []
    for u in range(users):
        g = 0 if u < users // 2 else 1 + u % (groups - 1)
        for _ in range(10):
            pool = items[rng.randrange(groups)] if rng.random() < 0.05 else items[g]
            rows.append(Interaction(f"u{u}", rng.choice(pool), "click" if rng.random() < 0.3 else "view",
                                    rng.randrange(30 * DAY)))
    return rows


def options(**over) -> TrainOptions:
    base = dict(name=None, since=None, until=None, test_fraction=0.2, factors=6, iterations=8,
                regularization=0.1, alpha=10.0, backend="numpy", k=5, no_announce=False,
                precompute=False, precompute_k=None, active_days=7.0, json=False)
    return TrainOptions.from_args(argparse.Namespace(**{**base, **over}), "als")


@pytest.mark.parametrize("backend", ["numpy", "implicit"])
def test_fit_evaluates_on_the_holdout_and_trains_the_final_model_on_everything(backend):
    rows = planted()
    trained = fit(rows, options(backend=backend))
    h = trained.holdout
    assert trained.factors.backend == backend
    assert h.train_interactions + h.test_interactions == len(rows) == trained.interactions
    assert h.test_interactions == pytest.approx(0.2 * len(rows), abs=5)
    assert h.model.users == h.popularity.users > 30
    assert h.model.recall > h.popularity.recall + 0.2 and h.model.ndcg > h.popularity.ndcg + 0.2, h
    # The final model knows every user and item, including what only the hold-out saw.
    assert len(trained.matrix.users) == 120 and len(trained.matrix.items) == 30
    assert trained.data_range == (min(r.ts for r in rows), max(r.ts for r in rows))
    arrays = trained.arrays()
    assert set(arrays) == {"item_factors", "user_factors", "user_ids", "item_popularity"}
    assert arrays["item_factors"].shape == (30, 6) and arrays["user_factors"].shape == (120, 6)
    assert arrays["item_factors"].dtype == arrays["user_factors"].dtype == np.float32
    assert arrays["user_ids"].tolist() == list(trained.matrix.users) and arrays["user_ids"].dtype.kind == "U"
    expected = {item: sum(r.item == item for r in rows) for item in trained.matrix.items}
    assert dict(zip(trained.matrix.items, arrays["item_popularity"].tolist())) == expected
    assert arrays["item_popularity"].dtype == np.float32


def test_metrics_and_params_for_the_manifest():
    o = options(k=3, since="2026-11-01")
    trained = fit(planted(), o)
    m = trained.holdout.metrics()
    assert set(m) == {"k", "users", "cutoff_ms", "train_interactions", "test_interactions",
                      "model", "popularity"}
    assert m["k"] == 3 and set(m["model"]) == set(m["popularity"]) == {"recall@3", "ndcg@3"}
    assert m["model"]["recall@3"] == trained.holdout.model.recall
    p = manifest_params(o, trained)
    assert {k: p[k] for k in ("factors", "iterations", "regularization", "alpha", "seed", "threads")} == \
        o.params.as_dict()
    assert (p["backend"], p["k"], p["test_fraction"], p["cutoff_ms"]) == ("numpy", 3, 0.2, m["cutoff_ms"])
    assert p["since_ms"] == o.since_ms and p["until_ms"] is None


@pytest.mark.parametrize("rows,message", [
    ([], "no item interactions in the archive from the beginning to the end"),
    ([Interaction("u", "a", "view", 5), Interaction("v", "b", "view", 5)],
     "every interaction is at or after the hold-out cutoff"),
    ([Interaction("u", "a", "view", t) for t in range(10)], "1 users and 1 items"),
    ([Interaction("u", "a", "view", 0), Interaction("v", "b", "view", 1),
      Interaction("u", "a", "view", 2), Interaction("v", "b", "view", 3)],
     "no hold-out user interacted with an item that was new to them"),
])
def test_too_little_data_is_a_clear_error(rows, message):
    with pytest.raises(TrainError, match=message):
        fit(rows, options())


def test_the_announcement_of_a_trained_artifact_validates(tmp_path):
    trained = fit(planted(), options())
    arrays = trained.arrays()
    manifest = artifact.Manifest("als", version_for(1_795_564_800_000, arrays), 1_795_564_800_000,
                                 trained.data_range, manifest_params(options(), trained),
                                 trained.holdout.metrics(), list(trained.matrix.items))
    record = artifact.announcement(artifact.write(tmp_path, manifest, arrays))
    validate = fastjsonschema.compile(json_schema("models"))
    validate(record)
    assert record["content_sha256"] == artifact.verify(record["path"]).content_sha256
    for broken in ({**record, "v": 2}, {**record, "content_sha256": "abc"}, {**record, "surprise": 1},
                   {**record, "data_range": [1]}, {**record, "name": "a/b"},
                   {**record, "metrics": {**record["metrics"], "model": {"recall@5": 1.5}}},
                   {k: v for k, v in record.items() if k != "version"}):
        with pytest.raises(fastjsonschema.JsonSchemaValueException):
            validate(broken)


def test_typed_record_and_json_schema_name_the_same_fields():
    doc = json_schema("models")
    assert set(typing.get_type_hints(ModelAnnouncement)) == set(doc["properties"]) == set(doc["required"])
    assert set(typing.get_type_hints(ModelMetrics)) == set(doc["properties"]["metrics"]["properties"])
