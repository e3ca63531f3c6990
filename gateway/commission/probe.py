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
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from edge.modbus import DeviceError, LineDown, ModbusExceptionReply, ModbusLine, ReadTimeout
from edge.profile import Point, Profile
from gateway.commission.common import (
    EagerLine,
    Finding,
    Snapshot,
    Status,
    decode_point,
    identify,
    judge,
    read_snapshot,
    worst,
)

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


def _fmt(v: float | str | None) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return repr(v)
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e9):
        return f"{v:.4g}"
    return f"{v:.6g}"


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
    first = await read_snapshot(eager, profile, unit_id, wanted)
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
        second = await read_snapshot(eager, profile, unit_id, counters)
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


def _check_point(profile: Profile, p: Point, snap: Snapshot) -> PointCheck:
    if p.name in snap.errors:
        return PointCheck(p, verdict="error", status="fail", note=str(snap.errors[p.name]))
    value = snap.values.get(p.name)
    verdict = judge(p, value)
    check = PointCheck(p, value=value, verdict=verdict)
    if verdict == "not_implemented":
        check.status, check.note = "pass", "the device reports it does not have this value"
    elif verdict == "out_of_range":
        assert p.range is not None
        check.status, check.note = "fail", f"outside the plausible range {_fmt(p.range[0])} … {_fmt(p.range[1])}"
    elif verdict == "tiny":
        check.status, check.note = "warn", "a float this small is almost always two registers in the wrong order"
    return check


def _bad(check: PointCheck) -> bool:
    return check.verdict in ("out_of_range", "tiny")


_HYPOTHESES = ("word_order", "+1", "-1")
#: good points whose shifted words are not already known are read at most this many times per hypothesis
MAX_EXTRA_READS = 12


async def _diagnose(probe: DeviceProbe, profile: Profile, unit_id: int, eager: EagerLine, snap: Snapshot) -> None:
    """Weigh three explanations of implausible values against the plausible ones.

    - word_order: the 32/64-bit values decoded with their registers swapped;
    - +1 / -1: every value read one register later / earlier (an off-by-one address convention).

    A hypothesis gains a vote for each implausible value it makes plausible, and loses one for each
    plausible value it spoils; identification registers that match as configured veto the address
    shifts (the map is where the profile says), and ones that only match shifted are strong evidence.
    With float-only maps a swapped word order and a one-register shift both make values nearly
    right (the high word carries the magnitude): then both are reported, to be settled at the display.
    """
    checks = [c for c in probe.points if c.point.range is not None and c.point.numeric
              and c.point.table in ("holding", "input") and c.verdict not in ("error", "not_implemented")]
    bad = [c for c in checks if _bad(c)]
    if not bad:
        return
    other = {c.point.name: ("little" if profile.orders(c.point)[0] == "big" else "big") for c in checks}
    votes: dict[str, list[str]] = {h: [] for h in _HYPOTHESES}
    against: dict[str, int] = dict.fromkeys(_HYPOTHESES, 0)
    examples: dict[str, dict[str, float | str | None]] = {h: {} for h in _HYPOTHESES}
    for h in _HYPOTHESES:
        extra = 0
        for c in checks:
            p = c.point
            if h == "word_order" and (p.registers < 2 or p.type == "bitfield32"):
                continue  # one register has no word order
            is_bad = c in bad
            if not is_bad and h != "word_order":
                known = _known_words(snap, p.table, profile.wire(p) + int(h), p.registers)
                if known is None:
                    if extra >= MAX_EXTRA_READS or p.registers > 1:
                        continue
                    extra += 1
            value = await _value_under(h, profile, p, unit_id, eager, snap)
            if value is _MISSING:
                continue
            plausible = judge(p, value) == "ok"  # type: ignore[arg-type]
            if is_bad and plausible:
                votes[h].append(p.name)
                examples[h][p.name] = value  # type: ignore[assignment]
                c.hints.append(_hint(h, value, p, other[p.name]))  # type: ignore[arg-type]
            elif not is_bad and c.verdict == "ok" and not plausible:
                against[h] += 1
    score = {h: len(votes[h]) - against[h] for h in _HYPOTHESES}
    supported = {h for h in _HYPOTHESES if len(votes[h]) >= 2 and len(votes[h]) > against[h]}
    ident_ok, _ = identify(profile, probe_values(probe))
    if profile.identification:
        for shift in ("+1", "-1"):
            if ident_ok:
                supported.discard(shift)  # the identification registers are where the profile says
            else:
                shifted = {}
                for rule in profile.identification:
                    v = await _value_under(shift, profile, profile.by_name[rule.point], unit_id, eager, snap)
                    shifted[rule.point] = None if v is _MISSING else v
                if identify(profile, shifted)[0]:
                    supported.add(shift)
                    score[shift] += 100
    if not supported:
        return
    ranked = sorted(supported, key=lambda h: (-score[h], _HYPOTHESES.index(h)))
    best = [h for h in ranked if score[h] == score[ranked[0]]]
    order = {p.name: i for i, p in enumerate(profile.points)}
    explained = sorted({n for h in best for n in votes[h]}, key=order.__getitem__)
    probe.explained.update(explained)
    for c in bad:
        if c.point.name in explained:
            c.status = "fail"
    if len(best) > 1:
        sample = explained[:3]
        lines = []
        for name in sample:
            p = profile.by_name[name]
            alts = [f"{_label(h, other[name])}: {_fmt(examples[h][name])}" for h in best if name in examples[h]]
            lines.append(f"{name} ({p.unit}) reads " + " or ".join(alts))
        probe.findings.append(Finding(
            "fail", f"word order or address off by one: {len(explained)} values become plausible either way "
                    f"({'; '.join(lines)})",
            "compare these values with the device display to tell which; for the word order set word_order in "
            f"edge/profiles/{profile.id}.yaml (or on the points); for the address set addressing (one_based for "
            "documents numbering from 1, raw for 0-based) or correct the addresses"))
        return
    h = best[0]
    names = votes[h]
    total = len(names) + against[h]
    listed = ", ".join(names[:5]) + ("…" if len(names) > 5 else "")
    if h == "word_order":
        order = "/".join(sorted({other[n] for n in names}))
        probe.findings.append(Finding(
            "fail", f"word order looks wrong: {len(names)} of {total} multi-register values become plausible with "
                    f"word_order {order} ({listed})",
            f"the device sends its words in the other order than the profile says: set word_order: {order} in "
            f"edge/profiles/{profile.id}.yaml (or on the points), or pick the profile of this exact model and "
            f"firmware; then compare one value with the device display"))
    elif h == "+1":
        probe.findings.append(Finding(
            "fail", f"address off by +1: {len(names)} implausible values become plausible one register later "
                    f"({listed}); the document probably numbers registers from 1 and the profile reads them as 0-based",
            f"in edge/profiles/{profile.id}.yaml set addressing: one_based (or modicon for 3xxxx/4xxxx numbers), or "
            f"add 1 to the addresses; compare one value with the display afterwards"))
    else:
        probe.findings.append(Finding(
            "fail", f"address off by -1: {len(names)} implausible values become plausible one register earlier "
                    f"({listed}); the document probably gives 0-based addresses and the profile treats them as 1-based",
            f"in edge/profiles/{profile.id}.yaml set addressing: raw, or subtract 1 from the addresses; compare "
            f"one value with the display afterwards"))


_MISSING = object()


def probe_values(probe: DeviceProbe) -> dict[str, float | str | None]:
    return {c.point.name: c.value for c in probe.points if c.verdict != "error"}


def _label(h: str, order: str) -> str:
    return {"word_order": f"with word_order {order}", "+1": "one register later", "-1": "one register earlier"}[h]


def _hint(h: str, value: float | str | None, p: Point, order: str) -> str:
    return f"{_label(h, order)}: {_fmt(value)} {p.unit} (plausible)"


def _known_words(snap: Snapshot, table: str, address: int, count: int) -> list[int] | None:
    known = snap.words.get(table, {})
    if address < 0 or not all(address + i in known for i in range(count)):
        return None
    return [known[address + i] for i in range(count)]


async def _value_under(h: str, profile: Profile, p: Point, unit_id: int, eager: EagerLine,
                       snap: Snapshot) -> object:
    """The point's value under a hypothesis, or _MISSING when its words cannot be had."""
    base = profile.wire(p)
    if h == "word_order":
        words = snap.point_words(profile, p)
        if words is None:
            return _MISSING
        return decode_point(profile, p, words, snap.raw, reverse_words=p.registers > 1)
    start = base + int(h)
    if start < 0 or start + p.registers > 65536:
        return _MISSING
    words = await _words(eager, unit_id, p.table, start, p.registers, snap)
    if words is None:
        return _MISSING
    return decode_point(profile, p, words, snap.raw)


async def _words(eager: EagerLine, unit_id: int, table: str, address: int, count: int,
                 snap: Snapshot) -> list[int] | None:
    known = snap.words.get(table, {})
    if all(address + i in known for i in range(count)):
        return [known[address + i] for i in range(count)]
    if snap.stop_extra_reads:
        return None
    try:
        words = await eager.read(unit_id, table, address, count)
    except ModbusExceptionReply:
        snap.requests += 1
        return None
    except (ReadTimeout, LineDown, DeviceError):
        snap.stop_extra_reads = True  # a device silent outside its map: every further try costs a timeout
        return None
    snap.requests += 1
    t = snap.words.setdefault(table, {})
    for i, w in enumerate(words):
        t.setdefault(address + i, w)
    return words


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
                c.hints.append(f"x10^{k}: {_fmt(v)} {c.point.unit} would be plausible: check the scale and unit")
                break
    if out:
        probe.findings.append(Finding(
            "fail", f"{len(out)} value(s) outside their plausible range: "
                    + ", ".join(f"{c.point.name} = {_fmt(c.value)} {c.point.unit}" for c in out[:5])
                    + ("…" if len(out) > 5 else ""),
            "compare with the device display: a wrong unit id (another device answers), a wrong profile, a wrong "
            "scale, or a meter configured differently (CT ratio, pulse value); see the hints per point"))
    if tiny:
        probe.findings.append(Finding(
            "warn", f"{len(tiny)} float value(s) implausibly small: " + ", ".join(c.point.name for c in tiny[:5]),
            "likely the wrong word order on these points: compare with the device display"))


def _compare_counters(probe: DeviceProbe, checks: dict[str, PointCheck], counters: list[Point],
                      first: Snapshot, second: Snapshot, pause: float) -> None:
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
            c.note = f"went backwards from {_fmt(v1)} to {_fmt(v2)}"
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
