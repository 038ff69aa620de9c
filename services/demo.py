"""Synthetic, realistic clickstream for `clickloop demo`: visitors browse in sessions.

A visitor lands on a page (from a referrer, sometimes with UTM tags), searches,
views products whose popularity follows a Zipf law, sometimes clicks one,
and comes back after a pause. Event time is simulated: it starts in the past
and runs faster than the wall clock until it catches up, so sessions close
(their 30 min gap passes) within minutes of a demo starting. Pure and seeded.
"""
from __future__ import annotations

import itertools
import random
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

import orjson

from schemas.clicks import SCHEMA_VERSION, partition_of, visitor_key
from schemas.times import ms_to_iso

REFERRERS = ["https://www.google.com/", "https://news.ycombinator.com/", "https://t.co/x",
             "", "", "https://www.bing.com/"]
QUERIES = ["running shoes", "rain jacket", "espresso machine", "headphones", "desk lamp",
           "backpack", "yoga mat", "mechanical keyboard", "sunglasses", "water bottle"]
USER_AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15",
]


iso = ms_to_iso


@dataclass
class Traffic:
    seed: int = 7
    visitors: int = 500
    items: int = 300
    host: str = "https://shop.example"

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        weights = [1 / (rank + 1) ** 1.1 for rank in range(self.items)]
        total = sum(weights)
        self.item_weights = [w / total for w in weights]
        self.item_ids = [f"item-{i:04d}" for i in range(self.items)]

    def _event(self, visitor: int, ts: int, kind: str, name: str | None, path: str,
               referrer: str, props: dict) -> dict:
        known = visitor % 3 != 0  # a third of visitors never log in
        # As analytics.js fills it: path without the query, search with it, UTM tags in campaign.
        bare, _, query = path.partition("?")
        page = {"url": self.host + path, "path": bare, "referrer": referrer}
        context: dict = {"ip": f"203.0.113.{visitor % 250}", "userAgent": USER_AGENTS[visitor % 3],
                         "page": page}
        if query:
            page["search"] = "?" + query
            context["campaign"] = {k.removeprefix("utm_").replace("campaign", "name"): v
                                   for k, v in (kv.split("=", 1) for kv in query.split("&"))
                                   if k.startswith("utm_")}
        event = {
            "type": kind, "messageId": str(uuid.UUID(int=self.rng.getrandbits(128))),
            "anonymousId": f"anon-{visitor:05d}", "timestamp": iso(ts),
            "context": context, "properties": props,
        }
        if known:
            event["userId"] = f"user-{visitor:05d}"
        if name:
            event["event"] = name
        return event

    def session(self, visitor: int, start: int) -> tuple[list[tuple[int, dict]], int]:
        """One visit: its (event time, event) pairs in time order, and when it ended."""
        rng, ts = self.rng, start
        referrer = rng.choice(REFERRERS)
        path = "/" if rng.random() < 0.6 else f"/p/{self._item()}"
        if rng.random() < 0.2:
            path += "?utm_source=newsletter&utm_medium=email&utm_campaign=winter"
        events = [(ts, self._event(visitor, ts, "page", None, path, referrer, {"path": path}))]
        for _ in range(rng.randint(1, 8)):
            ts += int(rng.expovariate(1 / 40_000))
            if rng.random() < 0.3:
                query = rng.choice(QUERIES)
                events.append((ts, self._event(visitor, ts, "track", "Products Searched",
                                               "/search", "", {"query": query})))
            item = self._item()
            events.append((ts + 500, self._event(
                visitor, ts + 500, "track", "Product Viewed", f"/p/{item}", "",
                {"item_id": item, "price": round(rng.uniform(5, 300), 2)})))
            if rng.random() < 0.15:
                events.append((ts + 2_000, self._event(visitor, ts + 2_000, "track",
                                                       "Product Clicked", f"/p/{item}", "",
                                                       {"item_id": item})))
        return events, ts + 2_000

    def _item(self) -> str:
        return self.rng.choices(self.item_ids, weights=self.item_weights)[0]

    def stream(self, start_ms: int, spread_ms: int = 3_600_000) -> Iterator[tuple[int, dict]]:
        """(event time, event) of all visitors in event-time order, without end.

        First visits are spread evenly over `spread_ms` from `start_ms`.
        """
        import heapq

        # Each visitor's next visit time; a visit is emitted whole when it starts.
        queue = [(start_ms + self.rng.randint(0, spread_ms), v) for v in range(self.visitors)]
        heapq.heapify(queue)
        pending: list[tuple[int, int, dict]] = []
        seq = 0
        while True:
            visit_at, visitor = heapq.heappop(queue)
            events, ended = self.session(visitor, visit_at)
            for ts, event in events:
                seq += 1
                heapq.heappush(pending, (ts, seq, event))
            # Come back after a pause well beyond the session gap.
            heapq.heappush(queue, (ended + int(self.rng.expovariate(1 / 7_200_000)) + 1_800_000,
                                   visitor))
            while pending and pending[0][0] <= queue[0][0]:
                ts, _, event = heapq.heappop(pending)
                yield ts, event


def click_events(n: int, seed: int = 1) -> list[dict]:
    """n synthetic `clicks` events (as the collector emits them), in event-time order."""
    now = int(time.time() * 1000)
    history = 24 * 3_600_000
    traffic = Traffic(seed=seed, visitors=max(1000, n // 40))
    from services.collector.ingest import to_click  # the collector's own mapping

    return [to_click(raw, now) for _, raw in itertools.islice(
        traffic.stream(now - history, spread_ms=history), n)]


def click_records(events: list[dict], partitions: int,
                  per_record: int) -> list[tuple[int, bytes | None, bytes]]:
    """(partition, key, value) records packing `per_record` events of one partition
    each, as the collector's micro-batching packs them under load (schemas/clicks.py)."""
    buffers: dict[int, list[dict]] = {}
    records = []

    def flush(partition: int) -> None:
        batch = buffers.pop(partition)
        visitors = {visitor_key(e) for e in batch}
        key = visitors.pop().encode() if len(visitors) == 1 else None
        records.append((partition, key, orjson.dumps({"v": SCHEMA_VERSION, "events": batch})))

    for event in events:
        partition = partition_of(visitor_key(event), partitions)
        buffers.setdefault(partition, []).append(event)
        if len(buffers[partition]) >= per_record:
            flush(partition)
    for partition in list(buffers):
        flush(partition)
    return records
