"""ensure_topics against the real broker: creates what is missing, says why it could not."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from streams import topics

pytestmark = pytest.mark.integration


async def test_creates_missing_topics_with_their_layout_and_is_idempotent(settings):
    s = dataclasses.replace(settings, partitions=3)
    names = (topics.CLICKS, topics.MODELS, topics.EXPERIMENTS)
    # Two processes at once: one of them gets "already exists" from the broker, no error.
    await asyncio.gather(topics.ensure_topics(s, names), topics.ensure_topics(s, names))
    await topics.ensure_topics(s, names)  # already there: nothing to do, no error
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        described = {d["topic"]: len(d["partitions"]) for d in
                     await admin.describe_topics([s.topic(n) for n in names])}
        (models,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC,
                                                                 s.topic(topics.MODELS))])
    finally:
        await admin.close()
    assert described == {s.topic(topics.CLICKS): 3, s.topic(topics.MODELS): 3,
                         s.topic(topics.EXPERIMENTS): 1}
    configs = {entry[0]: entry[1] for entry in models.resources[0][4]}
    assert configs["cleanup.policy"] == "compact"
    assert configs["min.compaction.lag.ms"] == str(7 * 24 * 3_600_000)


async def test_a_topic_the_broker_refuses_is_an_error_with_the_reason(settings):
    bad = dataclasses.replace(settings, prefix=settings.prefix + "no spaces allowed ")
    with pytest.raises(topics.TopicCreationError) as err:
        await topics.ensure_topics(bad, (topics.CLICKS,))
    assert bad.topic(topics.CLICKS) in str(err.value) and "error" in str(err.value)
