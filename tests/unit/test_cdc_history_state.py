"""The cdc_history worker's state plumbing (streams/cdc_history.py), without Kafka: the
changelog entries of several topics sharing one changelog partition restore each topic's
state alone, and CLICKLOOP_CDC_TOPICS becomes one subscription regex."""
from __future__ import annotations

import re

from services.settings import Settings
from streams.cdc_history import PartitionHistory, dump, restore, subscription
from streams.debezium import ChangeEvent
from streams.history import HistoryConfig, TableHistory

T = 1_795_000_000_000


def ev(key: int, pos: int, plan: str) -> ChangeEvent:
    return ChangeEvent("public.t", {"id": key}, str(key), "u" if pos > 1 else "c", None,
                       {"id": key, "plan": plan}, T + pos, (pos, pos), f"lsn {pos}", None, "postgresql")


def test_two_topics_in_one_changelog_partition_restore_apart():
    cfg = HistoryConfig()
    a, b = PartitionHistory(TableHistory(cfg), 0), PartitionHistory(TableHistory(cfg), 0)
    a.history.apply(ev(1, 1, "basic"))
    a.history.apply(ev(1, 2, "pro"))
    a.next_offset = 2
    b.history.apply(ev(1, 5, "team"))     # the same key_id in another table
    b.next_offset = 7
    entries = dict(dump("it.cdc.s.p.a", a) + dump("it.cdc.s.p.b", b))
    assert dump("it.cdc.s.p.a", a)[:-1] == [], "nothing changed since: only the offset entry"
    ra, rb = restore(cfg, "it.cdc.s.p.a", dict(entries)), restore(cfg, "it.cdc.s.p.b", dict(entries))
    assert (ra.next_offset, rb.next_offset) == (2, 7)
    assert ra.history.current("1")["row"]["plan"] == "pro"
    assert rb.history.current("1")["row"]["plan"] == "team"
    # The restored state goes on exactly as the original: the next update closes "pro".
    out = ra.history.apply(ev(1, 3, "team"))
    assert [(v["row"]["plan"], v["is_current"]) for v in out.versions] == [("pro", False), ("team", True)]


def test_restore_of_an_empty_changelog_starts_at_offset_zero():
    part = restore(HistoryConfig(), "cdc.x.y.z", {})
    assert part.next_offset == 0 and part.history.states == {}


def test_subscription_regex_names_patterns_and_own_outputs():
    settings = Settings(prefix="it-1.", cdc_topics=("cdc.shop.public.subscriptions", r"cdc\.crm\..*"))
    pattern = re.compile(subscription(settings))
    assert pattern.match("it-1.cdc.shop.public.subscriptions")
    assert pattern.match("it-1.cdc.crm.public.accounts")
    assert not pattern.match("it-1.cdc.shopXpublic.subscriptions"), "a name is not a pattern"
    assert not pattern.match("cdc.shop.public.subscriptions"), "another prefix"
    assert not pattern.match("it-1.cdc.crm.public.accounts.dlq"), "its own dead letters"
    default = re.compile(subscription(Settings(prefix="")))
    assert default.match("cdc.a.b.c") and not default.match("history.c")
    assert not default.match("cdc.a.b.c.dlq")
