"""Interval quantities of points that only offer a power or a flow: the positive part of the rate,
straight between readings, integrated over each 15-minute interval. Always flagged `estimated`;
`interpolated` where a step between readings is longer than the gap limit; samples above the point's
rating are clipped to it (`capped`).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from collector.balance.counters import IntervalValue
from collector.balance.spec import SeriesSpec
from collector.balance.timegrid import INTERVAL_MS

__all__ = ["rate_intervals"]

_MS_PER_H = 3_600_000


def _positive_area(t0: int, r0: float, t1: int, r1: float) -> float:
    """∫ max(0, r) over [t0, t1] for r linear from r0 to r1, in rate × hours."""
    dt = (t1 - t0) / _MS_PER_H
    if r0 >= 0 and r1 >= 0:
        return (r0 + r1) / 2 * dt
    if r0 <= 0 and r1 <= 0:
        return 0.0
    hi = max(r0, r1)
    return hi * (hi / (hi - min(r0, r1))) * dt / 2


def rate_intervals(readings: Sequence[tuple[int, float]], spec: SeriesSpec, starts: Sequence[int]) -> list[IntervalValue]:
    """Quantities (rate unit × hour) of one rate point in the given consecutive 15-minute intervals."""
    by_t: dict[int, float] = {}
    for t, v in readings:
        by_t[int(t)] = float(v)
    pts = sorted(by_t.items())
    times = [t for t, _ in pts]
    out: list[IntervalValue] = []
    for s in starts:
        e = s + INTERVAL_MS
        flags = {"estimated"}
        if not pts or pts[0][0] > s or pts[-1][0] < e:
            out.append(IntervalValue(s, None, frozenset(flags)))
            continue
        total = 0.0
        for i in range(max(0, bisect_right(times, s) - 1), len(pts) - 1):
            (ta, ra), (tb, rb) = pts[i], pts[i + 1]
            if ta >= e:
                break
            if tb <= s:
                continue
            if spec.rated is not None:
                if max(ra, rb) > spec.rated:
                    flags.add("capped")
                ra, rb = min(ra, spec.rated), min(rb, spec.rated)
            if tb - ta > spec.gap_ms:
                flags.add("interpolated")
            a, b = max(ta, s), min(tb, e)
            ra_, rb_ = ra + (rb - ra) * (a - ta) / (tb - ta), ra + (rb - ra) * (b - ta) / (tb - ta)
            total += _positive_area(a, ra_, b, rb_)
        out.append(IntervalValue(s, total, frozenset(flags)))
    return out
