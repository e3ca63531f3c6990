"""Time ranges in requests: `from`/`to` as a date, an ISO time or epoch ms, within 2000..2100.

`parse_range` for the endpoints of this package; `bounded_times` as a dependency of routers that parse
`from`/`to` themselves, so a time past 2100 or before 2000 is a 400, not a database or calendar error.
"""

from __future__ import annotations

from zoneinfo import ZoneInfo

from fastapi import HTTPException, Request

from collector.balance.timegrid import TimeRangeError, parse_time

__all__ = ["EARLIEST_MS", "LATEST_MS", "bounded_times", "parse_range"]

EARLIEST_MS, LATEST_MS = 946_684_800_000, 4_102_444_800_000  # 2000-01-01 .. 2100-01-01, as telemetry allows
_DAY = 86_400_000
_UTC = ZoneInfo("UTC")
_OUTSIDE = "times must lie between 2000-01-01 and 2100-01-01"


def parse_range(start: str, end: str, tz: ZoneInfo, max_days: int) -> tuple[int, int]:
    """[from, to) in epoch ms, or a 400 that says what is wrong."""
    try:
        a, b = parse_time(start, tz), parse_time(end, tz)
    except (TimeRangeError, ValueError, OverflowError) as err:
        raise HTTPException(400, str(err) if isinstance(err, TimeRangeError) else f"unusable time: {err}") from None
    if not (EARLIEST_MS <= a <= LATEST_MS and EARLIEST_MS <= b <= LATEST_MS):
        raise HTTPException(400, _OUTSIDE)
    if b <= a:
        raise HTTPException(400, f"empty range: 'to' ({end}) must be after 'from' ({start})")
    if b - a > max_days * _DAY:
        raise HTTPException(400, f"range too long: at most {max_days} days per request")
    return a, b


async def bounded_times(request: Request) -> None:
    """400 when `from` or `to` is readable but outside 2000..2100 (give or take a day for time zones);
    unreadable ones are left to the endpoint, which says what forms it takes."""
    for name in ("from", "to"):
        text = request.query_params.get(name)
        if text is None:
            continue
        ms = None
        for candidate in (text, text[:10]):  # the date alone when the whole cannot be placed on the calendar
            try:
                ms = parse_time(candidate, _UTC)
                break
            except (TimeRangeError, ValueError, OverflowError):
                continue
        if ms is None:
            continue
        if not EARLIEST_MS - _DAY <= ms <= LATEST_MS + _DAY:
            raise HTTPException(400, f"{name!r}: {_OUTSIDE}")
