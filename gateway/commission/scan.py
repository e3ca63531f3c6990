"""Find the devices on a serial bus or behind a TCP host, and name their profiles.

For each unit id the scan sends one small read (holding register 0); any answer, data or a Modbus
exception, means a device is there. Silence, or a TCP gateway's "target failed to respond"
(exception 11), means nothing is. A unit that answers exception 4 ("device failure") is asked twice
more (input register 0, SunSpec's 40000) before it counts: some servers answer 4 for every unit id.

Each device found is then named:

1. SunSpec discovery (the 'SunS' marker at 40000, 0 or 50000 and the model chain);
2. the identification rules of the profiles that have them (a model code, a product code, the
   SunSpec chain of a fixed-layout profile): a match names the profile;
3. otherwise, with guessing on, every other profile is read and kept as a candidate when all its
   values are plausible. A candidate is a guess: probe it before trusting it.

On a serial line with unknown settings the scan first looks for any answer at each baud rate and
parity (at a few likely unit ids), then scans the whole unit range at the settings that answered.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol

from edge.modbus import DeviceError, LineDown, LineSpec, ModbusExceptionReply, ModbusLine, ReadTimeout
from edge.profile import Profile, get_profile, profile_ids
from edge.sunspec import ModelRef, SunSpecNotFound, discover, line_reader, read_devices
from gateway.commission.common import EagerLine, eager_reader, identify, judge

__all__ = [
    "COMMON_BAUDRATES", "COMMON_PARITIES", "QUICK_UNITS", "Found", "ScanProgress", "ScanResult", "parse_units",
    "presence", "scan_line", "scan_serial", "scan_tcp", "scan_yaml",
]

COMMON_BAUDRATES = (9600, 19200, 38400, 115200, 4800, 2400)
COMMON_PARITIES = ("N", "E", "O")
#: unit ids tried at each serial setting while looking for the bus's baud rate and parity
QUICK_UNITS = (1, 2, 3, 4, 5, 10, 247)
#: (table, address, count) sent to find out whether a unit id answers
PRESENCE_PROBES = (("holding", 0, 1), ("input", 0, 1), ("holding", 40000, 2))


class ScanProgress(Protocol):
    def start(self, label: str, total: int) -> None: ...
    def advance(self, found: int) -> None: ...


class _Quiet:
    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, found: int) -> None:
        pass


@dataclass
class Found:
    unit_id: int
    answer: str  # what the presence probe got
    profile: str | None = None  # the profile its identification registers name
    how: str = ""  # identification registers / SunSpec / guess
    candidates: list[str] = field(default_factory=list)  # plausible profiles when none identifies it
    details: list[str] = field(default_factory=list)  # model code, SunSpec manufacturer, serial ...
    sunspec: list[ModelRef] = field(default_factory=list)
    label: str = ""  # a human name for the device (SunSpec Mn/Md, a model enum)


@dataclass
class ScanResult:
    spec: LineSpec
    units: list[int]
    found: list[Found] = field(default_factory=list)
    refusing: list[int] = field(default_factory=list)  # answered exception 4 to every presence probe
    ignores_unit_id: bool = False
    duration: float = 0.0
    finished: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))

    @property
    def where(self) -> str:
        s = self.spec
        if s.kind == "rtu":
            return f"{s.serial_port} at {s.baudrate} baud, parity {s.parity}, {s.stopbits} stop bit(s)"
        kind = "Modbus TCP" if s.kind == "tcp" else "RTU over TCP"
        return f"{s.host}:{s.port or 502} ({kind})"


def parse_units(text: str) -> list[int]:
    """'1-247', '1,2,5-9' -> sorted unit ids (each 0..247)."""
    out: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        a, b = int(lo), int(hi or lo)
        if not 0 <= a <= b <= 247:
            msg = f"unit ids must be 0..247 with low <= high, got {part!r}"
            raise ValueError(msg)
        out.update(range(a, b + 1))
    if not out:
        raise ValueError("no unit ids given")
    return sorted(out)


async def presence(line: ModbusLine | EagerLine, unit_id: int) -> str | None:
    """What a unit id answers to the presence probes: None when silent, 'refuses' for exception 4 only.

    LineDown (port or host unreachable) propagates.
    """
    eager = line if isinstance(line, EagerLine) else EagerLine(line)
    codes: list[int] = []
    for table, address, count in PRESENCE_PROBES:
        try:
            await eager.read(unit_id, table, address, count)
        except ModbusExceptionReply as err:
            if err.code in (1, 2, 3):
                return f"exception {err.code} at {table} {address}"
            codes.append(err.code)
            continue
        except LineDown:
            raise
        except (ReadTimeout, DeviceError):
            return None  # silent (or a gateway's 'no answer'): nothing there
        return f"data at {table} {address}"
    return "refuses"


def _profiles() -> tuple[list[Profile], list[Profile]]:
    """(profiles with identification rules, profiles without), from the library."""
    with_rules, without = [], []
    for pid in profile_ids():
        p = get_profile(pid)
        (with_rules if p.identification else without).append(p)
    return with_rules, without


async def identify_unit(line: ModbusLine | EagerLine, unit_id: int, answer: str, *, guess: bool = True) -> Found:
    """Name the device at a unit id: SunSpec, identification rules, then (guess) plausible profiles."""
    eager = line if isinstance(line, EagerLine) else EagerLine(line)
    found = Found(unit_id, answer)
    reader = line_reader(eager, unit_id)  # type: ignore[arg-type]  # only .read() is used
    try:
        found.sunspec = await discover(reader)
    except (SunSpecNotFound, DeviceError, ValueError):
        found.sunspec = []
    if found.sunspec:
        found.details.append("SunSpec models " + ", ".join(f"{m.model_id} at {m.address} (L={m.length})"
                                                          for m in found.sunspec))
        try:
            devices = await read_devices(reader, found.sunspec)
        except (DeviceError, ValueError):
            devices = []
        for dev in devices:
            ident = " ".join(x for x in (dev.manufacturer, dev.model) if x)
            if ident:
                found.label = found.label or ident
                found.details.append(f"SunSpec device {dev.index}: {ident}" + (f", serial {dev.serial}" if dev.serial else ""))
    with_rules, without = _profiles()
    matches: list[tuple[int, Profile, list[str]]] = []
    for profile in with_rules:
        if any(r.point.startswith("suns") for r in profile.identification) and not found.sunspec:
            continue  # a SunSpec fixed layout cannot match a device without the marker
        snap = await eager_reader(eager, profile, unit_id).read(r.point for r in profile.identification)
        ok, seen = identify(profile, snap.values)
        if ok:
            matches.append((len(profile.identification), profile, seen))
    if matches:
        matches.sort(key=lambda m: (-m[0], m[1].id))
        _, profile, seen = matches[0]
        found.profile, found.how = profile.id, "identification registers"
        found.label = found.label or _enum_label(profile, seen) or f"{profile.manufacturer} {profile.model}"
        found.details.append(f"{profile.id}: " + "; ".join(s.split(" (expected")[0] for s in seen))
        found.candidates = [m[1].id for m in matches[1:]]
        return found
    if found.sunspec:
        found.how = "SunSpec"
        found.details.append("no fixed-layout profile fits this SunSpec chain: the gateway needs a profile for "
                             "these model addresses (see edge/profiles/README.md)")
    if guess:
        found.candidates = await guess_profiles(eager, unit_id, without)
        if found.candidates and not found.how:
            found.how = "guess"
    return found


def _enum_label(profile: Profile, seen: list[str]) -> str:
    for rule in profile.identification:
        p = profile.by_name[rule.point]
        if p.enum:
            for s in seen:
                if s.startswith(f"{rule.point} = "):
                    raw = s.split(" = ", 1)[1].split(" ", 1)[0]
                    try:
                        return p.enum.get(int(float(raw)), "")
                    except ValueError:
                        return ""
    return ""


async def guess_profiles(line: ModbusLine | EagerLine, unit_id: int, profiles: Iterable[Profile]) -> list[str]:
    """Profiles whose every ranged value reads plausibly (and not all zero) at this unit, most points first."""
    scored: list[tuple[int, str]] = []
    for profile in profiles:
        pts = [p for p in profile.points if p.range is not None and p.numeric and p.table in ("holding", "input")]
        if len(pts) < 3:
            continue
        snap = await eager_reader(line, profile, unit_id).read(pts)
        if snap.silent is not None or snap.errors:
            continue
        verdicts = [judge(p, snap.values.get(p.name)) for p in pts]
        good = sum(1 for v in verdicts if v == "ok")
        nonzero = any(isinstance(v, float) and v != 0 for v in snap.values.values())
        if good >= 3 and nonzero and all(v in ("ok", "not_implemented") for v in verdicts):
            scored.append((good, profile.id))
    scored.sort(key=lambda s: (-s[0], s[1]))
    return [pid for _, pid in scored]


async def scan_line(spec: LineSpec, units: Sequence[int], *, identify_devices: bool = True, guess: bool = True,
                    progress: ScanProgress | None = None, label: str | None = None) -> ScanResult:
    """Scan the unit ids of one line at one setting."""
    progress = progress or _Quiet()
    t0 = time.monotonic()
    result = ScanResult(spec, list(units))
    line = ModbusLine(spec)
    eager = EagerLine(line)
    answers: dict[int, str] = {}
    try:
        progress.start(label or f"scanning {result.where}", len(units))
        for unit in units:
            answer = await presence(eager, unit)
            if answer == "refuses":
                result.refusing.append(unit)
            elif answer is not None:
                answers[unit] = answer
            progress.advance(len(answers))
        if len(units) >= 8 and len(answers) == len(units):
            # every unit id answers: the device ignores the unit id (a plain TCP device): one device
            result.ignores_unit_id = True
            first = units[0]
            answers = {1 if 1 in answers else first: answers[1 if 1 in answers else first]}
        if identify_devices:
            progress.start(f"identifying {len(answers)} device(s)", len(answers))
            for i, (unit, answer) in enumerate(sorted(answers.items())):
                result.found.append(await identify_unit(eager, unit, answer, guess=guess))
                progress.advance(i + 1)
        else:
            result.found = [Found(u, a) for u, a in sorted(answers.items())]
    finally:
        await line.close()
    result.duration = time.monotonic() - t0
    return result


async def scan_tcp(host: str, port: int = 502, units: Sequence[int] = tuple(range(1, 248)), *,
                   timeout: float = 0.5, rtu_over_tcp: bool = False, identify_devices: bool = True,
                   guess: bool = True, progress: ScanProgress | None = None) -> ScanResult:
    spec = LineSpec(kind="rtu_over_tcp" if rtu_over_tcp else "tcp", host=host, port=port, timeout=timeout,
                    retries=0, reconnect_base=0.2, reconnect_max=1.0)
    return await scan_line(spec, units, identify_devices=identify_devices, guess=guess, progress=progress)


async def scan_serial(serial_port: str, units: Sequence[int] = tuple(range(1, 248)), *,
                      baudrates: Sequence[int] = COMMON_BAUDRATES, parities: Sequence[str] = COMMON_PARITIES,
                      stopbits: Literal[1, 2] = 1, timeout: float = 0.2, quick_units: Sequence[int] = QUICK_UNITS,
                      all_settings: bool = False, thorough: bool = False, identify_devices: bool = True,
                      guess: bool = True, progress: ScanProgress | None = None) -> list[ScanResult]:
    """Find the bus's settings (unless only one is given), then scan its unit ids.

    Settings are tried in the order given; the first at which any of quick_units answers is scanned
    (all that answer, with all_settings). thorough skips the quick search and scans every setting.
    LineDown (the port cannot be opened) propagates.
    """
    progress = progress or _Quiet()
    combos = [(b, p) for b in baudrates for p in parities]

    def spec(baud: int, parity: str) -> LineSpec:
        return LineSpec(kind="rtu", serial_port=serial_port, baudrate=baud, parity=parity, stopbits=stopbits,
                        timeout=timeout, retries=0, reconnect_base=0.2, reconnect_max=1.0)

    live: list[tuple[int, str]] = []
    if len(combos) == 1 or thorough:
        live = combos
    else:
        quick = [u for u in quick_units if u in set(units)] or list(units)[:5]
        with _expected_failures():
            live, refused = await _search_settings(combos, spec, quick, progress, all_settings)
        if refused and len(refused) == len(combos):
            raise refused[0]
    results = []
    for baud, parity in live:
        try:
            results.append(await scan_line(spec(baud, parity), units, identify_devices=identify_devices, guess=guess,
                                           progress=progress, label=f"{baud} baud, parity {parity}: scanning unit ids"))
        except LineDown:
            if len(live) == 1:
                raise
    return results


@contextlib.contextmanager
def _expected_failures() -> Iterator[None]:
    """While trying settings, a port refusing one is expected: keep the line's error log (and the traceback a
    log record would keep alive, holding the leaked port lock below) out of it."""
    logger = logging.getLogger("edge.modbus")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


async def _search_settings(combos: list[tuple[int, str]], spec: Callable[[int, str], LineSpec], quick: list[int],
                           progress: ScanProgress, all_settings: bool) -> tuple[list[tuple[int, str]], list[LineDown]]:
    live: list[tuple[int, str]] = []
    refused: list[LineDown] = []  # settings the port would not take (some adapters lack a parity or speed)
    for baud, parity in combos:
        line = ModbusLine(spec(baud, parity))
        eager = EagerLine(line)
        progress.start(f"{baud} baud, parity {parity}: listening for any device", len(quick))
        hit = False
        try:
            for unit in quick:
                if await presence(eager, unit) not in (None, "refuses"):
                    hit = True
                    progress.advance(1)
                    break
                progress.advance(0)
        except LineDown as err:
            refused.append(err)
            continue
        finally:
            await line.close()
            # pymodbus (3.16) opens the port exclusively (flock) and, when the port refuses a setting
            # (tcsetattr EINVAL: a parity or speed the adapter lacks), leaks the open handle in a
            # reference cycle: the lock holds until the garbage collector runs. Run it now, or every
            # later setting fails with "cannot open".
            gc.collect()
        if hit:
            live.append((baud, parity))
            if not all_settings:
                break
    return live, refused


# ---------------------------------------------------------------------------------------------- YAML

def _device_id(found: Found, profile_id: str | None) -> str:
    base = profile_id.replace("_", "-") if profile_id else "unit"
    return f"{base}-{found.unit_id}"


def scan_yaml(results: Sequence[ScanResult], line_prefix: str = "rs485") -> str:
    """A snippet for the gateway's entry in the cell config: lines (serial) and devices.

    Devices named by their identification registers are ready to use; guesses and unknown devices
    are written as comments, with the probe command that settles them.
    """
    out: list[str] = []
    lines: list[str] = []
    devices: list[str] = []
    for n, res in enumerate(results, start=1):
        s = res.spec
        out.append(f"# kwwk commission scan of {res.where}, {res.finished}")
        if s.kind == "tcp":
            def conn(unit: int, s: LineSpec = s) -> str:
                return f"{{host: {s.host}, port: {s.port or 502}, unit_id: {unit}}}"
            where = f"--host {s.host} --port {s.port or 502}"
        else:
            line_id = f"{line_prefix}-{n}"
            if s.kind == "rtu":
                lines.append(f"  - {{id: {line_id}, kind: rtu, serial_port: {s.serial_port}, baudrate: {s.baudrate}, "
                             f"parity: {s.parity}, stopbits: {s.stopbits}}}")
                where = f"--serial-port {s.serial_port} --baud {s.baudrate} --parity {s.parity}"
            else:
                lines.append(f"  - {{id: {line_id}, kind: rtu_over_tcp, host: {s.host}, port: {s.port}}}")
                where = f"--host {s.host} --port {s.port} --rtu-over-tcp"

            def conn(unit: int, line_id: str = line_id) -> str:
                return f"{{line: {line_id}, unit_id: {unit}}}"
        if res.ignores_unit_id:
            out.append("# the device answers every unit id (it ignores it): one device, unit 1")
        for f in res.found:
            if f.profile and f.how == "identification registers":
                devices.append(f"  - id: {_device_id(f, f.profile)}")
                if f.label:
                    devices.append(f"    name: {json.dumps(f.label, ensure_ascii=False)}")
                devices.append(f"    profile: {f.profile}")
                devices.append(f"    connection: {conn(f.unit_id)}")
                continue
            guess = f.candidates[0] if f.candidates else None
            why = ("answers with a SunSpec chain no fixed profile fits" if f.how == "SunSpec"
                   else "answers, but no profile identifies it")
            devices.append(f"  # unit {f.unit_id} {why}."
                           + (f" Plausible: {', '.join(f.candidates)}." if f.candidates else ""))
            devices.append(f"  # check: kwwk commission probe {where} --unit {f.unit_id} "
                           f"--profile {guess or '<profile>'}   then uncomment:")
            devices.append(f"  # - id: {_device_id(f, guess)}")
            devices.append(f"  #   profile: {guess or '<profile>'}")
            devices.append(f"  #   connection: {conn(f.unit_id)}")
    if lines:
        out.append("lines:")
        out.extend(lines)
    out.append("devices:" if devices else "devices: []  # nothing found")
    out.extend(devices)
    return "\n".join(out) + "\n"
