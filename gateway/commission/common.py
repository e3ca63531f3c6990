"""What every commissioning command shares: eager reads through a line's arbiter (and the gateway's
DeviceReader over them), the plausibility of a value, and the pass/warn/fail vocabulary of the reports."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from edge.modbus import DeviceReader, ModbusLine
from edge.profile import Point, Profile

__all__ = [
    "TINY_FLOAT", "EagerLine", "Finding", "Status", "decode_point", "eager_reader", "fmt_number", "fmt_value",
    "identify", "judge", "worst",
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


def eager_reader(line: ModbusLine | EagerLine, profile: Profile, unit_id: int) -> DeviceReader:
    """The gateway's DeviceReader for a commissioning command: the same plan, the same split of a rejected
    merged request (and the breaks it learns), the same decoding; only every read is sent, even while the
    device backs off."""
    base = line.line if isinstance(line, EagerLine) else line
    return DeviceReader(base, profile, unit_id, ignore_backoff=True)


def fmt_number(v: float) -> str:
    """A reading as people read it: whole numbers without a point, six significant digits, very small
    and very large ones in exponent form."""
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e9):
        return f"{v:.4g}"
    return f"{v:.6g}"


def fmt_value(v: float | str | None) -> str:
    """A value in a finding or a hint: n/a when there is none, text quoted."""
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return repr(v)
    return fmt_number(v)


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
