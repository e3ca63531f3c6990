"""What every commissioning command shares: eager reads through a line's arbiter, a snapshot of a
device's registers, the plausibility of a value, and the pass/warn/fail vocabulary of the reports."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from edge.modbus import DeviceError, LineDown, ModbusExceptionReply, ModbusLine, ReadTimeout
from edge.planner import plan
from edge.profile import Point, Profile

__all__ = [
    "TINY_FLOAT", "EagerLine", "Finding", "Snapshot", "Status", "decode_point", "identify", "judge",
    "read_snapshot", "worst",
]

Status = Literal["pass", "warn", "fail", "skip"]
_RANK = {"skip": 0, "pass": 1, "warn": 2, "fail": 3}

#: a non-zero float below this (in the point's unit) is almost always two registers read in the wrong
#: order: the low word of 230.2 V lands in the exponent and gives 4e-8 V
TINY_FLOAT = 1e-6


def worst(statuses: Iterable[Status]) -> Status:
    out: Status = "pass"
    for s in statuses:
        if _RANK[s] > _RANK[out]:
            out = s
    return out


@dataclass
class Finding:
    """One conclusion about a device, a connection or the gateway, with the fix to try."""

    status: Status
    message: str
    fix: str = ""


class EagerLine:
    """A ModbusLine seen by a commissioning command: every read is sent, even while the device backs off.

    The reads still queue in the line's FIFO like any poll, so a scan or probe shares the bus with a
    running poller without ever putting two requests on the wire at once.
    """

    def __init__(self, line: ModbusLine) -> None:
        self.line = line

    async def read(self, unit_id: int, table: str, address: int, count: int, *,
                   ignore_backoff: bool = True) -> list[int]:
        return await self.line.read(unit_id, table, address, count, ignore_backoff=True)


@dataclass
class Snapshot:
    """A device's registers and what they decode to, as read once."""

    words: dict[str, dict[int, int]] = field(default_factory=dict)  # {table: {wire address: word}}
    raw: dict[str, int | float | str | None] = field(default_factory=dict)  # before scaling
    values: dict[str, float | str | None] = field(default_factory=dict)  # engineering values
    errors: dict[str, DeviceError] = field(default_factory=dict)
    requests: int = 0
    silent: DeviceError | None = None  # the device (or line) did not answer at all
    #: set when an extra (diagnostic) read went unanswered: send no more, each would cost a timeout
    stop_extra_reads: bool = False

    def point_words(self, profile: Profile, p: Point) -> list[int] | None:
        table = self.words.get(p.table, {})
        base = profile.wire(p)
        try:
            return [table[base + i] for i in range(p.registers)]
        except KeyError:
            return None


async def read_snapshot(line: ModbusLine | EagerLine, profile: Profile, unit_id: int,
                        points: Sequence[Point] | None = None) -> Snapshot:
    """Read points (all by default, plus the scale factors they need) with the fewest requests.

    A merged request the device refuses is read point by point; a device that does not answer ends
    the read at once (the remaining points carry that error).
    """
    eager = line if isinstance(line, EagerLine) else EagerLine(line)
    wanted = profile.with_scale_factors(points if points is not None else profile.points)
    snap = Snapshot()

    async def fetch(table: str, address: int, count: int, names: Sequence[str]) -> bool:
        """Read one request into snap; False when the device is silent (stop reading)."""
        try:
            words = await eager.read(unit_id, table, address, count)
        except (ReadTimeout, LineDown) as err:
            snap.requests += int(err.sent)
            snap.silent = err
            return False
        except ModbusExceptionReply as err:
            snap.requests += 1
            if len(names) > 1:
                for name in names:
                    p = profile.by_name[name]
                    if not await fetch(p.table, profile.wire(p), p.registers, [name]):
                        return False
                return True
            snap.errors[names[0]] = err
            return True
        except DeviceError as err:
            snap.requests += 1
            for name in names:
                snap.errors[name] = err
            return True
        snap.requests += 1
        t = snap.words.setdefault(table, {})
        for i, w in enumerate(words):
            t[address + i] = w
        return True

    for req in plan(profile, wanted):
        if not await fetch(req.table, req.address, req.count, req.points):
            break
    for p in wanted:
        if p.name in snap.errors:
            continue
        words = snap.point_words(profile, p)
        if words is None:
            snap.errors[p.name] = snap.silent or DeviceError(f"{p.name}: registers not read")
            continue
        try:
            snap.raw[p.name] = profile.decode_raw(p, words)
        except (ValueError, TypeError) as err:
            snap.errors[p.name] = DeviceError(f"{p.name}: cannot decode {words}: {err}")
    for p in wanted:
        if p.name not in snap.raw:
            continue
        if p.scale_register and p.scale_register in snap.errors:
            snap.errors[p.name] = snap.errors[p.scale_register]
            continue
        snap.values[p.name] = profile.engineering(p, snap.raw[p.name], snap.raw)
    return snap


def decode_point(profile: Profile, p: Point, words: list[int], raw: dict[str, int | float | str | None], *,
                 reverse_words: bool = False) -> float | str | None:
    """A point's engineering value from its own words; reverse_words decodes with the other word order."""
    w = list(reversed(words)) if reverse_words else list(words)
    try:
        value = profile.decode_raw(p, w)
    except (ValueError, TypeError):
        return None
    return profile.engineering(p, value, raw)


Verdict = Literal["ok", "out_of_range", "tiny", "not_implemented", "unchecked", "text"]


def judge(p: Point, value: float | str | None) -> Verdict:
    """Is a decoded value plausible for its point?"""
    if value is None:
        return "not_implemented"
    if isinstance(value, str):
        return "text"
    if not math.isfinite(value):
        return "out_of_range"
    if p.range is None:
        return "unchecked"
    lo, hi = p.range
    if value < lo or value > hi:
        return "out_of_range"
    if p.type in ("f32", "f64") and value != 0 and abs(value) < TINY_FLOAT:
        return "tiny"
    return "ok"


def identify(profile: Profile, values: dict[str, float | str | None]) -> tuple[bool | None, list[str]]:
    """Check a profile's identification rules: (True/False, what was seen), or (None, []) without rules."""
    if not profile.identification:
        return None, []
    seen: list[str] = []
    ok = True
    for rule in profile.identification:
        got = values.get(rule.point)
        wanted = [rule.equals] if rule.one_of is None else list(rule.one_of)
        match = got is not None and any(_same(got, w) for w in wanted if w is not None)
        want = _show(wanted[0]) if len(wanted) == 1 else "one of " + ", ".join(_show(w) for w in wanted)
        seen.append(f"{rule.point} = {_show(got)} (expected {want})")
        ok = ok and match
    return ok, seen


def _same(got: float | str, want: float | str) -> bool:
    if isinstance(want, str) or isinstance(got, str):
        return str(got).strip() == str(want).strip()
    return math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=1e-9)


def _show(v: float | str | None) -> str:
    if isinstance(v, int | float) and not isinstance(v, bool) and float(v).is_integer():
        return str(int(v))
    return repr(v) if isinstance(v, str) else str(v)
