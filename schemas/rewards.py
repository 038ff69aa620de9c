"""The `rewards` topic: one record per experiment exposure, keyed by experiment id.

Written by the attribution processor (streams/attribution.py) exactly once per
exposure that carries an experiment: `reward` 1 when the visitor clicked a
shown item within the attribution window after the exposure, 0 when the window
closed without such a click. Read by the bandits processor. Times are epoch
milliseconds, UTC.
"""
from __future__ import annotations

from typing import Literal, TypedDict

SCHEMA_VERSION = 1


class Reward(TypedDict):
    v: int                      # SCHEMA_VERSION
    request_id: str             # the exposure's request id
    experiment: str             # the record key
    arm: str
    visitor: str
    reward: Literal[0, 1]
    exposure_ts: int            # the exposure's event time
    reward_ts: int              # the click's event time (1), the window's end (0)
    item: str | None            # the clicked item (null for 0)
    position: int | None        # its 0-based position in the exposure (null for 0)
