"""Attribution rules of streams.attribution_core, as tables of cases
(window 30 min, lateness 1 min; times in minutes)."""
from __future__ import annotations

import random
import typing

import fastjsonschema
import orjson
import pytest

from schemas import json_schema
from schemas.rewards import Reward
from streams.attribution_core import (AttributionConfig, PartitionAttribution, check_exposure,
                                      decode_exposure)
from streams.codec import BadRecord

MIN = 60_000
CFG = AttributionConfig(window_ms=30 * MIN, lateness_ms=1 * MIN, retention_ms=6 * 60 * MIN)


def exposure(rid: str, minute: float, items=("i1", "i2"), visitor: str = "u1",
             experiment: str | None = "exp", arm: str | None = "A") -> dict:
    return {"v": 1, "request_id": rid, "ts": int(minute * MIN), "visitor": visitor,
            "user_id": visitor, "anonymous_id": None, "k": len(items),
            "items": [{"item_id": i, "position": p, "score": 1.0} for p, i in enumerate(items)],
            "model": None, "model_version": None, "path": "model", "reason": None,
            "source": "online", "experiment": experiment, "arm": arm if experiment else None}


def click(minute: float, item: str | None = "i1", visitor: str = "u1",
          name: str = "Product Clicked") -> dict:
    return {"message_id": f"{visitor}-{minute}-{item}-{name}", "type": "track", "event": name,
            "user_id": visitor, "anonymous_id": "anon", "timestamp": int(minute * MIN),
            "received_at": int(minute * MIN), "context": {},
            "properties": {"item_id": item} if item else {}}


def tick(minute: float) -> dict:
    """Another visitor's page view: only moves the click watermark."""
    return click(minute, None, visitor="someone-else", name="Page Viewed")


def run(steps: list[tuple[str, object]], cfg: AttributionConfig = CFG) -> tuple[list[Reward], list[str]]:
    """Steps are ("x", exposure) or ("c", [events]) records; rewards and late reasons."""
    part, rewards, late = PartitionAttribution(cfg), [], []
    for kind, value in steps:
        if kind == "x":
            out, reason = part.process_exposure(check_exposure(value))
            if reason:
                late.append(reason)
        else:
            out = part.process_clicks(value)
        rewards += out.rewards
    return rewards, late


def outcome(rewards: list[Reward]) -> dict[str, tuple]:
    return {r["request_id"]: (r["reward"], r["item"], r["position"], r["reward_ts"] // MIN)
            for r in rewards}


CASES = [
    ("click within the window rewards 1, with the item, position and click time",
     [("x", exposure("r1", 0)), ("c", [click(10, "i2")])], {"r1": (1, "i2", 1, 10)}),
    ("a click at exactly the window's end is outside it (half-open): 0 at the close",
     [("x", exposure("r1", 0)), ("c", [click(30, "i1")]), ("c", [tick(31)])],
     {"r1": (0, None, None, 30)}),
    ("a click one ms before the end counts",
     [("x", exposure("r1", 0)), ("c", [{**click(0, "i1"), "timestamp": 30 * MIN - 1}])],
     {"r1": (1, "i1", 0, 29)}),
    ("a click after the window: 0",
     [("x", exposure("r1", 0)), ("c", [click(45, "i1")]), ("c", [tick(50)])],
     {"r1": (0, None, None, 30)}),
    ("a click on an item not shown rewards nothing; the window still closes with 0",
     [("x", exposure("r1", 0)), ("c", [click(5, "i9")]), ("c", [tick(40)])],
     {"r1": (0, None, None, 30)}),
    ("the window stays open until the click watermark is lateness past its end",
     [("x", exposure("r1", 0)), ("c", [click(5, "i9")]), ("c", [tick(30.5)])], {}),
    ("two exposures of the same item: one click rewards both",
     [("x", exposure("r1", 0)), ("x", exposure("r2", 5)), ("c", [click(10, "i1")])],
     {"r1": (1, "i1", 0, 10), "r2": (1, "i1", 0, 10)}),
    ("a click before the exposure is ignored",
     [("c", [click(0, "i1")]), ("x", exposure("r1", 1)), ("c", [tick(40)])],
     {"r1": (0, None, None, 31)}),
    ("a click at the exposure's own time counts (the window is [ts, ts + 30 min))",
     [("c", [click(1, "i1")]), ("x", exposure("r1", 1))], {"r1": (1, "i1", 0, 1)}),
    ("an exposure without an experiment keeps no state and rewards nothing",
     [("x", exposure("r1", 0, experiment=None)), ("c", [click(5, "i1")]), ("c", [tick(60)])], {}),
    ("a silent visitor's window is closed by other visitors' events (the watermark)",
     [("x", exposure("r1", 0)), ("c", [tick(10)]), ("c", [tick(31)])], {"r1": (0, None, None, 30)}),
    ("only the first matching click rewards: one reward per exposure",
     [("x", exposure("r1", 0)), ("c", [click(2, "i2"), click(3, "i1")]), ("c", [tick(60)])],
     {"r1": (1, "i2", 1, 2)}),
    ("another visitor's click on the item rewards nothing",
     [("x", exposure("r1", 0)), ("c", [click(2, "i1", visitor="u2")]), ("c", [tick(60)])],
     {"r1": (0, None, None, 30)}),
    ("a view is not a click",
     [("x", exposure("r1", 0)), ("c", [click(2, "i1", name="Product Viewed")]), ("c", [tick(60)])],
     {"r1": (0, None, None, 30)}),
    ("a click that arrived before its exposure (the topics interleave) still rewards it",
     [("c", [click(3, "i2")]), ("x", exposure("r1", 0))], {"r1": (1, "i2", 1, 3)}),
    ("an exposure arriving after its window closed is decided at once from buffered clicks",
     [("c", [tick(0), click(3, "i2"), tick(50)]), ("x", exposure("r1", 0)), ("x", exposure("r2", 1))],
     {"r1": (1, "i2", 1, 3), "r2": (1, "i2", 1, 3)}),
    ("a click more than lateness behind the click watermark is late and ignored",
     [("x", exposure("r1", 0)), ("c", [tick(10), click(5, "i1")]), ("c", [tick(40)])],
     {"r1": (0, None, None, 30)}),
]


@pytest.mark.parametrize("steps, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_attribution_rules(steps, expected):
    rewards, _ = run(steps)
    assert outcome(rewards) == expected
    assert len(rewards) == len(expected), "an exposure was rewarded twice"


def test_clicks_are_kept_for_lagging_exposures_only_up_to_the_retention():
    """Exposures lagging the clicks by more than retention_ms of event time no longer find
    their clicks: the one case where the interleaving matters (documented)."""
    cfg = AttributionConfig(window_ms=30 * MIN, lateness_ms=MIN, retention_ms=60 * MIN)
    within, _ = run([("c", [click(3, "i1"), tick(59)]), ("x", exposure("r1", 0))], cfg)
    beyond, _ = run([("c", [click(3, "i1"), tick(64)]), ("x", exposure("r1", 0))], cfg)
    assert outcome(within) == {"r1": (1, "i1", 0, 3)}
    assert outcome(beyond) == {"r1": (0, None, None, 30)}


def test_odd_click_events_are_skipped_not_fatal():
    part = PartitionAttribution(CFG)
    part.process_exposure(exposure("r1", 0))
    out = part.process_clicks([{**click(1), "event": ["Product Clicked"]}, {**click(2), "properties": 7},
                               {**click(3), "timestamp": "3"}, "not an event", click(4, "i2")])
    assert out.bad_events == 2
    assert outcome(out.rewards) == {"r1": (1, "i2", 1, 4)}


def test_a_click_stamped_after_its_record_allows_is_bad_and_moves_no_watermark():
    part = PartitionAttribution(CFG)
    part.process_exposure(exposure("r1", 0))
    out = part.process_clicks([click(24 * 60), click(2, "i2")], not_after=5 * MIN)
    # believed, the first would have moved the watermark a day on: the second too late
    assert out.bad_events == 1 and part.click_wm == 2 * MIN
    assert outcome(out.rewards) == {"r1": (1, "i2", 1, 2)}


def test_late_exposure_is_handed_back_not_rewarded():
    rewards, late = run([("x", exposure("r1", 10)), ("x", exposure("r0", 8)), ("c", [click(9, "i1")])])
    assert rewards == [] and len(late) == 1 and "late exposure" in late[0]


def test_reward_records_match_the_json_schema():
    validate = fastjsonschema.compile(json_schema("rewards"))
    rewards, _ = run([("x", exposure("r1", 0)), ("x", exposure("r2", 0, visitor="u2")),
                      ("c", [click(1, "i1"), tick(40)])])
    assert {r["reward"] for r in rewards} == {0, 1}
    for reward in rewards:
        validate(reward)
    assert set(typing.get_type_hints(Reward)) == set(json_schema("rewards")["properties"])


@pytest.mark.parametrize("value, reason", [
    (b"nope", "not JSON"),
    (b"[]", "not an Exposure"),
    (orjson.dumps({**exposure("r", 0), "ts": "0"}), "integer ts"),
    (orjson.dumps({**exposure("r", 0), "arm": None}), "experiment and arm"),
    (orjson.dumps({**exposure("r", 0), "items": [{"item_id": 3, "position": 0}]}), "item_id"),
])
def test_bad_exposures_are_refused_with_the_reason(value, reason):
    with pytest.raises(BadRecord, match=reason):
        decode_exposure(value)


def test_a_duplicate_exposure_is_not_rewarded_again():
    """The same visitor and request id again (a client retry, two replicas): counted,
    never a second reward, whether the first is still open or already rewarded."""
    part = PartitionAttribution(CFG)
    first, _ = part.process_exposure(exposure("r1", 0))
    again, reason = part.process_exposure(exposure("r1", 2, items=("i3",), arm="B"))
    assert reason is None and again.duplicates == 1 and first.duplicates == 0
    clicked = part.process_clicks([click(3, "i1"), click(4, "i3")])
    assert outcome(clicked.rewards) == {"r1": (1, "i1", 0, 3)} and len(clicked.rewards) == 1
    after, _ = part.process_exposure(exposure("r1", 5))
    assert after.duplicates == 1
    assert part.process_clicks([click(6, "i1"), tick(60)]).rewards == []


def test_the_same_request_id_for_another_visitor_is_not_a_duplicate():
    rewards, _ = run([("x", exposure("r1", 0)), ("x", exposure("r1", 0, visitor="u2")),
                      ("c", [click(1, "i1"), tick(40)])])
    assert sorted((r["visitor"], r["reward"]) for r in rewards) == [("u1", 1), ("u2", 0)]


def test_a_request_id_is_new_again_once_the_exposure_watermark_passed_its_window():
    """Duplicates are told while the exposure watermark is within the first one's
    window plus lateness (31 min here); then the id is forgotten and the state is empty."""
    part = PartitionAttribution(CFG)
    part.process_exposure(exposure("r1", 0))
    part.process_exposure(exposure("other", 30.9, visitor="u2"))
    assert part.process_exposure(exposure("r1", 30.9))[0].duplicates == 1
    out, _ = part.process_exposure(exposure("r1", 31))   # its own time moves the watermark
    assert out.duplicates == 0
    part.process_clicks([tick(200)])
    part.process_exposure(exposure("late-enough", 200, experiment=None))
    assert part.taken == {} and part.open == {}


def test_a_changelog_entry_without_request_ids_still_tells_duplicates_of_open_exposures():
    """Entries written before duplicates were told hold no `taken`: the open exposures'
    ids stand in for it."""
    part = PartitionAttribution(CFG)
    old = orjson.dumps({"open": [["r1", "exp", "A", 0, {"i1": 0}]], "clicks": []})
    part.load("u1", old)
    assert part.process_exposure(exposure("r1", 1))[0].duplicates == 1
    assert outcome(part.process_clicks([click(2, "i1")]).rewards) == {"r1": (1, "i1", 0, 2)}


def random_streams(rng: random.Random, n: int = 400):
    """Exposures and clicks of a few visitors, each topic in time order; about one
    exposure in twenty is served again under the same request id a little later."""
    exposures, clicks = [], []
    for k in range(n):
        minute = k * 0.5
        visitor = f"u{rng.randrange(20)}"
        items = tuple(f"i{j}" for j in rng.sample(range(12), 3))
        exposures.append(exposure(f"r{k}", minute, items, visitor=visitor,
                                  experiment=rng.choice(["e1", "e2", None]), arm=rng.choice("AB")))
        if k > 3 and rng.random() < 0.05:
            again = rng.choice(exposures[-4:-1])
            exposures.append({**again, "ts": int(minute * MIN)})
    for k in range(3 * n):
        minute = k * 0.2 + rng.uniform(-0.5, 0.5)  # out of order within the lateness
        clicks.append(click(round(minute, 3), f"i{rng.randrange(12)}", visitor=f"u{rng.randrange(20)}",
                            name=rng.choice(["Product Clicked", "Product Viewed", "Product Viewed"])))
    clicks.append(tick(n * 0.5 + 40))    # closes every window; within the retention
    records = [clicks[i:i + 7] for i in range(0, len(clicks), 7)]
    return exposures, records


def interleave(rng: random.Random, exposures, records):
    steps, i, j = [], 0, 0
    while i < len(exposures) or j < len(records):
        if j == len(records) or (i < len(exposures) and rng.random() < 0.5):
            steps.append(("x", exposures[i]))
            i += 1
        else:
            steps.append(("c", records[j]))
            j += 1
    return steps


def test_rewards_do_not_depend_on_how_the_two_topics_interleave():
    """A restart reads the topics in another interleaving: the rewards must be the same
    (the offline recomputation reads all exposures first, then all clicks)."""
    rng = random.Random(3)
    exposures, records = random_streams(rng)
    reference, _ = run([("x", e) for e in exposures] + [("c", r) for r in records])
    in_experiment = {(e["visitor"], e["request_id"]) for e in exposures if e["experiment"]}
    assert sum(e["experiment"] is not None for e in exposures) > len(in_experiment), \
        "the streams hold duplicates"
    assert len(reference) == len(in_experiment), "every exposure in an experiment is rewarded once"
    assert 0.1 < sum(r["reward"] for r in reference) / len(reference) < 0.9
    for seed in range(20):
        got, _ = run(interleave(random.Random(seed), exposures, records))
        assert sorted(got, key=lambda r: r["request_id"]) == \
            sorted(reference, key=lambda r: r["request_id"]), f"interleaving {seed} differs"


def test_restored_state_continues_exactly_where_it_stopped():
    rng = random.Random(9)
    exposures, records = random_streams(rng)
    steps = interleave(rng, exposures, records)
    reference, _ = run(steps)
    part, got = PartitionAttribution(CFG), []
    entries: dict[bytes, bytes] = {}
    for n, (kind, value) in enumerate(steps):
        out = part.process_exposure(value)[0] if kind == "x" else part.process_clicks(value)
        got += out.rewards
        for key, state in part.take_dirty():
            if state is None:
                entries.pop(key, None)
            else:
                entries[key] = state
        if n % 37 == 0:     # a crash: rebuild from the changelog entries
            meta = part.meta()
            part = PartitionAttribution(CFG, **meta)
            for key, state in entries.items():
                part.load(key.decode(), state)
    assert sorted(got, key=lambda r: r["request_id"]) == sorted(reference, key=lambda r: r["request_id"])
