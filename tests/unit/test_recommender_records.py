"""Exposure and shadow records: fields, positions, null experiment/arm, and the JSON Schemas."""
from __future__ import annotations

import fastjsonschema
import pytest
from typing import get_type_hints

from schemas import json_schema
from schemas.exposures import Exposure
from schemas.shadow import ShadowRecord
from services.recommender import records
from services.recommender.request import Query

Q = Query("u1", "u1", None, 3, True)


def test_exposure_record():
    rec = records.exposure("r1", 1_700_000_000_000, Q, ["a", "b"], [0.9, 0.5], "model", None,
                           "online", "als", "v1")
    assert rec["items"] == [{"item_id": "a", "position": 0, "score": 0.9},
                            {"item_id": "b", "position": 1, "score": 0.5}]
    assert (rec["visitor"], rec["user_id"], rec["anonymous_id"], rec["k"]) == ("u1", "u1", None, 3)
    assert (rec["model"], rec["model_version"], rec["path"], rec["source"]) == ("als", "v1", "model", "online")
    assert rec["experiment"] is None and rec["arm"] is None, "present as null until issue 6"
    fastjsonschema.compile(json_schema("exposures"))(rec)


@pytest.mark.parametrize("path,reason,source,model", [
    ("fallback", "redis_timeout", "popular", "als"),
    ("fallback", "no_model", "popular", None),
    ("fallback", "model_open", "prior", "als"),
    ("cold_start", None, "prior", "als"),
    ("model", None, "precomputed", "als"),
])
def test_every_path_matches_the_schema(path, reason, source, model):
    rec = records.exposure("r", 1, Q, [], [], path, reason, source, model, "v" if model else None)
    fastjsonschema.compile(json_schema("exposures"))(rec)


def test_unknown_reason_is_refused_by_the_schema():
    rec = records.exposure("r", 1, Q, [], [], "fallback", "because", "popular", None, None)
    with pytest.raises(fastjsonschema.JsonSchemaValueException):
        fastjsonschema.compile(json_schema("exposures"))(rec)


@pytest.mark.parametrize("a,b,expected,why", [
    (["x", "y"], ["y", "x"], 1.0, "same items, any order"),
    (["x", "y"], ["z", "w"], 0.0, "nothing shared"),
    (["x", "y", "z", "w"], ["x", "q"], 0.25, "over the longer list"),
    ([], [], 1.0, "two empty lists agree"),
])
def test_overlap(a, b, expected, why):
    assert records.overlap(a, b) == expected, why


def test_shadow_record():
    served = records.ranking("als", "v1", "model", ["a", "b"], [0.9, 0.5])
    other = records.ranking("als-next", "s1", "model", ["b", "c"], [0.7, 0.6])
    rec = records.shadow("r1", 5, Q, served, other, 120)
    assert rec["overlap"] == 0.5 and rec["shadow_us"] == 120 and rec["visitor"] == "u1"
    fastjsonschema.compile(json_schema("shadow"))(rec)


@pytest.mark.parametrize("record,schema", [(Exposure, "exposures"), (ShadowRecord, "shadow")])
def test_typed_records_and_json_schemas_name_the_same_fields(record, schema):
    doc = json_schema(schema)
    assert set(get_type_hints(record)) == set(doc["properties"]) == set(doc["required"])
