"""Arm data: conversions out of users, the sufficient statistic of a binary metric.

Reports quote rates, so an arm is written `RATE_OR_CONVERSIONS:USERS`: a value
with a decimal point is a rate (`0.07:1062` is 74 conversions, the rate times
the users rounded to the nearest integer), an integer is a count (`74:1062`,
`1:50`). Anything else is refused with the reason.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from services.experiments import ExperimentError

_INT = re.compile(r"[0-9]+")
_RATE = re.compile(r"[0-9]*\.[0-9]*")


class InputError(ExperimentError):
    """An arm written in a way that cannot be read."""


@dataclass(frozen=True, slots=True)
class Arm:
    """`conversions` of `users` converted. Arms merge with `+` (daily slices add up)."""
    conversions: int
    users: int

    def __post_init__(self) -> None:
        if self.users < 0 or self.conversions < 0:
            raise InputError(f"counts must not be negative (got {self.conversions}:{self.users})")
        if self.conversions > self.users:
            raise InputError(f"{self.conversions} conversions out of {self.users} users: "
                             "conversions cannot exceed users")

    def __add__(self, other: Arm) -> Arm:
        return Arm(self.conversions + other.conversions, self.users + other.users)

    @property
    def rate(self) -> float:
        """The conversion rate; 0 for an empty arm (neutral, never a division error)."""
        return self.conversions / self.users if self.users else 0.0


def parse_arm(text: str) -> Arm:
    """`0.07:1062` (a rate) or `74:1062` (a count) -> Arm(74, 1062)."""
    raw = text.strip()
    value, sep, users_text = raw.partition(":")
    value, users_text = value.strip(), users_text.strip()
    if not sep or not value or not users_text:
        raise InputError(f"{text!r}: expected RATE_OR_CONVERSIONS:USERS, e.g. 0.07:1062 or 74:1062")
    if not _INT.fullmatch(users_text):
        raise InputError(f"{text!r}: USERS must be a whole number of users, got {users_text!r}")
    users = int(users_text)
    if users == 0:
        raise InputError(f"{text!r}: USERS must be at least 1")
    if _INT.fullmatch(value):
        return Arm(int(value), users)
    if _RATE.fullmatch(value) and value != ".":
        rate = float(value)
        if not 0.0 <= rate <= 1.0:
            raise InputError(f"{text!r}: a rate must be between 0 and 1 (write 7% as 0.07), got {value}")
        # Half up, not Python's half-to-even: 0.5 of a user rounds the same way in every report.
        return Arm(int(math.floor(rate * users + 0.5)), users)
    raise InputError(f"{text!r}: {value!r} is neither a count of conversions (an integer) nor a "
                     "rate (a number with a decimal point, e.g. 0.07)")
