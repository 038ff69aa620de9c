"""Attribution: experiment exposures joined with later clicks, in event time. Pure.

One `PartitionAttribution` per input partition (`exposures` and `clicks` are
co-partitioned by visitor). An exposure that carries an experiment is rewarded
exactly once:

- 1 when its visitor clicks (`CLICK_EVENTS`) one of the shown items at a time
  `t` with `exposure.ts <= t < exposure.ts + window_ms` (half-open: a click at
  exactly the window's end does not count); the reward carries the item, its
  position and the click's time. The first such click in the order of the
  `clicks` partition wins; the same click may reward several exposures (two
  exposures showing the same item are two rewards).
- 0 when the window has closed without one: when the partition's click
  watermark (the largest click event time seen) reaches `ts + window_ms +
  lateness_ms`, also when the visitor never sends another event.

An exposure is identified by its visitor and request id: a second exposure with
both (a client that retried with the same `X-Request-Id`, two replicas serving
one request) is a duplicate, counted and not rewarded again, as long as the
exposure watermark has not passed the first one's `ts + window_ms +
lateness_ms` (past that, the same id is a new exposure). The decision depends
on the exposures partition's order alone, so it is the same in every
interleaving with the clicks.

Exposures without an experiment keep no state. The two topics are read side by
side and their interleaving differs from run to run (a restart after a crash
reads them in another order), so the rules make the result independent of it:

- clicks are buffered per visitor (only item clicks: time and item) for
  exposures that arrive after them, until the exposure watermark is
  `lateness_ms` past them (or, bounding memory when the exposures lag far
  behind, the click watermark is `retention_ms` past them);
- a click more than `lateness_ms` behind the click watermark is late and
  ignored (counted), so closing a window never races a straggler;
- an exposure more than `lateness_ms` behind the exposure watermark is late:
  it is handed back (the worker dead-letters it) rather than rewarded from a
  buffer that may already have dropped its clicks.

With those rules the rewards are a function of the two partitions' contents
alone, as long as the exposures lag the clicks by less than `retention_ms` of
event time; the tests check this by feeding random interleavings.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import orjson

from schemas.rewards import SCHEMA_VERSION, Reward
from services.model.transform import CLICK_EVENTS
from streams.codec import BadRecord, decode_clicks, event_problem
from streams.sessions import event_name, item_of

NEVER = -(2 ** 62)


@dataclass(frozen=True, slots=True)
class AttributionConfig:
    window_ms: int = 30 * 60_000
    lateness_ms: int = 60_000
    retention_ms: int = 6 * 3_600_000


@dataclass(slots=True)
class Outputs:
    rewards: list[Reward] = field(default_factory=list)
    events: int = 0
    late_clicks: int = 0
    bad_events: int = 0
    duplicates: int = 0     # exposures whose visitor and request id were already attributed


def check_exposure(value) -> dict:
    """The exposure as a dict, or BadRecord with the reason."""
    if not isinstance(value, dict):
        raise BadRecord("not an Exposure: expected a JSON object")
    if not isinstance(value.get("request_id"), str) or type(value.get("ts")) is not int \
            or not isinstance(value.get("visitor"), str) or not isinstance(value.get("items"), list):
        raise BadRecord("not an Exposure: needs a request_id, an integer ts, a visitor and items")
    experiment = value.get("experiment")
    if experiment is not None and (not isinstance(experiment, str) or not experiment
                                   or not isinstance(value.get("arm"), str) or not value["arm"]):
        raise BadRecord("exposure in an experiment needs a non-empty experiment and arm")
    if experiment is not None:
        for item in value["items"]:
            if not isinstance(item, dict) or not isinstance(item.get("item_id"), str) \
                    or type(item.get("position")) is not int:
                raise BadRecord("exposure item needs an item_id and an integer position")
    return value


def decode_exposure(value: bytes | None) -> dict:
    try:
        return check_exposure(orjson.loads(value) if value is not None else None)
    except orjson.JSONDecodeError as exc:
        raise BadRecord(f"not JSON: {exc}") from None


class PartitionAttribution:
    """Open exposures and buffered clicks of one partition, its two watermarks and the
    next offset to apply of each input topic."""

    def __init__(self, config: AttributionConfig, exposure_wm: int = NEVER,
                 click_wm: int = NEVER, next_offsets: dict | None = None) -> None:
        self.config = config
        self.exposure_wm, self.click_wm = exposure_wm, click_wm
        self.next_offsets: dict[str, int] = dict(next_offsets or {})
        # visitor -> open exposures [request_id, experiment, arm, ts, {item: position}]
        self.open: dict[str, list[list]] = {}
        # visitor -> buffered clicks [ts, item], in the clicks partition's order
        self.clicks: dict[str, list[list]] = {}
        self._deadlines: list[tuple[int, str, str]] = []    # (ts + window, visitor, request_id)
        self._expiry: list[tuple[int, str]] = []            # (click ts, visitor)
        # visitor -> {request_id: ts} of the experiment exposures taken, for duplicates
        self.taken: dict[str, dict[str, int]] = {}
        self._forget: list[tuple[int, str, str]] = []       # (ts + window + lateness, visitor, id)
        self._dirty: set[str] = set()

    # -- the two inputs ---------------------------------------------------------------
    def process_exposure(self, exposure: dict) -> tuple[Outputs, str | None]:
        """Apply one (checked) exposure; the reason when it is late (then nothing is applied
        but the watermark)."""
        out = Outputs(events=1)
        ts = exposure["ts"]
        previous = self.exposure_wm
        if ts > previous:
            self.exposure_wm = ts
            self._forget_ids()
        if exposure.get("experiment") is None:
            self._prune()
            return out, None
        if ts < previous - self.config.lateness_ms:
            return out, (f"late exposure: ts {ts} is more than {self.config.lateness_ms} ms "
                         f"behind the partition's exposure watermark {previous}")
        visitor, request_id = exposure["visitor"], exposure["request_id"]
        taken = self.taken.setdefault(visitor, {})
        if request_id in taken:
            out.duplicates += 1
            self._prune()
            return out, None
        taken[request_id] = ts
        heapq.heappush(self._forget, (ts + self.config.window_ms + self.config.lateness_ms,
                                      visitor, request_id))
        self._dirty.add(visitor)
        shown = {item["item_id"]: item["position"] for item in exposure["items"]}
        entry = [request_id, exposure["experiment"], exposure["arm"], ts, shown]
        end = ts + self.config.window_ms
        for click_ts, item in self.clicks.get(visitor, ()):
            if item in shown and ts <= click_ts < end:
                out.rewards.append(self._reward(visitor, entry, 1, click_ts, item))
                break
        else:
            if self.click_wm >= end + self.config.lateness_ms:
                out.rewards.append(self._reward(visitor, entry, 0, end, None))
            else:
                self.open.setdefault(visitor, []).append(entry)
                heapq.heappush(self._deadlines, (end, visitor, entry[0]))
                self._dirty.add(visitor)
        self._prune()
        return out, None

    def process_clicks_record(self, value: bytes | None, not_after: int | None = None) -> Outputs:
        """Apply a `clicks` record (a ClickBatch); BadRecord when it is not one. Events
        stamped after `not_after` (`codec.not_after` of the record) are bad."""
        return self.process_clicks(decode_clicks(value), not_after)

    def process_clicks(self, events: list, not_after: int | None = None) -> Outputs:
        out = Outputs(events=len(events))
        lateness, window = self.config.lateness_ms, self.config.window_ms
        for event in events:
            if event_problem(event, not_after) is not None:
                out.bad_events += 1
                continue
            ts = event["timestamp"]
            wm = self.click_wm
            if ts > wm:
                self.click_wm = ts
            if event_name(event) not in CLICK_EVENTS:
                continue
            if ts < wm - lateness:
                out.late_clicks += 1
                continue
            item = item_of(event)
            if item is None:
                continue
            visitor = event.get("user_id") or event["anonymous_id"]
            self.clicks.setdefault(visitor, []).append([ts, item])
            heapq.heappush(self._expiry, (ts, visitor))
            self._dirty.add(visitor)
            pending = self.open.get(visitor)
            if pending:
                kept = []
                for entry in pending:
                    if item in entry[4] and entry[3] <= ts < entry[3] + window:
                        out.rewards.append(self._reward(visitor, entry, 1, ts, item))
                    else:
                        kept.append(entry)
                if len(kept) != len(pending):
                    self._set_open(visitor, kept)
        self._close(out)
        self._prune()
        return out

    # -- time -------------------------------------------------------------------------
    def _close(self, out: Outputs) -> None:
        """Reward 0 to every open exposure whose window the click watermark has passed."""
        horizon = self.click_wm - self.config.lateness_ms
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= horizon:
            end, visitor, request_id = heapq.heappop(deadlines)
            pending = self.open.get(visitor)
            if not pending:
                continue
            for i, entry in enumerate(pending):
                if entry[0] == request_id:
                    out.rewards.append(self._reward(visitor, entry, 0, end, None))
                    self._set_open(visitor, pending[:i] + pending[i + 1:])
                    break

    def _forget_ids(self) -> None:
        """Drop the request ids whose window and lateness the exposure watermark passed."""
        forget, wm = self._forget, self.exposure_wm
        while forget and forget[0][0] <= wm:
            _, visitor, request_id = heapq.heappop(forget)
            taken = self.taken.get(visitor)
            if taken is not None and taken.pop(request_id, None) is not None:
                if not taken:
                    del self.taken[visitor]
                self._dirty.add(visitor)

    def _prune(self) -> None:
        """Drop buffered clicks no exposure still to come can match."""
        horizon = max(self.exposure_wm - self.config.lateness_ms,
                      self.click_wm - self.config.retention_ms)
        expiry = self._expiry
        while expiry and expiry[0][0] < horizon:
            _, visitor = heapq.heappop(expiry)
            buffered = self.clicks.get(visitor)
            if buffered is None:
                continue
            kept = [c for c in buffered if c[0] >= horizon]
            if len(kept) != len(buffered):
                if kept:
                    self.clicks[visitor] = kept
                else:
                    del self.clicks[visitor]
                self._dirty.add(visitor)

    def _set_open(self, visitor: str, entries: list) -> None:
        if entries:
            self.open[visitor] = entries
        else:
            self.open.pop(visitor, None)
        self._dirty.add(visitor)

    @staticmethod
    def _reward(visitor: str, entry: list, reward: int, ts: int, item: str | None) -> Reward:
        return {"v": SCHEMA_VERSION, "request_id": entry[0], "experiment": entry[1],
                "arm": entry[2], "visitor": visitor, "reward": reward, "exposure_ts": entry[3],
                "reward_ts": ts, "item": item,
                "position": entry[4][item] if item is not None else None}

    # -- state ------------------------------------------------------------------------
    def take_dirty(self) -> list[tuple[bytes, bytes | None]]:
        """(visitor, state JSON or None) of every visitor changed since the last call."""
        entries = []
        for visitor in self._dirty:
            opened, clicks, taken = self.open.get(visitor), self.clicks.get(visitor), \
                self.taken.get(visitor)
            entries.append((visitor.encode(), orjson.dumps(
                {"open": opened or [], "clicks": clicks or [], "taken": taken or {}})
                if opened or clicks or taken else None))
        self._dirty.clear()
        return entries

    def load(self, visitor: str, state: bytes) -> None:
        """Put back a visitor's state as `take_dirty` returned it (a changelog entry)."""
        data = orjson.loads(state)
        if data["open"]:
            self.open[visitor] = data["open"]
            for entry in data["open"]:
                heapq.heappush(self._deadlines, (entry[3] + self.config.window_ms, visitor, entry[0]))
        if data["clicks"]:
            self.clicks[visitor] = data["clicks"]
            for ts, _ in data["clicks"]:
                heapq.heappush(self._expiry, (ts, visitor))
        taken = data.get("taken")   # absent in entries written before duplicates were told
        if taken is None:
            taken = {entry[0]: entry[3] for entry in data["open"]}
        if taken:
            self.taken[visitor] = taken
            wait = self.config.window_ms + self.config.lateness_ms
            for request_id, ts in taken.items():
                heapq.heappush(self._forget, (ts + wait, visitor, request_id))

    def meta(self) -> dict:
        return {"exposure_wm": self.exposure_wm, "click_wm": self.click_wm,
                "next_offsets": self.next_offsets}
