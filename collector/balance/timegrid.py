"""The balance's time grid: 15-minute intervals (UTC-aligned), and hours, days and months in the cell's
local time. Timestamps are UTC milliseconds; an interval or period is named by its start.

Every real time zone's offset is a multiple of 15 minutes, so 15-minute intervals start at the same
instants in UTC and in local time; hours, days and months start at local boundaries (a day has 23 or
25 hours when the clocks change).
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

__all__ = [
    "INTERVAL_MS", "PERIODS", "Period", "TimeRangeError", "ceil_interval", "floor_interval", "intervals",
    "parse_time", "period_end", "period_start", "period_starts",
]

INTERVAL_MS = 15 * 60 * 1000
Period = Literal["15m", "1h", "1d", "1mo"]
PERIODS: tuple[Period, ...] = ("15m", "1h", "1d", "1mo")


class TimeRangeError(ValueError):
    """A time or a range the caller gave is unusable; the message says why."""


def floor_interval(ts_ms: int) -> int:
    return ts_ms - ts_ms % INTERVAL_MS


def ceil_interval(ts_ms: int) -> int:
    return -(-ts_ms // INTERVAL_MS) * INTERVAL_MS


def intervals(start_ms: int, end_ms: int) -> list[int]:
    """Starts of the 15-minute intervals covering [start, end) (start floored, end ceiled)."""
    return list(range(floor_interval(start_ms), ceil_interval(end_ms), INTERVAL_MS))


def _ms(dt: datetime) -> int:
    return int(round(dt.timestamp() * 1000))


def _local(ts_ms: int, tz: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).astimezone(tz)


def _at_local(d: date, tz: ZoneInfo, hour: int = 0) -> int:
    """UTC ms of a local wall-clock time (the first of two, when the clocks go back)."""
    return _ms(datetime(d.year, d.month, d.day, hour, tzinfo=tz))


def period_start(ts_ms: int, period: Period, tz: ZoneInfo) -> int:
    """Start of the period containing ts."""
    if period == "15m":
        return floor_interval(ts_ms)
    if period == "1h":
        # local hours: UTC hours unless the offset has minutes (India, Nepal); the offset may change within
        # a day, so use the instant's own offset
        local = _local(ts_ms, tz)
        return _ms(local.replace(minute=0, second=0, microsecond=0))
    local = _local(ts_ms, tz)
    if period == "1d":
        return _at_local(local.date(), tz)
    return _at_local(local.date().replace(day=1), tz)


def period_end(start_ms: int, period: Period, tz: ZoneInfo) -> int:
    """End (exclusive) of the period starting at start_ms."""
    if period == "15m":
        return start_ms + INTERVAL_MS
    if period == "1h":
        return start_ms + 3_600_000
    local = _local(start_ms, tz).date()
    if period == "1d":
        return _at_local(local + timedelta(days=1), tz)
    nxt = date(local.year + (local.month == 12), local.month % 12 + 1, 1)
    return _at_local(nxt, tz)


def period_starts(start_ms: int, end_ms: int, period: Period, tz: ZoneInfo) -> list[int]:
    """Starts of the periods that overlap [start, end)."""
    out: list[int] = []
    t = period_start(start_ms, period, tz)
    while t < end_ms:
        out.append(t)
        t = period_end(t, period, tz)
    return out


_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_time(text: str, tz: ZoneInfo) -> int:
    """UTC ms of a date (local midnight), an ISO 8601 time (local when it has no offset) or epoch ms."""
    s = text.strip()
    if s.isdigit():
        return int(s)
    try:
        if _DATE.match(s):
            return _at_local(date.fromisoformat(s), tz)
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        msg = f"{text!r} is not a time: give a date (2026-11-01), an ISO time (2026-11-01T06:00+01:00) or epoch ms"
        raise TimeRangeError(msg) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=tz)
    return _ms(dt)
