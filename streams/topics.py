"""Topic names (DESIGN.md, "Topics") and their creation.

Every topic is created explicitly with the configured partition count before
anything reads or writes it: Faust refuses a table whose changelog and source
topic disagree on partitions, and an auto-created topic would silently get the
broker's default.

The configs clickloop declares for a topic (`topic_configs`: compaction for
changelogs and compacted feeds, the models topic's compaction lag) are also
brought up to date on topics that already exist, so an upgrade or a topic made
by hand gets them (`config_changes` says what falls short; a stricter setting
already there is kept, and every other config of the topic is left as it is).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from services.settings import Settings

CLICKS = "clicks"
CLICKS_DLQ = "clicks.dlq"
CLICKS_LATE = "clicks.late"
SESSIONS = "sessions"
SESSIONS_DLQ = "sessions.dlq"
# Changelog of the sessionizer's state (compacted; see streams/txstate.py).
SESSIONIZE_STATE = "clickloop-sessionize-state"

# Features worker: item deltas repartitioned by item id, and its state's changelog.
FEATURES_ITEMS = "clickloop-features-items"
FEATURES_STATE = "clickloop-features-state"
# ... and the rows of history.<CLICKLOOP_SUBSCRIPTIONS_TABLE> repartitioned by user
# (streams/features_subscriptions.py).
FEATURES_SUBSCRIPTIONS = "clickloop-features-subscriptions"
# Models announced by `clickloop train` (compacted, keyed by model name).
MODELS = "models"
# What the recommender served (one record per response), and shadow rankings.
EXPOSURES = "exposures"
SHADOW = "shadow"

# Experiments (issue 6): the registry (compacted, ONE partition: the collision
# rule needs one total order of records), rewards from attribution, posterior
# snapshots from bandits, and the two workers' changelogs.
EXPERIMENTS = "experiments"
EXPOSURES_DLQ = "exposures.dlq"
REWARDS = "rewards"
REWARDS_DLQ = "rewards.dlq"
BANDIT_POSTERIORS = "bandit.posteriors"
ATTRIBUTION_STATE = "clickloop-attribution-state"
BANDITS_STATE = "clickloop-bandits-state"

# CDC history (issue 7): Debezium table topics `cdc.<server>.<schema>.<table>`
# in, SCD2 versions out on `history.<table>`, bad and late records to
# `<input topic>.dlq`; the worker's state changelog. Inputs are found by
# CLICKLOOP_CDC_TOPICS (names or patterns), outputs created as inputs appear.
CDC_PREFIX = "cdc."
HISTORY_PREFIX = "history."
CDC_HISTORY_STATE = "clickloop-cdc_history-state"
_REGEX_CHARS = frozenset("\\*+?[](){}|^$")


def cdc_topic(server: str, schema: str, table: str) -> str:
    """Debezium's default topic name for a table: `cdc.<server>.<schema>.<table>`
    (the connector's topic.prefix set to `cdc.<server>`)."""
    return f"{CDC_PREFIX}{server}.{schema}.{table}"


def history_topic(cdc_topic_name: str) -> str:
    """`history.<table>` for a CDC table topic: the last dotted part names the table."""
    return HISTORY_PREFIX + cdc_topic_name.rsplit(".", 1)[-1]


def dlq_topic(name: str) -> str:
    return f"{name}.dlq"


def is_pattern(entry: str) -> bool:
    """A CLICKLOOP_CDC_TOPICS entry with regex characters is a pattern, else a name."""
    return any(c in _REGEX_CHARS for c in entry)


ALL = (CLICKS, CLICKS_DLQ, CLICKS_LATE, SESSIONS, SESSIONS_DLQ, SESSIONIZE_STATE,
       FEATURES_ITEMS, FEATURES_STATE, FEATURES_SUBSCRIPTIONS, MODELS, EXPOSURES, SHADOW,
       EXPERIMENTS, EXPOSURES_DLQ, REWARDS, REWARDS_DLQ, BANDIT_POSTERIORS, ATTRIBUTION_STATE,
       BANDITS_STATE, CDC_HISTORY_STATE)
COMPACTED = frozenset({SESSIONIZE_STATE, FEATURES_STATE, MODELS, EXPERIMENTS, BANDIT_POSTERIORS,
                       ATTRIBUTION_STATE, BANDITS_STATE, CDC_HISTORY_STATE})
SINGLE_PARTITION = frozenset({EXPERIMENTS})
# Topic configs beyond the cleanup policy. `models`: compaction leaves every
# announcement for at least 7 days, so a recommender (re)started after a bad one
# still finds the previous good version (it serves the newest one that loads).
CONFIGS = {MODELS: {"min.compaction.lag.ms": str(7 * 24 * 3_600_000)}}


def topic_configs(name: str) -> dict[str, str]:
    """The configs a topic is created with."""
    return {**({"cleanup.policy": "compact"} if name in COMPACTED else {}), **CONFIGS.get(name, {})}


# Declared configs met by a value other than the declared one: a cleanup policy that
# includes the declared ones ("compact,delete" keeps compacting), a lag at least as long.
_AT_LEAST = frozenset({"min.compaction.lag.ms"})
_DYNAMIC_TOPIC_CONFIG = 1   # DescribeConfigs' config source of a topic's own setting
log = logging.getLogger("clickloop.topics")


def config_changes(declared: Mapping[str, str], current: Mapping[str, str | None]
                   ) -> dict[str, tuple[str | None, str]]:
    """The declared configs a topic's current ones fall short of: name -> (current,
    declared). Pure."""
    out = {}
    for name, want in declared.items():
        have = current.get(name)
        if have is not None:
            if name == "cleanup.policy":
                if set(want.split(",")) <= {p.strip() for p in have.split(",")}:
                    continue
            elif name in _AT_LEAST:
                try:
                    if int(have) >= int(want):
                        continue
                except ValueError:
                    pass
            elif have == want:
                continue
        out[name] = (have, want)
    return out


async def _bring_configs_up_to_date(admin: AIOKafkaAdminClient, declared: dict[str, dict[str, str]],
                                    apply: bool = True) -> None:
    """Alter the existing topics in `declared` (name -> configs) that fall short of them
    (`apply` False: only log each shortfall as an error)."""
    if not declared:
        return
    responses = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, name) for name in declared])
    for response in responses:
        for code, message, _, name, entries in response.resources:
            if code:
                log.error("topic %s: configs not readable (error %d: %s); not checked", name,
                          code, message)
                continue
            current = {e[0]: e[1] for e in entries}
            changes = config_changes(declared[name], current)
            if not changes:
                continue
            what = ", ".join(f"{k} {have!r} -> {want!r}" for k, (have, want) in changes.items())
            if not apply:
                log.error("topic %s needs %s (CLICKLOOP_TOPIC_CONFIGS=check: not altered)",
                          name, what)
                continue
            own = {e[0]: e[1] for e in entries if e[3] == _DYNAMIC_TOPIC_CONFIG}
            if any(e[4] for e in entries if e[3] == _DYNAMIC_TOPIC_CONFIG) or None in own.values():
                log.error("topic %s needs %s but holds a secret config this client cannot "
                          "carry over: alter it by hand", name, changes)
                continue
            # AlterConfigs sets a topic's whole config: its own settings, then ours.
            wanted = {**own, **{k: want for k, (_, want) in changes.items()}}
            result = await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, name,
                                                               configs=wanted)])
            errors = [(c, m) for r in result for c, m, *_ in r.resources if c]
            if errors:  # no Alter permission, say: the topic works, short of what was declared
                log.error("topic %s: could not set %s: %s", name, what, errors)
            else:
                log.warning("topic %s: set %s", name, what)


def group_id(settings: Settings, processor: str) -> str:
    """The consumer group (and Faust app id) of a processor."""
    return f"{settings.prefix}clickloop-{processor}"


class TopicCreationError(KafkaError):
    """The broker refused to create a topic (the reason is in the message), or it never
    appeared: a KafkaError, so callers that retry on Kafka errors retry this too."""


async def ensure_topics(settings: Settings, names: tuple[str, ...] = ALL) -> None:
    """Create the missing topics of `names` (prefixed), with `settings.partitions` each,
    and bring the declared configs of the existing ones up to date."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap,
                                request_timeout_ms=15000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [NewTopic(settings.topic(n), 1 if n in SINGLE_PARTITION else settings.partitions, 1,
                           topic_configs=topic_configs(n))
                  for n in names if settings.topic(n) not in existing]
        await _bring_configs_up_to_date(admin, {
            settings.topic(n): topic_configs(n) for n in names
            if settings.topic(n) in existing and topic_configs(n)},
            apply=settings.topic_configs == "apply")
        if wanted:
            # The broker answers per topic and aiokafka raises for none of them; a topic
            # that already exists (another process won the race) is what we wanted.
            response = await admin.create_topics(wanted)
            refused = [(name, code, message) for name, code, message, *_ in response.topic_errors
                       if code not in (0, TopicAlreadyExistsError.errno)]
            if refused:
                raise TopicCreationError("; ".join(f"{name}: error {code}: {message}"
                                                   for name, code, message in refused))
            missing: set[str] = set()
            for _ in range(50):  # creation is asynchronous on the broker
                missing = {t.name for t in wanted} - set(await admin.list_topics())
                if not missing:
                    break
                await asyncio.sleep(0.1)
            else:
                raise TopicCreationError(f"created but not listed after 5 s: {sorted(missing)}")
    finally:
        await admin.close()


async def committed_offsets(settings: Settings, group: str, topic: str) -> dict[int, int]:
    """A consumer group's committed offsets of `topic`, by partition (none: empty)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items()
            if tp.topic == topic and meta.offset >= 0}


async def drop_topics(settings: Settings) -> list[str]:
    """Delete every topic under `settings.prefix` (benchmarks and tests clean up after
    themselves: a million-event run leaves about a gigabyte of log). Refuses an empty
    prefix, which would be the production topics."""
    if not settings.prefix:
        raise ValueError("drop_topics needs a CLICKLOOP_PREFIX: refusing to delete unprefixed topics")
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=30000)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(settings.prefix)]
        for i in range(0, len(names), 100):
            await admin.delete_topics(names[i:i + 100])
        return names
    finally:
        await admin.close()


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """The topic's partitions (none when it does not exist), fetching metadata when the
    consumer has none for it yet."""
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        await consumer._client.force_metadata_update()  # no public call refreshes it
        parts = consumer.partitions_for_topic(topic) or set()
    return [TopicPartition(topic, p) for p in sorted(parts)]
