"""Faults: the cdc_history worker killed with SIGKILL mid-stream, on the real broker."""
from __future__ import annotations

import dataclasses

import orjson
import pytest

from bench._common import produce
from bench.cdc_history import change_records, partitioned
from streams import topics
from streams.cdc_history import offline_history
from streams.history import HistoryConfig, resolve
from tests.faults.kill import kill_mid_stream

pytestmark = pytest.mark.integration


async def test_sigkill_at_any_point_leaves_history_equal_to_the_offline_fold(settings, workers):
    """Kill the worker with SIGKILL several times mid-stream; the committed
    `history.<table>` records must be exactly those of an offline fold of the same
    records: none lost, none written twice, so the resolved history is equal too."""
    settings = dataclasses.replace(settings, partitions=2, checkpoint_ms=100)
    workers.settings = settings
    cdc = topics.cdc_topic("shop", "public", "subscriptions")
    await topics.ensure_topics(settings, (cdc, topics.history_topic(cdc), topics.dlq_topic(cdc)))
    records = change_records(100_000, keys=4_000, seed=13)
    parts = partitioned(records, settings.partitions)
    cfg = HistoryConfig(max_versions=settings.history_max_versions)
    expected: list[dict] = []
    for p in range(settings.partitions):    # the worker folds each partition in its order
        expected += offline_history([r for r, (q, _, _) in zip(records, parts) if q == p], cfg)[0]
    assert len(expected) > 60_000
    await produce(settings, settings.topic(cdc), parts)

    seen = await kill_mid_stream(settings, workers, "cdc_history",
                                 settings.topic(topics.history_topic(cdc)), len(expected),
                                 max_delay_s=0.3)
    got = [orjson.loads(v) for v in seen]
    assert len(got) == len(expected), f"{len(got)} history records for {len(expected)} expected"

    def order(row: dict):
        return row["key_id"], row["revision"]

    assert sorted(got, key=order) == sorted(expected, key=order), \
        "history records differ from the offline fold (lost, doubled or changed)"
    assert resolve(got) == resolve(expected)
