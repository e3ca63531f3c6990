"""Read planning: merge a profile's points into the fewest Modbus requests the device accepts.

A request covers a contiguous range of one table. For holding and input registers the unit is one
16-bit register; for coils and discrete inputs it is one bit (the protocol reads up to 2000 bits in
one request, against 125 registers). The planner's rules, for both units:

- a request never exceeds the protocol limit (125 registers, 2000 bits), nor the device's own limit
  (``limits.max_registers`` / ``limits.max_bits``), unless one point alone is larger than the device
  limit (it is then read alone: a point cannot be split);
- a request never spans more than ``max_gap`` unused registers (bits for coil tables) between two
  of its points;
- a request never touches a range the profile lists in ``limits.failing``; a point that itself lies
  in such a range is read alone (the profile asks for it, so it is tried, but nothing is merged
  with it);
- a request never crosses a *break*: ``(table, address)`` means no request may hold both
  ``address - 1`` and ``address`` (a break inside a point is ignored: a point cannot be split).
  DeviceReader learns breaks from devices that reject a merged request.

Within these rules the greedy sweep below gives the fewest requests: every rule only forbids a
request from growing, so a contiguous run of sorted points that is acceptable stays acceptable when
shortened, and extending each request as far as possible is optimal.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

from edge.profile import Point, Profile

__all__ = ["BIT_TABLES", "PROTOCOL_LIMITS", "Request", "plan", "plan_single"]

#: the most one read request can ask for, per table (Modbus application protocol v1.1b3, 6.1-6.4)
PROTOCOL_LIMITS: dict[str, int] = {"holding": 125, "input": 125, "coil": 2000, "discrete": 2000}
BIT_TABLES = frozenset({"coil", "discrete"})


@dataclass(frozen=True, slots=True)
class Request:
    table: str
    address: int  # wire address
    count: int  # registers, or bits for coil and discrete tables
    points: tuple[str, ...] = field(default=())

    @property
    def last(self) -> int:
        return self.address + self.count - 1


@dataclass(slots=True)
class _Span:
    first: int
    last: int
    name: str
    alone: bool  # never merged with another point (it lies in a failing range)


def _limit(profile: Profile, table: str, max_registers: int | None) -> int:
    if table in BIT_TABLES:
        return min(profile.limits.max_bits, PROTOCOL_LIMITS[table])
    if max_registers is not None:
        if max_registers < 1:
            msg = f"max_registers must be at least 1, got {max_registers}"
            raise ValueError(msg)
        return min(max_registers, PROTOCOL_LIMITS[table])
    return min(profile.limits.max_registers, PROTOCOL_LIMITS[table])


def plan(profile: Profile, points: Iterable[Point] | None = None, *, max_registers: int | None = None,
         max_gap: int | None = None, breaks: Iterable[tuple[str, int]] = frozenset()) -> list[Request]:
    """Group points into the fewest requests the device accepts (see the module doc for the rules).

    max_registers and max_gap override the profile's limits (max_registers is still capped at the
    protocol's 125). breaks are (table, wire address) pairs no request may straddle. Requests come
    out sorted by table name, then address; each lists its points in address order. A point passed
    twice is planned once.
    """
    pts = list(profile.points if points is None else points)
    gap = profile.limits.max_gap if max_gap is None else max_gap
    if gap < 0:
        msg = f"max_gap must not be negative, got {gap}"
        raise ValueError(msg)
    cuts: dict[str, list[int]] = {}
    for table, address in breaks:
        cuts.setdefault(table, []).append(address)
    failing: dict[str, list[tuple[int, int]]] = {}
    for table, f_first, f_last in profile.limits.failing:
        failing.setdefault(table, []).append((min(f_first, f_last), max(f_first, f_last)))

    by_table: dict[str, list[_Span]] = {}
    seen: set[str] = set()
    for p in pts:
        if p.name in seen:
            continue
        seen.add(p.name)
        first = profile.wire(p)
        last = first + p.registers - 1
        in_failing = any(f0 <= last and first <= f1 for f0, f1 in failing.get(p.table, ()))
        by_table.setdefault(p.table, []).append(
            _Span(first, last, p.name, alone=in_failing))

    requests: list[Request] = []
    for table in sorted(by_table):
        spans = sorted(by_table[table], key=lambda s: (s.first, s.last, s.name))
        limit = _limit(profile, table, max_registers)
        table_cuts = sorted(set(cuts.get(table, ())))
        table_failing = failing.get(table, [])
        groups: list[list[_Span]] = []
        cur_first = cur_last = 0
        for span in spans:
            if groups:
                cur = groups[-1]
                new_last = max(cur_last, span.last)
                mergeable = (
                    not span.alone
                    and not cur[0].alone
                    and span.first - cur_last - 1 <= gap
                    and new_last - cur_first + 1 <= limit
                    # a break b between the request so far and this point (one inside a point is moot)
                    and not _any_in(table_cuts, cur_last + 1, span.first)
                    and not any(f0 <= new_last and cur_first <= f1 for f0, f1 in table_failing)
                )
                if mergeable:
                    cur.append(span)
                    cur_last = new_last
                    continue
            groups.append([span])
            cur_first, cur_last = span.first, span.last
        for g in groups:
            first, last = g[0].first, max(s.last for s in g)
            requests.append(Request(table, first, last - first + 1, tuple(s.name for s in g)))
    return requests


def plan_single(profile: Profile, points: Iterable[Point] | None = None) -> list[Request]:
    """One request per point: the baseline the merged plan is measured against."""
    pts = list(profile.points if points is None else points)
    seen: set[str] = set()
    out: list[Request] = []
    for p in sorted(pts, key=lambda p: (p.table, profile.wire(p))):
        if p.name not in seen:
            seen.add(p.name)
            out.append(Request(p.table, profile.wire(p), p.registers, (p.name,)))
    return out


def _any_in(sorted_values: list[int], lo: int, hi: int) -> bool:
    """Whether any value lies in lo..hi (inclusive)."""
    if lo > hi:
        return False
    i = bisect.bisect_left(sorted_values, lo)
    return i < len(sorted_values) and sorted_values[i] <= hi
