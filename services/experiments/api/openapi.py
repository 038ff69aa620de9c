"""The OpenAPI 3.1 document of the experiments service (`GET /openapi.json`).

The Experiment schema is the topic's own JSON Schema (schemas/json/
experiments.schema.json), so the API and the topic cannot drift apart.
"""
from __future__ import annotations

import copy
from functools import cache

from schemas import json_schema
from services.experiments.results import MAX_DRAW_CELLS


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _err(description: str) -> dict:
    return _json(_ref("Error"), description)


UNAVAILABLE = {**_err("Kafka cannot take or confirm the write now (or the registry is still "
                      "being read at start-up); retry after Retry-After seconds"),
               "headers": {"Retry-After": {"schema": {"type": "integer"}}}}
TOO_LARGE = _err("the body is over 256 KB")
UNREADABLE = _err("the latest bandit.posteriors snapshot (server data) is unreadable or the "
                  "results cannot be computed from it")
RESULTS_BUSY = {**_err("the registry is still being read at start-up, or the results took longer "
                       "than the service's timeout (others are being computed); retry after "
                       "Retry-After seconds"),
                "headers": {"Retry-After": {"schema": {"type": "integer"}}}}
ID = {"name": "id", "in": "path", "required": True, "description": "experiment id",
      "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"}}


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _experiment_schema() -> dict:
    s = copy.deepcopy(json_schema("experiments"))
    for key in ("$schema", "$id"):
        s.pop(key, None)
    return s


def _create_schema(exp: dict) -> dict:
    props = {k: v for k, v in exp["properties"].items()
             if k not in ("v", "revision", "status", "ended", "updated")}
    arm = copy.deepcopy(exp["properties"]["arms"])
    arm["items"]["required"] = ["name", "weight"]
    props["arms"] = arm
    return {"type": "object", "additionalProperties": False, "properties": props,
            "required": ["id", "name", "owner", "hypothesis", "surface", "arms", "planned_end"],
            "description": "A new experiment. Defaults: population {} (everyone), unit user_id, "
                           "kind ab, epsilon null, primary_metric click_through, start now, "
                           "namespace null; the service sets v, revision 1, status draft, "
                           "ended null and updated."}


RESULTS = {
    "type": "object",
    "description": "Results from the latest bandit.posteriors snapshot (services/experiments/"
                   "results.py): per arm counts, rates, Wilson intervals, posteriors and credible "
                   "intervals; per treatment against the first arm the z-test, p-values, "
                   "difference interval, sample size, P(B>A), expected losses and decision; SRM "
                   "against the planned weights (A/B); bandit P(best) and value remaining; the "
                   "cumulative daily history.",
    "required": ["experiment", "arms", "comparisons", "srm", "bandit", "history"],
    "properties": {
        "experiment": {"type": "string"}, "kind": {"type": "string"}, "status": {"type": "string"},
        "alpha": {"type": "number"}, "power": {"type": "number"},
        "arms": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "exposures": {"type": "integer"},
            "clicks": {"type": "integer"}, "rate": {"type": "number"},
            "ci": {"type": "array", "items": {"type": "number"}},
            "ci_lower": {"type": "number"},
            "posterior": {"type": "object", "properties": {
                "alpha": {"type": "number"}, "beta": {"type": "number"}, "mean": {"type": "number"}}},
            "credible": {"type": "array", "items": {"type": "number"}}}}},
        "comparisons": {"type": "array", "items": {"type": "object", "properties": {
            "control": {"type": "string"}, "treatment": {"type": "string"},
            "z": {"type": "number"}, "p_value_one_sided": {"type": "number"},
            "p_value_two_sided": {"type": "number"},
            "ci_difference": {"type": "array", "items": {"type": "number"}},
            "sample_size_per_arm": {"type": ["integer", "null"]},
            "prob_b_beats_a": {"type": "number"}, "expected_loss_a": {"type": "number"},
            "expected_loss_b": {"type": "number"}, "winner": {"type": ["string", "null"]},
            "stop": {"type": "boolean"}, "decision": {"type": "string"}, "seed": {"type": "integer"}}}},
        "srm": {"type": "object", "properties": {
            "checked": {"type": "boolean"}, "p_value": {"type": ["number", "null"]},
            "level": {"enum": ["ok", "warn", "alert", None]}, "warning": {"type": "boolean"}}},
        "bandit": {"type": "object", "properties": {
            "prob_best": {"type": "array", "items": {"type": "number"}},
            "value_remaining": {"type": "number"}, "stop": {"type": "boolean"},
            "source": {"enum": ["snapshot", "computed"]}}},
        "history": {"type": "array", "items": {"type": "object", "properties": {
            "day": {"type": "string"}, "arms": {"type": "array"}, "comparisons": {"type": "array"},
            "srm_p_value": {"type": ["number", "null"]}, "regret": {"type": "number"}}}},
    },
}


@cache
def _document() -> dict:
    exp = _experiment_schema()
    written = {"200": _json(_ref("Experiment"), "the record as the registry folded it"),
               "404": _err("no experiment with that id"),
               "409": _err("refused: experiment collision, or not allowed from its status"),
               "503": UNAVAILABLE}
    return {
        "openapi": "3.1.0",
        "info": {"title": "clickloop experiments", "version": "1",
                 "description": "Create, start, stop and list experiments (records on the compacted "
                                "`experiments` topic) and read their results. Every error, on "
                                "any route (405 wrong method, 404 unknown route, 500 a bug, "
                                "too), is JSON {\"error\": reason}."},
        "paths": {
            "/v1/experiments": {
                "post": {"operationId": "createExperiment", "summary": "create a draft",
                         "requestBody": {"required": True, **_json(_ref("CreateExperiment"), "the experiment")},
                         "responses": {"201": _json(_ref("Experiment"), "created (status draft)"),
                                       "400": _err("invalid request, with the reason"),
                                       "409": _err("the id exists, or it collides with a running experiment"),
                                       "413": TOO_LARGE,
                                       "503": UNAVAILABLE}},
                "get": {"operationId": "listExperiments", "summary": "list experiments",
                        "parameters": [_query("status", {"enum": ["draft", "running", "stopped"]}, "only this status"),
                                       _query("surface", {"type": "string"}, "only this surface")],
                        "responses": {"200": _json({"type": "object", "properties": {
                            "experiments": {"type": "array", "items": _ref("Experiment")},
                            "count": {"type": "integer"}}}, "the experiments, by id"),
                            "400": _err("bad filter"), "503": UNAVAILABLE}},
            },
            "/v1/experiments/{id}": {
                "get": {"operationId": "getExperiment", "summary": "one experiment", "parameters": [ID],
                        "responses": {"200": _json(_ref("Experiment"), "its current record"),
                                      "404": _err("no experiment with that id"), "503": UNAVAILABLE}}},
            "/v1/experiments/{id}/start": {
                "post": {"operationId": "startExperiment", "summary": "start a draft (start = now)",
                         "parameters": [ID], "responses": written}},
            "/v1/experiments/{id}/stop": {
                "post": {"operationId": "stopExperiment", "summary": "stop (final)",
                         "parameters": [ID], "responses": written}},
            "/v1/experiments/{id}/results": {
                "get": {"operationId": "getResults", "summary": "statistics from the latest posterior snapshot",
                        "parameters": [ID,
                                       _query("alpha", {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                                              "significance level (default 0.05)"),
                                       _query("power", {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                                              "power of the sample size (default 0.8)"),
                                       _query("mde", {"type": "string"},
                                              "minimum detectable change: absolute (0.01) or relative (10%); "
                                              "default the observed difference"),
                                       _query("seed", {"type": "integer", "minimum": 0}, "Monte Carlo seed"),
                                       _query("draws", {"type": "integer", "minimum": 1, "maximum": 200000},
                                              "Monte Carlo draws (default 20000); arms x draws at most "
                                              f"{MAX_DRAW_CELLS}")],
                        "responses": {"200": _json(_ref("Results"), "the results"),
                                      "400": _err("bad parameter (also: arms x draws over the limit)"),
                                      "404": _err("no experiment with that id"),
                                      "500": UNREADABLE, "503": RESULTS_BUSY}}},
            "/openapi.json": {"get": {"operationId": "openapi", "summary": "this document",
                                      "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")}}},
            "/health": {"get": {"operationId": "health", "summary": "Kafka connected and registry caught up",
                                "responses": {"200": _json({"type": "object"}, "ready"),
                                              "503": _json({"type": "object"}, "not ready")}}},
            "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "text exposition",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/": {"get": {"operationId": "dashboard", "summary": "dashboard: experiments and status",
                          "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}}}},
            "/experiments/{id}": {"get": {"operationId": "experimentPage", "summary": "dashboard: one experiment",
                                          "parameters": [ID],
                                          "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}}}},
        },
        "components": {"schemas": {
            "Experiment": exp, "CreateExperiment": _create_schema(exp), "Results": RESULTS,
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        }},
    }


def document() -> dict:
    return _document()
