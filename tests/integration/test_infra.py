"""The local infrastructure the project starts: a real KRaft broker and a real Redis."""
from __future__ import annotations

import os

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from services import infra as local

pytestmark = pytest.mark.integration


def test_defaults_are_the_documented_ports(infra):
    if "CLICKLOOP_KAFKA" not in os.environ:
        assert infra.kafka_bootstrap == "127.0.0.1:9092"
    if "CLICKLOOP_REDIS_URL" not in os.environ:
        assert infra.redis_url == "redis://127.0.0.1:6379/0"


def test_start_is_idempotent(infra):
    assert local.kafka_ready(infra) and local.redis_ready(infra)
    assert local.start_all(infra) == []  # both already answer: reused, nothing started


async def test_broker_is_kafka_4_in_kraft_combined_mode(infra):
    admin = AIOKafkaAdminClient(bootstrap_servers=infra.kafka_bootstrap)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
    finally:
        await admin.close()
    # KRaft combined mode: the one node is its own controller.
    assert [b["node_id"] for b in cluster["brokers"]] == [cluster["controller_id"]]
    assert list((local.KAFKA_DIR / "lib").glob("kafka_2.13-4.*.jar")), "runs from Kafka 4.x jars"
