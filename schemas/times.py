"""Time on the wire: ISO-8601 text in HTTP and on the command line, epoch ms in records."""
from __future__ import annotations

from datetime import datetime, timezone


def iso_to_ms(value: object) -> int:
    """ISO-8601 (with `Z` or an offset; naive means UTC) to epoch milliseconds.

    Raises ValueError for anything else."""
    if not isinstance(value, str):
        raise ValueError(value)
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def ms_to_iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")
