"""The Parquet archive: one explicit Arrow schema per archived topic.

Every file of a topic has exactly this schema, so DuckDB, pandas and Spark read
a whole topic folder as one table (hive partitioning adds `topic`, `date` and
`hour` from the path; they are not columns of the files).

Columns are the topic record's fields (schemas/clicks.py, schemas/sessions.py)
plus where each row came from:

- `_partition`, `_offset`: the Kafka record;
- `_index`: the event's position in its `clicks` envelope (one row per event);
- `_timestamp`: the Kafka record timestamp (what `CLICKLOOP_ARCHIVE_TIME=record`
  partitions by, and what a replay by time selects on).

Epoch-millisecond fields are `timestamp("ms", tz="UTC")`. Open-ended Segment
objects (`context`, `properties`, `traits`, `extra`) are JSON text: their keys
and value types vary by client and event (`properties.price` is a number here
and a string there), so a struct would be the union of every key ever seen and
change from file to file, and a string map would lose types and nesting. JSON
text keeps one fixed schema and every value exactly; DuckDB (`->>`), Spark
(`get_json_object`) and pandas (`json.loads`) read it. The session fields whose
value types the schema fixes (`counts`, `utm`, `items`) are typed Arrow maps and
lists, queryable without parsing.

`history.<table>` topics (schemas/history.py) share one schema, `HISTORY`, under
each topic's own name: `row` and `key` are JSON text (a captured table's columns
vary by table and change when a column is added), `position` a list of integers,
the times timestamps; hour folders follow `valid_from`, so the revisions of a
version land in the same folder.

A column holds null both for a key that was absent and for a key whose value was
null. A replay from the archive (streams/archive_records.py) writes a null back
as `"key": null` when the key is in `null_keys`, or in `null_keys_by_type` for
the row's `type`, and leaves the key out otherwise: the topic's own rule
(schemas/clicks.py, NULL_KEYS), so records come back as their producer wrote them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Mapping

import pyarrow as pa

from schemas import clicks, history, sessions

SCHEMA_VERSION = 1

TIMESTAMP = pa.timestamp("ms", tz="UTC")
# Where each row came from; `_index` only for envelope topics.
PARTITION, OFFSET, INDEX, RECORD_TIME = "_partition", "_offset", "_index", "_timestamp"


@dataclass(frozen=True)
class ArchiveSchema:
    """How one topic is archived."""

    topic: str                  # logical topic name (without CLICKLOOP_PREFIX)
    schema: pa.Schema           # every file's schema, in column order
    event_time: str             # epoch-ms field the hour partition follows by default
    envelope: bool              # records are {"v":1,"events":[...]}: one row per event
    json_fields: frozenset[str]  # columns holding a nested object as JSON text
    null_keys: frozenset[str]   # written back as `"key": null` when null (see above)
    # ... and by the row's `type` (absent from this map: no type column)
    null_keys_by_type: Mapping[str, frozenset[str]] = field(default_factory=dict)
    key: str | None = None      # plain topics: the column that is the record key

    @property
    def fields(self) -> tuple[str, ...]:
        """The record's own fields (what an event may carry), without the `_` columns."""
        return tuple(n for n in self.schema.names if not n.startswith("_"))


def _source(envelope: bool) -> list[pa.Field]:
    return [pa.field(PARTITION, pa.int32(), nullable=False),
            pa.field(OFFSET, pa.int64(), nullable=False),
            *([pa.field(INDEX, pa.int32(), nullable=False)] if envelope else []),
            pa.field(RECORD_TIME, TIMESTAMP, nullable=False)]


CLICKS = ArchiveSchema(
    topic="clicks",
    schema=pa.schema([
        ("message_id", pa.string()),
        ("type", pa.string()),
        ("event", pa.string()),
        ("name", pa.string()),
        ("user_id", pa.string()),
        ("anonymous_id", pa.string()),
        ("previous_id", pa.string()),
        ("group_id", pa.string()),
        ("timestamp", TIMESTAMP),
        ("original_timestamp", TIMESTAMP),
        ("sent_at", TIMESTAMP),
        ("received_at", TIMESTAMP),
        ("context", pa.string()),
        ("properties", pa.string()),
        ("traits", pa.string()),
        ("extra", pa.string()),
        *_source(envelope=True),
    ], metadata={"clickloop.topic": "clicks", "clickloop.schema_version": str(SCHEMA_VERSION)}),
    event_time="timestamp",
    envelope=True,
    json_fields=frozenset({"context", "properties", "traits", "extra"}),
    null_keys=clicks.NULL_KEYS,
    null_keys_by_type=clicks.NULL_KEYS_BY_TYPE,
)

SESSIONS = ArchiveSchema(
    topic="sessions",
    schema=pa.schema([
        ("v", pa.int32()),
        ("session_id", pa.string()),
        ("visitor", pa.string()),
        ("user_id", pa.string()),
        ("anonymous_id", pa.string()),
        ("start", TIMESTAMP),
        ("end", TIMESTAMP),
        ("duration_ms", pa.int64()),
        ("event_count", pa.int64()),
        ("counts", pa.map_(pa.string(), pa.int64())),
        ("page_views", pa.int64()),
        ("searches", pa.int64()),
        ("landing_page", pa.string()),
        ("exit_page", pa.string()),
        ("referrer", pa.string()),
        ("utm", pa.map_(pa.string(), pa.string())),
        ("device", pa.string()),
        ("items", pa.list_(pa.string())),
        ("session_index", pa.int64()),
        ("previous_session_id", pa.string()),
        *_source(envelope=False),
    ], metadata={"clickloop.topic": "sessions", "clickloop.schema_version": str(SCHEMA_VERSION)}),
    event_time="start",
    envelope=False,
    json_fields=frozenset(),
    null_keys=frozenset(sessions.Session.__annotations__),   # no NotRequired key
    key="visitor",              # the sessionizer keys a session by its visitor
)

HISTORY_PREFIX = "history."


@cache
def history_schema(topic: str) -> ArchiveSchema:
    """How a `history.<table>` topic is archived (the same columns for every table)."""
    return ArchiveSchema(
        topic=topic,
        schema=pa.schema([
            ("v", pa.int32()),
            ("table", pa.string()),
            ("key", pa.string()),
            ("key_id", pa.string()),
            ("position", pa.list_(pa.int64())),
            ("source_position", pa.string()),
            ("tx_id", pa.string()),
            ("op", pa.string()),
            ("ts_ms", TIMESTAMP),
            ("valid_from", TIMESTAMP),
            ("valid_to", TIMESTAMP),
            ("is_current", pa.bool_()),
            ("is_deleted", pa.bool_()),
            ("is_retracted", pa.bool_()),
            ("row", pa.string()),
            ("moved_from", pa.string()),
            ("moved_to", pa.string()),
            ("revision", pa.int64()),
            *_source(envelope=False),
        ], metadata={"clickloop.topic": topic, "clickloop.schema_version": str(SCHEMA_VERSION)}),
        event_time="valid_from",
        envelope=False,
        json_fields=frozenset({"key", "row"}),
        null_keys=frozenset(history.HistoryRow.__annotations__),  # every key always written
        key="key_id",           # the cdc_history worker keys a version by its key_id
    )


class _Schemas(dict):
    """The fixed topics' schemas, and `history_schema` for any `history.<table>` name
    (`SCHEMAS[name]`, `SCHEMAS.get(name)`); iterating lists the fixed ones."""

    def __missing__(self, topic: str) -> ArchiveSchema:
        table = topic[len(HISTORY_PREFIX):] if topic.startswith(HISTORY_PREFIX) else ""
        if not table or "." in table:
            raise KeyError(topic)
        return history_schema(topic)

    def get(self, topic: str, default=None):
        try:
            return self[topic]
        except KeyError:
            return default


# Topic -> how it is archived. A topic is archived only once it has an entry here
# (or is a `history.<table>` topic).
SCHEMAS: dict[str, ArchiveSchema] = _Schemas({s.topic: s for s in (CLICKS, SESSIONS)})
