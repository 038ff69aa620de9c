"""Settings from the environment: defaults, parsing, and the errors that say what to fix."""
from __future__ import annotations

from pathlib import Path

import pytest

from services.settings import Settings, SettingsError


def test_defaults():
    s = Settings.from_env({})
    assert (s.kafka_bootstrap, s.redis_url, s.partitions, s.session_gap_ms) == \
        ("127.0.0.1:9092", "redis://127.0.0.1:6379/0", 4, 1_800_000)
    assert s.require_write_key and s.anonymize_ip and s.write_keys == ()
    assert (s.cookie_name, s.max_event_bytes, s.max_batch_bytes, s.linger_ms, s.record_max_events,
            s.record_max_bytes, s.produce_timeout_s) == \
        ("cl_anonymous_id", 32_768, 512_000, 5, 500, 524_288, 10)


@pytest.mark.parametrize("env,attr,value", [
    ({"CLICKLOOP_PARTITIONS": "12"}, "partitions", 12),
    ({"CLICKLOOP_WRITE_KEYS": "a, b,,c"}, "write_keys", ("a", "b", "c")),
    ({"CLICKLOOP_ANONYMIZE_IP": "off"}, "anonymize_ip", False),
    ({"CLICKLOOP_STATE_DIR": "/tmp/x"}, "state_dir", Path("/tmp/x")),
    ({"CLICKLOOP_LOG_LEVEL": "DEBUG"}, "log_level", "debug"),
    ({"CLICKLOOP_RECORD_MAX_BYTES": "900000"}, "record_max_bytes", 900_000),
    ({"CLICKLOOP_PRODUCE_TIMEOUT_S": "3"}, "produce_timeout_s", 3),
    ({"CLICKLOOP_COOKIE_NAME": "aid"}, "cookie_name", "aid"),
    ({"CLICKLOOP_TOPIC_CONFIGS": "check"}, "topic_configs", "check"),
    ({"CLICKLOOP_RECOMMENDER_WORKERS": "0"}, "recommender_workers", 0),
])
def test_parsing(env, attr, value):
    assert getattr(Settings.from_env(env), attr) == value


@pytest.mark.parametrize("env,message", [
    ({"CLICKLOOP_PARTITIONS": "many"}, "CLICKLOOP_PARTITIONS='many' is not a whole number"),
    ({"CLICKLOOP_PARTITIONS": "0"}, "must be at least 1"),
    ({"CLICKLOOP_ANONYMIZE_IP": "maybe"}, "use true or false"),
    ({"CLICKLOOP_REDIS_URL": "localhost:6379"}, "must start with redis://"),
    ({"CLICKLOOP_LOG_LEVEL": "loud"}, "CLICKLOOP_LOG_LEVEL"),
    ({"CLICKLOOP_TOPIC_CONFIGS": "fix"}, "CLICKLOOP_TOPIC_CONFIGS='fix': use apply or check"),
    ({"CLICKLOOP_COLLECTOR_WORKERS": "-1"}, "CLICKLOOP_COLLECTOR_WORKERS=-1 must be at least 0"),
    ({"CLICKLOOP_RECORD_MAX_BYTES": "30000"}, "CLICKLOOP_RECORD_MAX_BYTES=30000 must be at least"),
    ({"CLICKLOOP_RECORD_MAX_BYTES": "2000000"}, "must be at most 1000000"),
    ({"CLICKLOOP_PRODUCE_TIMEOUT_S": "0"}, "CLICKLOOP_PRODUCE_TIMEOUT_S=0 must be at least 1"),
])
def test_errors_name_the_variable(env, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        Settings.from_env(env)


def test_as_env_round_trips():
    s = Settings.from_env({"CLICKLOOP_WRITE_KEYS": "k1,k2", "CLICKLOOP_PREFIX": "p.",
                           "CLICKLOOP_REQUIRE_WRITE_KEY": "false"})
    assert Settings.from_env(s.as_env()) == s


def test_archive_defaults_and_parsing(tmp_path):
    s = Settings.from_env({"CLICKLOOP_STATE_DIR": str(tmp_path)})
    assert (s.archive_root, s.archive_topics, s.archive_max_rows, s.archive_interval_s,
            s.archive_time) == (str(tmp_path / "archive"), ("clicks", "sessions"), 50_000, 60, "event")
    s = Settings.from_env({"CLICKLOOP_ARCHIVE_URI": "s3://bucket/archive",
                           "CLICKLOOP_ARCHIVE_TOPICS": "clicks",
                           "CLICKLOOP_ARCHIVE_INTERVAL_S": "1",
                           "CLICKLOOP_ARCHIVE_TIME": "event,sessions=record"})
    assert (s.archive_root, s.archive_topics, s.archive_interval_s, s.archive_time) == \
        ("s3://bucket/archive", ("clicks",), 1, "event,sessions=record")
    assert Settings.from_env(s.as_env()) == s


@pytest.mark.parametrize("env,message", [
    ({"CLICKLOOP_ARCHIVE_TIME": "wallclock"}, "CLICKLOOP_ARCHIVE_TIME='wallclock'"),
    ({"CLICKLOOP_ARCHIVE_TOPICS": ",,"}, "CLICKLOOP_ARCHIVE_TOPICS is empty"),
    ({"CLICKLOOP_ARCHIVE_INTERVAL_S": "0"}, "CLICKLOOP_ARCHIVE_INTERVAL_S=0 must be at least 1"),
    ({"CLICKLOOP_ARCHIVE_MAX_ROWS": "0"}, "CLICKLOOP_ARCHIVE_MAX_ROWS=0 must be at least 1"),
])
def test_archive_errors_name_the_variable(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)
