"""`clickloop cdc status`'s replication slot line (pure)."""
from __future__ import annotations

from services.infra_cdc import Slot, slot_line


def test_no_slot_yet():
    assert slot_line(None, "s1") == "s1: none (the connector creates it)"


def test_an_active_slot_shows_its_wal_status_and_what_it_retains():
    line = slot_line(Slot(True, "reserved", 3 * 2 ** 20), "s1")
    assert line == "s1: active, WAL reserved, retains 3.0 MiB"


def test_an_inactive_slot_says_it_holds_wal_back():
    line = slot_line(Slot(False, "extended", 0), "s1")
    assert line.startswith("s1: inactive, WAL extended, retains 0.0 MiB — nothing reads it")


def test_a_lost_slot_says_a_new_snapshot_is_needed():
    line = slot_line(Slot(False, "lost", 0), "s1")
    assert "invalidated" in line and "clickloop cdc resnapshot" in line
    assert "nothing reads it" not in line
