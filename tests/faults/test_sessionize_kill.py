"""Faults: the sessionize worker killed with SIGKILL mid-stream, on the real broker."""
from __future__ import annotations

import dataclasses

import orjson
import pytest

from bench._common import produce
from services.demo import click_events, click_records
from streams import sessionize, topics
from tests.faults.kill import kill_mid_stream
from tests.integration.helpers import offline_sessions

pytestmark = pytest.mark.integration


async def test_sigkill_at_any_point_neither_loses_nor_duplicates_a_session(settings, workers):
    """Kill the worker with SIGKILL several times mid-stream; the committed `sessions`
    topic must equal an offline recomputation exactly: none lost, none twice."""
    settings = dataclasses.replace(settings, partitions=2, checkpoint_ms=100,
                                   instance_id="kill-test")
    workers.settings = settings
    await topics.ensure_topics(settings)
    records = click_records(click_events(200_000, seed=11), settings.partitions, per_record=50)
    expected = offline_sessions(records, sessionize.config(settings))
    assert len(expected) > 10_000
    await produce(settings, settings.topic(topics.CLICKS), records)

    seen = await kill_mid_stream(settings, workers, "sessionize", settings.topic(topics.SESSIONS),
                                 len(expected))
    got = [orjson.loads(v) for v in seen]
    ids = [s["session_id"] for s in got]
    assert len(ids) == len(set(ids)), "a session was emitted twice"
    assert sorted(got, key=lambda s: s["session_id"]) == \
        sorted(expected, key=lambda s: s["session_id"]), "sessions differ from the offline run"
