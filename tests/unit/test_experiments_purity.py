"""The experiments package is pure: no I/O clients, no clock (STYLE.md rule 1 and 3)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "services" / "experiments"
FORBIDDEN = {"faust": "stream runtime", "aiokafka": "Kafka client", "redis": "Redis client",
             "aiohttp": "HTTP", "time": "the clock", "datetime": "the clock", "random": "unseeded randomness"}


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_module_imports_nothing_impure(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    bad = {n: FORBIDDEN[n] for n in names & FORBIDDEN.keys()}
    assert not bad, f"{path.name} imports {bad}"
