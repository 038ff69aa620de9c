"""A throughput meter: events counted, first and last event seen (monotonic seconds)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Meter:
    events: int = 0
    first: float | None = None
    last: float | None = None
    reported: int = 0

    def update(self, n: int, now: float) -> None:
        if self.first is None:
            self.first = now
        self.events += n
        self.last = now

    def report(self) -> str | None:
        """A progress line when something changed since the last one, else None."""
        if self.events == self.reported or self.first is None:
            return None
        self.reported = self.events
        span = (self.last or self.first) - self.first
        rate = self.events / span if span > 0 else 0.0
        return f"progress events={self.events} span_s={span:.3f} eps={rate:.0f}"
