"""Probe one device through its profile: is every value there, plausible, and alive?

Reads every point, waits, reads the counters again, and looks for the mistakes commissioning
usually finds:

- a value outside its point's plausible range (or a float so tiny it cannot be a measurement);
- a counter that did not move (frozen) or went backwards;
- the wrong word order: the 32/64-bit values become plausible when their registers are swapped;
- an off-by-one address: the values become plausible one register earlier or later (a document
  that numbers registers from 1 read as if from 0, or the other way round);
- a wrong scale (x10, x1000), as a hint;
- a device that does not identify as the profile says (its identification registers disagree),
  which usually means the unit id belongs to another device.

It reads through the gateway's own DeviceReader (common.eager_reader); word order and address
shifts are weighed in gateway/commission/diagnose.py.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from edge.modbus import DeviceError, LineDown, ModbusLine, ReadResult
from edge.profile import Point, Profile
from gateway.commission import diagnose
from gateway.commission.common import EagerLine, Finding, Status, eager_reader, fmt_value, identify, judge, worst

__all__ = ["DeviceProbe", "PointCheck", "probe_device"]

@dataclass
class PointCheck:
    point: Point
    value: float | str | None = None
    second: float | str | None = None  # counters: the value after the pause
    verdict: str = "ok"  # ok, out_of_range, tiny, not_implemented, unchecked, text, error, frozen, backwards
    status: Status = "pass"
    note: str = ""
    hints: list[str] = field(default_factory=list)

    @property
    def unit(self) -> str:
        return self.point.unit


@dataclass
class DeviceProbe:
    profile: Profile
    unit_id: int
    where: str
    name: str = ""
    reachable: bool = True
    points: list[PointCheck] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    identity: list[str] = field(default_factory=list)
    pause: float = 0.0
    requests: int = 0
    explained: set[str] = field(default_factory=set)  # implausible points a device-level finding explains

    @property
    def status(self) -> Status:
        return worst(f.status for f in self.findings) if self.findings else "pass"

    @property
    def summary(self) -> str:
        fails = [f for f in self.findings if f.status == "fail"]
        warns = [f for f in self.findings if f.status == "warn"]
        if not self.reachable:
            return fails[0].message if fails else "no answer"
        good = sum(1 for c in self.points if c.verdict in ("ok", "frozen"))
        checked = sum(1 for c in self.points if c.verdict not in ("text", "unchecked", "not_implemented"))
        head = f"{good}/{checked} values plausible"
        if fails:
            return f"{head}; " + "; ".join(f.message for f in fails)
        if warns:
            return f"{head}; " + "; ".join(f.message for f in warns)
        return head


async def probe_device(line: ModbusLine | EagerLine, profile: Profile, unit_id: int, *,
                       points: Sequence[Point] | None = None, pause: float = 5.0, name: str = "") -> DeviceProbe:
    """Read a device twice (pause seconds apart) and judge every value; see the module doc."""
    eager = line if isinstance(line, EagerLine) else EagerLine(line)
    wanted = list(points) if points is not None else list(profile.points)
    names = {p.name for p in wanted}
    for rule in profile.identification:  # identity is always checked, published or not
        if rule.point not in names:
            wanted.append(profile.by_name[rule.point])
            names.add(rule.point)
    probe = DeviceProbe(profile, unit_id, eager.line.key, name=name, pause=pause)
    reader = eager_reader(eager, profile, unit_id)  # the gateway's read path; the second read keeps what it learnt
    first = await reader.read(wanted)
    if first.silent is not None and not first.values:
        probe.requests = first.requests
        probe.reachable = False
        probe.findings.append(_silent_finding(first.silent, unit_id, eager.line.key))
        probe.points = [PointCheck(p, verdict="error", status="fail", note=str(first.silent)) for p in wanted]
        return probe

    checks = {p.name: _check_point(profile, p, first) for p in wanted}
    probe.points = [checks[p.name] for p in wanted]

    ok, seen = identify(profile, first.values)
    probe.identity = seen
    if ok is False:
        probe.findings.append(Finding(
            "fail", f"the device does not identify as {profile.id}: {'; '.join(seen)}",
            "the unit id probably belongs to another device, or the profile is wrong: "
            "run kwwk commission scan on this line to see which device answers at which unit id"))

    errors = [c for c in probe.points if c.verdict == "error"]
    codes_all = {getattr(first.errors.get(c.point.name), "code", None) for c in errors}
    if errors and not first.values and len(codes_all) == 1 and None not in codes_all:
        code = codes_all.pop()
        probe.findings.append(Finding(
            "fail", f"unit {unit_id} on {eager.line.key} refuses every request (Modbus exception {code}): most likely "
                    f"no device with this unit id answers there (or it is not a {profile.manufacturer} {profile.model})",
            "check the unit id (kwwk commission scan lists the units that answer on this line and names their "
            "profiles), then the profile"))
    elif errors:
        codes = sorted({str(getattr(first.errors.get(c.point.name), "code", "")) for c in errors} - {""})
        probe.findings.append(Finding(
            "fail", f"{len(errors)} point(s) could not be read ({', '.join(c.point.name for c in errors[:6])}"
                    f"{'…' if len(errors) > 6 else ''})" + (f", Modbus exception {'/'.join(codes)}" if codes else ""),
            "exception 2 means the device lacks the register: check the profile (and the device's model and "
            "firmware) or list only the points it has under the device's points: in the cell config"))

    await _diagnose(probe, profile, unit_id, eager, first)
    probe.requests += first.requests  # including the diagnosis' reads at neighbouring addresses
    _flag_implausible(probe)

    counters = [p for p in wanted if p.kind == "counter" and p.name in first.values and p.numeric]
    if pause > 0 and counters:
        await asyncio.sleep(pause)
        second = await reader.read(counters)
        probe.requests += second.requests
        _compare_counters(probe, checks, counters, first, second, pause)
    return probe


def _silent_finding(err: DeviceError, unit_id: int, where: str) -> Finding:
    if isinstance(err, LineDown):
        if where.startswith("rtu:"):
            fix = ("check the serial port name (ls -l /dev/serial/by-id/), that the adapter is plugged in, and that "
                   "no other program holds it (sudo systemctl stop kwwk-gateway while probing)")
        else:
            fix = ("check the IP address and port, the cable and switch, and that the device (or its TCP converter) is "
                   "powered: ping it, then nc -vz <host> <port>")
        return Finding("fail", f"cannot open {where}: {err}", fix)
    return Finding("fail", f"no answer from unit {unit_id} on {where}",
                   f"check the unit id (kwwk commission scan lists the units that answer on this line), then the "
                   f"wiring (A/B swapped, termination, common ground), baud rate and parity; a TCP gateway answering "
                   f"'target failed to respond' means the same: nothing at unit {unit_id} behind it")


def _check_point(profile: Profile, p: Point, snap: ReadResult) -> PointCheck:
    if p.name in snap.errors:
        return PointCheck(p, verdict="error", status="fail", note=str(snap.errors[p.name]))
    value = snap.values.get(p.name)
    verdict = judge(p, value)
    check = PointCheck(p, value=value, verdict=verdict)
    if verdict == "not_implemented":
        check.status, check.note = "pass", "the device reports it does not have this value"
    elif verdict == "out_of_range":
        assert p.range is not None
        check.status, check.note = "fail", f"outside the plausible range {fmt_value(p.range[0])} … {fmt_value(p.range[1])}"
    elif verdict == "tiny":
        check.status, check.note = "warn", "a float this small is almost always two registers in the wrong order"
    return check


async def _diagnose(probe: DeviceProbe, profile: Profile, unit_id: int, eager: EagerLine, snap: ReadResult) -> None:
    """Weigh word order and an off-by-one address against the implausible values (gateway/commission/diagnose.py):
    hints on the points, and a finding for the cause(s) ranked first."""
    checks = list({c.point.name: c for c in probe.points}.values())
    ev = await diagnose.gather(profile, [(c.point, c.verdict) for c in checks],
                               diagnose.NeighbourReads(eager, unit_id, snap), _values(probe))
    if ev is None:
        return
    hints = diagnose.hints(ev, profile)
    for c in checks:
        c.hints.extend(hints.get(c.point.name, []))
    ranked = diagnose.rank(ev)
    if not ranked:
        return
    explained = diagnose.explained(ev, ranked[0], profile)
    probe.explained.update(explained)
    for c in checks:
        if c.point.name in explained:
            c.status = "fail"
    probe.findings.append(diagnose.word(ev, ranked[0], profile))


def _values(probe: DeviceProbe) -> dict[str, float | str | None]:
    """What the probe read, point by point (None: not implemented)."""
    return {c.point.name: c.value for c in probe.points if c.verdict != "error"}


def _flag_implausible(probe: DeviceProbe) -> None:
    """Whatever the diagnoses did not explain: out-of-range values fail, tiny floats warn, with a scale hint."""
    out = [c for c in probe.points if c.verdict == "out_of_range" and c.point.name not in probe.explained]
    tiny = [c for c in probe.points if c.verdict == "tiny" and c.point.name not in probe.explained]
    for c in out:
        if c.hints or not isinstance(c.value, float) or c.value == 0 or not math.isfinite(c.value):
            continue
        assert c.point.range is not None
        lo, hi = c.point.range
        for k in (1, -1, 2, -2, 3, -3):
            v = c.value * 10.0**k
            if lo <= v <= hi and abs(v) >= 1e-6:
                c.hints.append(f"x10^{k}: {fmt_value(v)} {c.point.unit} would be plausible: check the scale and unit")
                break
    if out:
        probe.findings.append(Finding(
            "fail", f"{len(out)} value(s) outside their plausible range: "
                    + ", ".join(f"{c.point.name} = {fmt_value(c.value)} {c.point.unit}" for c in out[:5])
                    + ("…" if len(out) > 5 else ""),
            "compare with the device display: a wrong unit id (another device answers), a wrong profile, a wrong "
            "scale, or a meter configured differently (CT ratio, pulse value); see the hints per point"))
    if tiny:
        probe.findings.append(Finding(
            "warn", f"{len(tiny)} float value(s) implausibly small: " + ", ".join(c.point.name for c in tiny[:5]),
            "likely the wrong word order on these points: compare with the device display"))


def _compare_counters(probe: DeviceProbe, checks: dict[str, PointCheck], counters: list[Point],
                      first: ReadResult, second: ReadResult, pause: float) -> None:
    frozen: list[str] = []
    backwards: list[str] = []
    for p in counters:
        c = checks[p.name]
        v1, v2 = first.values.get(p.name), second.values.get(p.name)
        c.second = v2
        if not isinstance(v1, float) or not isinstance(v2, float) or c.status == "fail":
            continue
        if v2 < v1:
            c.verdict, c.status = "backwards", "fail"
            c.note = f"went backwards from {fmt_value(v1)} to {fmt_value(v2)}"
            if p.type == "u16":
                c.hints.append("a 16-bit counter wraps at 65535")
            backwards.append(p.name)
        elif v2 == v1:
            c.verdict, c.status = "frozen", "warn"
            c.note = f"did not change in {pause:g} s"
            frozen.append(p.name)
    if backwards:
        probe.findings.append(Finding(
            "fail", f"counter(s) went backwards: {', '.join(backwards)}",
            "a cumulative counter never decreases: the register is not this counter (address, word order), or "
            "the meter was reset or replaced"))
    if frozen:
        probe.findings.append(Finding(
            "warn", f"counter(s) did not change in {pause:g} s: {', '.join(frozen[:6])}{'…' if len(frozen) > 6 else ''}",
            "fine while the plant is idle (no flow, no power); otherwise the register is not the live counter, "
            "or the meter's display is frozen too: compare with it, or probe again with a longer --pause"))
