"""What a cell's config says about its balance: which point of which device plays which role in which
loop, in which unit, how fast it can plausibly move, where it rolls over, and when a meter was replaced.

Device knowledge stays generic: roles come from the cell config (`roles: {point: loop.role}`), units,
register types and plausible ranges from the device profiles, names of rate points from the shared
vocabulary (edge/quantities.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal
from zoneinfo import ZoneInfo

from edge.cell import ROLES, CellConfig
from edge.cell import MeterChange as ConfigMeterChange
from edge.codec import REGISTER_COUNT
from edge.profile import Point, Profile

__all__ = [
    "BalanceConfigError", "CellSpec", "LOOP_UNITS", "MeterChange", "SeriesSpec", "build_cell_spec", "gap_ms_for",
]

#: the unit every loop is balanced in; fuel is converted to energy (volume × calorific value × correction)
LOOP_UNITS: dict[str, str] = {"electricity": "kWh", "heat": "kWh", "water": "m³", "fuel": "kWh"}
_ENERGY = {"Wh": 0.001, "kWh": 1.0, "MWh": 1000.0}
_VOLUME = {"m³": 1.0, "l": 0.001, "L": 0.001}
#: rate units: (dimension, factor to kWh/h = kW or to m³/h)
_RATE = {"W": ("energy", 0.001), "kW": ("energy", 1.0), "MW": ("energy", 1000.0),
         "m³/h": ("volume", 1.0), "l/h": ("volume", 0.001), "m³/s": ("volume", 3600.0)}
#: a counter's companion rate point in the shared vocabulary; its plausible range gives the rated rate
_COMPANION = {"energy_import": "power", "energy_export": "power", "energy_total": "power",
              "heat_energy": "heat_power", "volume": "flow", "volume_reverse": "flow"}
_MIN_GAP_S = 300.0
_GAP_POLLS = 3


class BalanceConfigError(ValueError):
    """The cell config cannot be balanced as it is; the message names the cell, device and point."""


@dataclass(frozen=True)
class MeterChange:
    """A meter replaced (or its counter set) at a known instant.

    The fields of `edge.cell.MeterChange` (a cell config's `meter_changes`, see docs/balance.md), for
    records kept outside a cell config.
    """

    device: str
    point: str | None
    time: datetime
    old_final: float
    new_initial: float


AnyMeterChange = MeterChange | ConfigMeterChange


@dataclass(frozen=True)
class SeriesSpec:
    """One metered point contributing to one loop role."""

    device: str
    point: str
    measurement: str
    loop: str
    role: str
    kind: Literal["counter", "rate"]
    unit: str
    to_loop: float  # native quantity (counter unit; rate unit × hour) → loop unit
    native_volume: bool  # the native quantity is a volume (m³), e.g. a gas meter in the fuel loop
    rated: float | None  # plausible maximum, in native quantity per hour; None = unknown
    modulus: float | None  # where an integer register rolls over, in the point's unit
    abs_res: float  # the counter's resolution (integer registers: one count)
    rel_res: float  # relative resolution of floating-point registers
    gap_ms: int  # readings further apart than this are a gap
    device_class: str
    chp: bool  # the device carries both electricity.generation and heat.generation
    consumer: bool

    @property
    def key(self) -> tuple[str, str]:
        return (self.device, self.point)

    @property
    def loop_role(self) -> str:
        return f"{self.loop}.{self.role}"


@dataclass(frozen=True)
class CellSpec:
    cell: str
    name: str
    tz: ZoneInfo
    residents: int | None
    connections: int | None
    series: tuple[SeriesSpec, ...]
    #: (device, point) → [(time ms, old final, new initial)], sorted by time
    changes: dict[tuple[str, str], list[tuple[int, float, float]]] = field(default_factory=dict)

    def loops(self) -> list[str]:
        return [loop for loop in LOOP_UNITS if any(s.loop == loop for s in self.series)]

    def roles(self, loop: str) -> list[str]:
        """Roles of a loop that this cell meters, in the order of edge.cell.ROLES."""
        have = {s.role for s in self.series if s.loop == loop}
        return [r for r in ROLES[loop] if r in have]

    @property
    def has_chp(self) -> bool:
        return any(s.chp for s in self.series)


def gap_ms_for(poll_interval_s: float) -> int:
    """Readings further apart than three polls, and at least five minutes, are a gap."""
    return int(max(_MIN_GAP_S, _GAP_POLLS * poll_interval_s) * 1000)


def _modulus(p: Point) -> float | None:
    """Where an unsigned integer register wraps, in the point's unit (unknown with a SunSpec scale factor)."""
    if p.type in ("u16", "u32", "u64") and p.scale_register is None:
        return float(2 ** (16 * REGISTER_COUNT[p.type])) * p.scale
    return None


def _resolution(p: Point) -> tuple[float, float]:
    if p.type == "f32":
        return 0.0, 2.0**-22
    if p.type == "f64":
        return 0.0, 1e-12
    return abs(p.scale), 0.0


def _rated(profile: Profile, point: Point, override: float | None) -> float | None:
    """Plausible maximum rate in the counter's unit per hour: a per-device rating, else the companion rate
    point's plausible range (power for an energy counter, flow for a volume counter)."""
    if override is not None:
        return float(override)
    companion = profile.by_name.get(_COMPANION.get(point.name, ""))
    if companion is None or companion.range is None or companion.unit not in _RATE:
        return None
    dim, factor = _RATE[companion.unit]
    native = _ENERGY.get(point.unit) if dim == "energy" else _VOLUME.get(point.unit)
    if native is None:
        return None
    return max(abs(companion.range[0]), abs(companion.range[1])) * factor / native


def _change_list(changes: Iterable[AnyMeterChange], cfg: CellConfig, role_points: dict[str, list[str]]) -> dict[
        tuple[str, str], list[tuple[int, float, float]]]:
    out: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    for ch in changes:
        points = role_points.get(ch.device)
        if points is None:
            msg = f"cell {cfg.cell.id!r}: meter change for {ch.device!r}, which has no balance role"
            raise BalanceConfigError(msg)
        point = ch.point
        if point is None:
            if len(points) != 1:
                msg = (f"cell {cfg.cell.id!r}: meter change for {ch.device!r} must name its point "
                       f"(one of {', '.join(points)})")
                raise BalanceConfigError(msg)
            point = points[0]
        if point not in points:
            msg = f"cell {cfg.cell.id!r}: meter change names {ch.device}.{point}, which has no balance role"
            raise BalanceConfigError(msg)
        when = ch.time
        if when.tzinfo is None:
            when = when.replace(tzinfo=ZoneInfo(cfg.cell.timezone))
        out.setdefault((ch.device, point), []).append(
            (int(round(when.timestamp() * 1000)), float(ch.old_final), float(ch.new_initial)))
    for lst in out.values():
        lst.sort()
    return out


def build_cell_spec(cfg: CellConfig, ratings: Mapping[tuple[str, str], float] | None = None,
                    meter_changes: Iterable[AnyMeterChange] | None = None) -> CellSpec:
    """The balance view of a cell config.

    ratings: (device, point) → plausible maximum in the counter's unit per hour, overriding the profile
    and the device's own `ratings`.
    meter_changes: replacement records, in addition to the cell config's own `meter_changes`.
    """
    ratings = dict(ratings or {})
    series: list[SeriesSpec] = []
    role_points: dict[str, list[str]] = {}
    fuel_factor = cfg.fuel.calorific_value_kwh_m3 * cfg.fuel.correction_factor
    for gw, dev in cfg.devices():
        if not dev.roles:
            continue
        profile = cfg.profiles[dev.id]
        roles = set(dev.roles.values())
        chp = "electricity.generation" in roles and "heat.generation" in roles
        dev_ratings = dev.ratings
        poll = dev.poll_interval or gw.poll_interval
        for point_name, loop_role in dev.roles.items():
            loop, role = loop_role.split(".", 1)
            point = profile.by_name[point_name]
            where = f"cell {cfg.cell.id!r}, device {dev.id!r}, point {point_name!r} ({loop_role})"
            want = "volume" if loop == "water" else "energy"
            if point.kind == "counter":
                kind: Literal["counter", "rate"] = "counter"
                if point.unit in _ENERGY:
                    dim, to_loop = "energy", _ENERGY[point.unit]
                elif point.unit in _VOLUME:
                    dim, to_loop = "volume", _VOLUME[point.unit]
                else:
                    msg = f"{where}: unit {point.unit!r} is neither an energy nor a volume"
                    raise BalanceConfigError(msg)
            elif point.unit in _RATE:
                kind = "rate"
                dim, to_loop = _RATE[point.unit]
            else:
                msg = f"{where}: a role needs a counter, or a power or flow to integrate; unit {point.unit!r} is neither"
                raise BalanceConfigError(msg)
            native_volume = dim == "volume"
            if loop == "fuel" and dim == "volume":
                to_loop *= fuel_factor  # m³ × Brennwert × Zustandszahl = kWh
            elif dim != want:
                msg = f"{where}: the {loop} loop is balanced in {LOOP_UNITS[loop]}, but the point measures {point.unit!r}"
                raise BalanceConfigError(msg)
            override = ratings.get((dev.id, point_name), dev_ratings.get(point_name))
            if kind == "counter":
                rated = _rated(profile, point, override)
                abs_res, rel_res = _resolution(point)
                modulus = _modulus(point)
            else:
                # a rate point's own plausible range bounds it, in its unit converted to per-hour quantity
                rated = float(override) if override is not None else (
                    max(abs(point.range[0]), abs(point.range[1])) if point.range else None)
                abs_res, rel_res, modulus = 0.0, 0.0, None
            series.append(SeriesSpec(
                device=dev.id, point=point_name, measurement=profile.device_class, loop=loop, role=role, kind=kind,
                unit=point.unit, to_loop=to_loop, native_volume=native_volume, rated=rated, modulus=modulus,
                abs_res=abs_res, rel_res=rel_res, gap_ms=gap_ms_for(poll), device_class=profile.device_class,
                chp=chp, consumer=dev.consumer))
            role_points.setdefault(dev.id, []).append(point_name)
    for s in series:
        if s.rated is not None and (not math.isfinite(s.rated) or s.rated <= 0):
            msg = f"cell {cfg.cell.id!r}, {s.device}.{s.point}: rating must be a positive number, got {s.rated}"
            raise BalanceConfigError(msg)
    all_changes = [*cfg.meter_changes, *(meter_changes or [])]
    return CellSpec(cell=cfg.cell.id, name=cfg.cell.name, tz=ZoneInfo(cfg.cell.timezone), residents=cfg.cell.residents,
                    connections=cfg.cell.connections, series=tuple(series),
                    changes=_change_list(all_changes, cfg, role_points))
