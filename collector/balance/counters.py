"""Interval quantities from cumulative counters: the counter's readings become a monotone curve C(t) of
what the meter really counted (resets, rollovers, glitches and meter replacements taken out, every step
capped by a plausibility limit), and an interval's quantity is C(end) − C(start), each boundary value
read off the curve (linear between the readings around it).

Rules (docs/balance.md, "Counters"):
- a step between two readings is plausible when −tolerance ≤ Δ ≤ rated × Δt × 1.1 + 2 × resolution;
- an implausible step followed, within three readings, by one that is plausible again from the last good
  reading was a glitch: the readings in between are dropped (`spike`); a reading above both neighbours
  that the next reading undercuts is dropped too;
- a persistent rise above the cap counts the cap (`capped`); a persistent fall is a rollover when the
  register's modulus explains it (`rollover`), a reset when the counter fell below a tenth of its value
  (counted from zero, capped: `reset`), and otherwise adds nothing and moves the baseline (`drop`);
- a meter change record splits the readings at its time: the old meter counts up to its final reading,
  the new one from its initial reading (`meter_change`);
- a boundary read off a straight line between readings further apart than the gap limit is `interpolated`.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

from collector.balance.spec import SeriesSpec
from collector.balance.timegrid import INTERVAL_MS

__all__ = ["FLAGS", "Curve", "IntervalValue", "counter_curve", "counter_intervals", "evaluate"]

#: every flag an interval value can carry, in the order they are reported
FLAGS = ("estimated", "interpolated", "capped", "reset", "rollover", "meter_change", "spike", "drop")
_LOOKAHEAD = 3
_CAP_MARGIN = 1.1
_RESET_FRACTION = 0.1


@dataclass(frozen=True)
class IntervalValue:
    """One series' quantity in one 15-minute interval, in the series' native unit; None = missing."""

    start: int
    value: float | None
    flags: frozenset[str]


@dataclass
class Curve:
    """The cumulative curve: knot times (ms), cumulative quantity at each knot, and events (t0, t1, flag)."""

    t: list[int]
    c: list[float]
    events: list[tuple[int, int, str]]


class _Limits:
    def __init__(self, spec: SeriesSpec) -> None:
        self.rated = spec.rated
        self.abs_res = spec.abs_res
        self.rel_res = spec.rel_res
        self.modulus = spec.modulus

    def tol(self, v: float) -> float:
        return self.abs_res + self.rel_res * abs(v)

    def cap(self, dt_ms: int, v: float) -> float:
        if self.rated is None:
            return math.inf
        return self.rated * dt_ms / 3_600_000 * _CAP_MARGIN + 2 * self.tol(v)

    def plausible(self, v0: float, t0: int, v1: float, t1: int) -> bool:
        d = v1 - v0
        return -self.tol(v0) <= d <= self.cap(t1 - t0, v1)

    def rollover(self, v0: float, t0: int, v1: float, t1: int) -> bool:
        m = self.modulus
        if m is None:
            return False
        if self.rated is None:
            return v0 >= 0.9 * m and 0 <= v1 <= 0.1 * m
        return 0 <= v1 - v0 + m <= self.cap(t1 - t0, v1)


def _segment(readings: Sequence[tuple[int, float, bool]], lim: _Limits, c0: float, curve: Curve) -> float:
    """Append one meter identity's readings (t, value, real) to the curve, starting at cumulative c0."""
    kept: list[tuple[int, float, bool]] = [readings[0]]  # (t, baseline value, real)
    curve.t.append(readings[0][0])
    curve.c.append(c0)
    n = len(readings)
    i = 1
    while i < n:
        t, v, real = readings[i]
        bt, bv, _ = kept[-1]
        c = curve.c[-1]
        if lim.plausible(bv, bt, v, t):
            # a reading above both neighbours that the next one undercuts is a glitch (counters never fall)
            if real and i + 1 < n:
                t2, v2, _ = readings[i + 1]
                if v2 < v - lim.tol(v) and lim.plausible(bv, bt, v2, t2) and not _returns(readings, i + 1, v, lim):
                    curve.events.append((bt, t2, "spike"))
                    i += 1
                    continue
            kept.append((t, max(bv, v), real))
            curve.t.append(t)
            curve.c.append(c + max(0.0, v - bv))
            i += 1
            continue
        if real:
            j = next((j for j in range(i + 1, min(n, i + 1 + _LOOKAHEAD))
                      if lim.plausible(bv, bt, readings[j][1], readings[j][0])), None)
            if j is not None:  # readings i..j-1 were glitches
                curve.events.append((bt, readings[j][0], "spike"))
                i = j
                continue
            if v < bv and len(kept) >= 2 and kept[-1][2] and lim.plausible(kept[-2][1], kept[-2][0], v, t):
                # the last reading we kept was the odd one out (a glitch up within the cap): take it back
                kept.pop()
                curve.t.pop()
                curve.c.pop()
                curve.events.append((kept[-1][0], t, "spike"))
                continue
        d = v - bv
        cap = lim.cap(t - bt, v)
        if d > cap:
            inc, flag = cap, "capped"
        elif lim.rollover(bv, bt, v, t):
            assert lim.modulus is not None
            inc, flag = d + lim.modulus, "rollover"
        elif v < _RESET_FRACTION * bv:
            inc, flag = min(max(v, 0.0), cap), "reset"
        else:
            inc, flag = 0.0, "drop"
        curve.events.append((bt, t, flag))
        kept.append((t, v, real))
        curve.t.append(t)
        curve.c.append(c + inc)
        i += 1
    return curve.c[-1]


def _returns(readings: Sequence[tuple[int, float, bool]], start: int, v: float, lim: _Limits) -> bool:
    """Whether a reading within the lookahead from `start` is back at v or above (then `start` is the glitch)."""
    return any(readings[j][1] >= v - lim.tol(v) for j in range(start + 1, min(len(readings), start + 1 + _LOOKAHEAD)))


def counter_curve(readings: Sequence[tuple[int, float]], spec: SeriesSpec,
                  changes: Sequence[tuple[int, float, float]] = ()) -> Curve:
    """The cumulative curve of a counter's readings (sorted or not; the last value of a repeated time wins)."""
    by_t: dict[int, float] = {}
    for t, v in readings:
        by_t[int(t)] = float(v)
    pts = sorted(by_t.items())
    curve = Curve([], [], [])
    if not pts:
        return curve
    # split at meter changes; the old meter ends with its final reading, the new one starts with its initial
    segments: list[list[tuple[int, float, bool]]] = [[]]
    ci = 0
    for t, v in pts:
        while ci < len(changes) and t >= changes[ci][0]:
            tc, old, new = changes[ci]
            segments[-1].append((tc, old, False))
            segments.append([(tc, new, False)])
            ci += 1
        segments[-1].append((t, v, True))
    while segments and not any(r for _, _, r in segments[0]):
        segments.pop(0)  # changes before the first reading
    lim = _Limits(spec)
    c = 0.0
    for k, seg in enumerate(segments):
        real = [t for t, _, r in seg if r]
        if k > 0:
            tc = seg[0][0]
            before = next((t for t, _, r in reversed(segments[k - 1]) if r), tc)
            after = real[0] if real else tc
            curve.events.append((before, tc, "meter_change"))
            curve.events.append((tc, after, "meter_change"))
        c = _segment(seg, lim, c, curve)
    return curve


def evaluate(curve: Curve, starts: Sequence[int], gap_ms: int) -> list[IntervalValue]:
    """C(end) − C(start) for each 15-minute interval; missing where the curve does not reach a boundary."""
    if not starts:
        return []
    kt, kc = curve.t, curve.c

    def at(b: int) -> tuple[float | None, bool]:
        i = bisect_right(kt, b) - 1
        if i < 0:
            return None, False
        if kt[i] == b:
            return kc[i], False
        if i + 1 >= len(kt):
            return None, False
        t0, t1 = kt[i], kt[i + 1]
        return kc[i] + (kc[i + 1] - kc[i]) * (b - t0) / (t1 - t0), t1 - t0 > gap_ms

    bounds = [at(s) for s in starts] + [at(starts[-1] + INTERVAL_MS)]
    flags: list[set[str]] = [set() for _ in starts]
    first = starts[0]
    for t0, t1, flag in curve.events:
        k0 = max(0, (t0 - first) // INTERVAL_MS)
        k1 = min(len(starts) - 1, (t1 - 1 - first) // INTERVAL_MS) if t1 > t0 else k0
        for k in range(int(k0), int(k1) + 1):
            if t0 < starts[k] + INTERVAL_MS and (t1 > starts[k] or t1 == t0 == starts[k]):
                flags[k].add(flag)
    out = []
    for k, s in enumerate(starts):
        (c0, i0), (c1, i1) = bounds[k], bounds[k + 1]
        if c0 is None or c1 is None:
            out.append(IntervalValue(s, None, frozenset(flags[k])))
            continue
        if i0 or i1:
            flags[k].add("interpolated")
        out.append(IntervalValue(s, c1 - c0, frozenset(flags[k])))
    return out


def counter_intervals(readings: Sequence[tuple[int, float]], spec: SeriesSpec, starts: Sequence[int],
                      changes: Sequence[tuple[int, float, float]] = ()) -> list[IntervalValue]:
    """Quantities of one counter in the given consecutive 15-minute intervals, in its native unit."""
    return evaluate(counter_curve(readings, spec, changes), starts, spec.gap_ms)
