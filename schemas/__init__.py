"""Event contracts: one typed record module and one JSON Schema file per topic.

Records are TypedDicts: on the wire they are plain JSON objects (orjson decodes
them straight into dicts, with no per-event object construction on hot paths),
and the type checker still knows every field. The JSON Schema files in
schemas/json/ are the language-neutral contract; tests check that each record
and its schema name the same fields.
"""
from __future__ import annotations

import json
from functools import cache
from pathlib import Path

SCHEMA_DIR = Path(__file__).parent / "json"


@cache
def json_schema(name: str) -> dict:
    """The JSON Schema of a topic record (`clicks`, `sessions`, ...)."""
    return json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
