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


async def _configs(admin, name: str) -> dict[str, str]:
    (described,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
    return {entry[0]: entry[1] for entry in described.resources[0][4]}


async def test_existing_topics_get_the_declared_configs_and_keep_their_own(settings, caplog):
    """A deployment from before a config was declared (or a topic made by hand): the models
    topic without its compaction lag, a changelog with the delete policy. ensure_topics
    brings both up to date, keeps their other settings, and changes nothing the next time."""
    from aiokafka.admin import NewTopic

    models, changelog = settings.topic(topics.MODELS), settings.topic(topics.FEATURES_STATE)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([
            NewTopic(models, 1, 1, topic_configs={"cleanup.policy": "compact",
                                                  "retention.ms": "86400000"}),
            NewTopic(changelog, 1, 1, topic_configs={"max.message.bytes": "2000000"})])
        await asyncio.sleep(0.5)
        caplog.set_level("WARNING", logger="clickloop.topics")
        await topics.ensure_topics(settings, (topics.MODELS, topics.FEATURES_STATE))
        m, c = await _configs(admin, models), await _configs(admin, changelog)
        assert m["min.compaction.lag.ms"] == str(7 * 24 * 3_600_000)
        assert m["cleanup.policy"] == "compact" and m["retention.ms"] == "86400000"
        assert c["cleanup.policy"] == "compact" and c["max.message.bytes"] == "2000000"
        changed = [r.getMessage() for r in caplog.records if r.name == "clickloop.topics"]
        assert len(changed) == 2 and any("min.compaction.lag.ms" in x for x in changed) \
            and any("'delete' -> 'compact'" in x for x in changed), changed
        caplog.clear()
        await topics.ensure_topics(settings, (topics.MODELS, topics.FEATURES_STATE))
        assert not [r for r in caplog.records if r.name == "clickloop.topics"]
    finally:
        await admin.close()


async def test_check_mode_logs_what_falls_short_and_alters_nothing(settings, caplog):
    from aiokafka.admin import NewTopic

    s = dataclasses.replace(settings, topic_configs="check")
    models = s.topic(topics.MODELS)
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(models, 1, 1, topic_configs={"cleanup.policy": "compact"})])
        await asyncio.sleep(0.5)
        caplog.set_level("WARNING", logger="clickloop.topics")
        await topics.ensure_topics(s, (topics.MODELS,))
        assert (await _configs(admin, models))["min.compaction.lag.ms"] == "0"
        (logged,) = [r for r in caplog.records if r.name == "clickloop.topics"]
        assert logged.levelname == "ERROR" and "min.compaction.lag.ms" in logged.getMessage() \
            and "not altered" in logged.getMessage()
    finally:
        await admin.close()
