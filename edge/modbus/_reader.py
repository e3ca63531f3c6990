"""Read a whole device through its profile with the fewest requests: the one read path of the gateway's
poller and of every commissioning command (scan, probe, verify).

The planner (edge/planner.py) groups the points into requests, the line's arbiter sends them, and the
profile decodes the words (Profile.decode_points).

A device that rejects a merged request (exception 2, 3 or 4: it lacks a register in a gap, or will
not give that many at once) gets the request cut in two, at its widest gap (or in the middle when
there is none); both parts are read, recursively, and a *break* is remembered where the request
was cut, so the next plan never merges across it. The device pays the search once (at most 2n-1
requests for a request of n points, usually far fewer); later reads use the split plan and see no
exception. For exception 4, which a failing device also answers to
everything, a break is only remembered when some part of the split was read successfully.

A device that does not answer (timeout, line down, backing off) ends the read at once: the
remaining requests are not sent and their points carry the same error, so a dead device costs one
timeout per read, and none while its line backs it off.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from edge.modbus._errors import SPLIT_CODES, DeviceError, LineDown, ModbusExceptionReply, ReadTimeout
from edge.modbus._line import ModbusLine
from edge.planner import Request, plan
from edge.profile import Point, Profile

__all__ = ["DeviceReader", "ReadResult"]


@dataclass
class ReadResult:
    values: dict[str, float | str | None] = field(default_factory=dict)
    errors: dict[str, DeviceError] = field(default_factory=dict)  # point name -> why it is missing
    requests: int = 0  # requests sent on the wire for this read
    rejected: int = 0  # merged requests the device refused (each was split)
    words: dict[str, dict[int, int]] = field(default_factory=dict)  # what was read, {table: {wire address: word}}
    raw: dict[str, int | float | str | None] = field(default_factory=dict)  # decoded values before scaling
    silent: DeviceError | None = None  # set when the device (or its line) stopped answering during the read

    @property
    def ok(self) -> bool:
        return not self.errors

    def point_words(self, profile: Profile, p: Point) -> list[int] | None:
        """The point's own words as read, or None when they were not all read."""
        table = self.words.get(p.table, {})
        base = profile.wire(p)
        try:
            return [table[base + i] for i in range(p.registers)]
        except KeyError:
            return None


class DeviceReader:
    """Reads a device's points; when the device rejects a merged request it splits and remembers."""

    def __init__(self, line: ModbusLine, profile: Profile, unit_id: int, *, max_registers: int | None = None,
                 max_gap: int | None = None, ignore_backoff: bool = False) -> None:
        self.line = line
        #: send every request even while the device backs off (commissioning: someone is waiting for the answer)
        self.ignore_backoff = ignore_backoff
        self.profile = profile
        self.unit_id = unit_id
        self.max_registers = max_registers
        self.max_gap = max_gap
        self._breaks: set[tuple[str, int]] = set()
        self._plans: dict[tuple[str, ...], list[Request]] = {}
        self._successes = 0

    @property
    def breaks(self) -> frozenset[tuple[str, int]]:
        """(table, wire address) pairs learnt from this device: no request straddles them."""
        return frozenset(self._breaks)

    def learn(self, breaks: Iterable[tuple[str, int]]) -> None:
        """Add breaks (for example saved from an earlier run)."""
        before = len(self._breaks)
        self._breaks.update((str(t), int(a)) for t, a in breaks)
        if len(self._breaks) != before:
            self._plans.clear()

    def forget(self) -> None:
        """Drop what was learnt (after a firmware update, say)."""
        self._breaks.clear()
        self._plans.clear()

    def plan_for(self, points: Sequence[Point]) -> list[Request]:
        key = tuple(p.name for p in points)
        cached = self._plans.get(key)
        if cached is None:
            cached = self._plans[key] = plan(self.profile, points, max_registers=self.max_registers,
                                             max_gap=self.max_gap, breaks=frozenset(self._breaks))
        return cached

    def _wanted(self, points: Iterable[Point | str] | None) -> list[Point]:
        if points is None:
            wanted = list(self.profile.points)
        else:
            wanted = []
            for p in points:
                if isinstance(p, str):
                    if p not in self.profile.by_name:
                        msg = f"profile {self.profile.id} has no point {p!r}"
                        raise KeyError(msg)
                    p = self.profile.by_name[p]
                wanted.append(p)
        return self.profile.with_scale_factors(wanted)

    async def read(self, points: Iterable[Point | str] | None = None) -> ReadResult:
        """Read the points (all by default; Point objects or names) and decode them through the profile."""
        wanted = self._wanted(points)
        result = ReadResult()
        for req in self.plan_for(wanted):
            result.silent = await self._fetch(req, result)
            if result.silent is not None:
                break
        decoded = self.profile.decode_points(result.words, [p for p in wanted if p.name not in result.errors])
        for name in decoded.missing:
            result.errors[name] = result.silent or DeviceError(f"{name}: registers not read")
        for name, why in decoded.undecodable.items():
            result.errors[name] = DeviceError(why)
        for name, sf in decoded.unscaled.items():
            result.errors[name] = result.errors[sf]
        result.raw.update(decoded.raw)
        result.values.update(decoded.values)
        return result

    async def _fetch(self, req: Request, result: ReadResult) -> DeviceError | None:
        """Read one request, bisecting it when the device rejects it.

        Returns the error that ends the whole read (device silent, line down), else None.
        """
        try:
            regs = await self.line.read(self.unit_id, req.table, req.address, req.count,
                                        ignore_backoff=self.ignore_backoff)
        except (ReadTimeout, LineDown) as err:  # the device or the line is silent: stop here
            result.requests += int(err.sent)
            return err
        except ModbusExceptionReply as err:
            result.requests += 1
            if err.code in SPLIT_CODES and len(req.points) > 1:
                result.rejected += 1
                left, right = self._halves(req)
                before = self._successes
                for half in (left, right):
                    fatal = await self._fetch(half, result)
                    if fatal is not None:
                        return fatal
                if err.code != 4 or self._successes > before:
                    self._breaks.add((req.table, right.address))
                    self._plans.clear()
                return None
            for name in req.points:
                result.errors[name] = err
            return None
        except DeviceError as err:
            result.requests += 1
            for name in req.points:
                result.errors[name] = err
            return None
        result.requests += 1
        self._successes += 1
        table = result.words.setdefault(req.table, {})
        for i, w in enumerate(regs):
            table[req.address + i] = w
        return None

    def _halves(self, req: Request) -> tuple[Request, Request]:
        """Cut a rejected request in two: at its widest gap (where a hole in the device's map is
        likeliest), or, with no gaps (the device refuses the size), nearest the middle."""
        wire = self.profile.wire
        pts = sorted((self.profile.by_name[n] for n in req.points), key=lambda p: (wire(p), p.name))
        middle = req.address + req.count / 2

        def score(i: int) -> tuple[int, float]:
            reach = max(wire(p) + p.registers for p in pts[:i])
            return wire(pts[i]) - reach, -abs(wire(pts[i]) - middle)

        cut = max(range(1, len(pts)), key=score)
        return self._request(req.table, pts[:cut]), self._request(req.table, pts[cut:])

    def _request(self, table: str, pts: list[Point]) -> Request:
        first = min(self.profile.wire(p) for p in pts)
        last = max(self.profile.wire(p) + p.registers - 1 for p in pts)
        return Request(table, first, last - first + 1, tuple(p.name for p in pts))
