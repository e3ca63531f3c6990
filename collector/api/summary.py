"""A cell's public summary: today, the last 30 days and this year, from the stored balance rows.

Each window sums the cell's day (or month) rows, so its ratios are derived from its sums (docs/balance.md).
Figures that would reveal a single customer are left out (collector/api/privacy.py), and each window
carries the flows of the residents' diagram: where electricity, heat and water came from and where
they went, local versus imported.
"""

from __future__ import annotations

import datetime as dt
from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, Field

from collector.api.privacy import K_MIN, consumer_devices, lagging_roles, published, withheld_roles
from collector.balance.alliance import cell_totals, tiling_period
from collector.balance.rows import MEASUREMENT, METER_MEASUREMENT
from collector.balance.spec import CellSpec
from collector.balance.store import BalanceStore
from collector.balance.timegrid import INTERVAL_MS, floor_interval, parse_time
from collector.query import InfluxQL, ident, literal

__all__ = ["ElectricityFigures", "Flow", "HeatFigures", "LoopFlows", "PublicSummary", "WaterFigures", "Window",
           "build_summary", "window_bounds"]

WindowName = Literal["today", "last_30_days", "this_year"]
_KIND = {"pv_inverter": "solar", "chp": "chp"}  # device class → source kind on the diagram


class ElectricityFigures(BaseModel):
    unit: Literal["kWh"] = "kWh"
    generation: float | None = Field(None, description="produced in the cell (sun, combined heat and power, ...)")
    grid_import: float | None = Field(None, description="bought from the public grid")
    grid_export: float | None = Field(None, description="sold to the public grid")
    consumption: float | None = Field(None, description="used by the cell's metered plant, e.g. its water pumps")
    storage_charge: float | None = Field(None, description="put into the cell's batteries")
    storage_discharge: float | None = Field(None, description="taken out of the cell's batteries")
    used_in_cell: float | None = Field(None, description="used in the cell: import + generation − export")
    self_sufficiency_pct: float | None = Field(None, description="share of the electricity used that was made here")
    self_consumption_pct: float | None = Field(None, description="share of the electricity made here used here")


class HeatFigures(BaseModel):
    unit: Literal["kWh"] = "kWh"
    generation: float | None = Field(None, description="heat made in the cell")
    imported: float | None = Field(None, description="heat bought from outside the cell")
    fed: float | None = Field(None, description="heat fed into the heat network")
    delivered: float | None = Field(None, description="heat delivered to the buildings (all together)")
    network_loss: float | None = Field(None, description="lost on the way through the pipes: fed − delivered")
    network_loss_pct: float | None = None
    plant_residual: float | None = Field(None, description="made but not fed in: storage, plant losses")
    local_share_pct: float | None = Field(None, description="share of the heat made in the cell")


class WaterFigures(BaseModel):
    unit: Literal["m³"] = "m³"
    abstraction: float | None = Field(None, description="raw water from the cell's own wells")
    supply: float | None = Field(None, description="drinking water fed into the network")
    consumption: float | None = Field(None, description="metered consumption (all together)")
    export: float | None = Field(None, description="sold to neighbours")
    recycled: float | None = Field(None, description="recycled water used")
    non_revenue: float | None = Field(None, description="fed in but not metered as used: leaks, unmetered use")
    non_revenue_pct: float | None = None
    treatment_loss: float | None = Field(None, description="raw water not fed in: treatment, backwash")
    pumping_energy: float | None = Field(None, description="electricity of the pumps, kWh")
    pumping_kwh_per_m3: float | None = None
    recycled_share_pct: float | None = None


class Flow(BaseModel):
    key: str = Field(description="what the band stands for, e.g. solar, chp, grid_import, in_cell, losses")
    value: float
    local: bool | None = Field(None, description="sources only: made in the cell (true) or imported (false)")


class LoopFlows(BaseModel):
    unit: str
    sources: list[Flow]
    uses: list[Flow]
    withheld: bool = Field(False, description="some bands are merged or left out to protect households")


class Window(BaseModel):
    from_ms: int
    to_ms: int
    start: datetime = Field(description="local start of the window")
    end: datetime = Field(description="local end of the window (exclusive)")
    until_ms: int = Field(description="figures cover the window up to this instant (now, for open windows)")
    coverage_pct: dict[str, float] = Field(description="per loop: share of the meter readings due so far that "
                                                       "the figures are based on")
    electricity: ElectricityFigures | None = None
    heat: HeatFigures | None = None
    water: WaterFigures | None = None
    flows: dict[str, LoopFlows] = Field(default_factory=dict)
    withheld: list[str] = Field(default_factory=list,
                                description="figures not published to protect single households, e.g. heat.delivered")


class PublicSummary(BaseModel):
    cell: str
    name: str
    timezone: str
    date: dt.date = Field(description="today in the cell")
    generated_at: datetime
    k_min: int = Field(K_MIN, description="a total of customers' meters is published only over this many or more")
    today: Window
    last_30_days: Window
    this_year: Window


def window_bounds(now_ms: int, tz: ZoneInfo) -> dict[WindowName, tuple[int, int]]:
    today = datetime.fromtimestamp(now_ms / 1000, UTC).astimezone(tz).date()

    def midnight(d: dt.date) -> int:
        return parse_time(d.isoformat(), tz)

    tomorrow = midnight(today + timedelta(days=1))
    return {"today": (midnight(today), tomorrow),
            "last_30_days": (midnight(today - timedelta(days=29)), tomorrow),
            "this_year": (midnight(today.replace(month=1, day=1)), midnight(dt.date(today.year + 1, 1, 1)))}


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _pct(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den <= 0 else 100.0 * num / den


def _electricity(lp: dict[str, float]) -> dict[str, float | None]:
    return {"generation": lp.get("generation"), "grid_import": lp.get("grid_import"),
            "grid_export": lp.get("grid_export"), "consumption": lp.get("consumption"),
            "storage_charge": lp.get("storage_charge"), "storage_discharge": lp.get("storage_discharge"),
            "used_in_cell": lp.get("load"), "self_sufficiency_pct": lp.get("self_sufficiency_pct"),
            "self_consumption_pct": lp.get("self_consumption_pct")}


def _heat(lp: dict[str, float]) -> dict[str, float | None]:
    gen, imp = lp.get("generation"), lp.get("import")
    made = None if gen is None and imp is None else (gen or 0.0) + (imp or 0.0)
    fed = lp.get("feed", made)
    return {"generation": gen, "imported": imp, "fed": fed, "delivered": lp.get("delivery"),
            "network_loss": lp.get("network_loss"), "network_loss_pct": lp.get("network_loss_pct"),
            "plant_residual": lp.get("residual"), "local_share_pct": _pct(gen or 0.0, made) if made else None}


def _water(lp: dict[str, float]) -> dict[str, float | None]:
    v_in = lp.get("supply", lp.get("abstraction"))
    return {"abstraction": lp.get("abstraction"), "supply": lp.get("supply"), "consumption": lp.get("consumption"),
            "export": lp.get("export"), "recycled": lp.get("recycled"), "non_revenue": lp.get("non_revenue"),
            "non_revenue_pct": _pct(lp.get("non_revenue"), v_in), "treatment_loss": lp.get("residual"),
            "pumping_energy": lp.get("pumping_energy"), "pumping_kwh_per_m3": lp.get("pumping_kwh_per_m3"),
            "recycled_share_pct": lp.get("recycled_share_pct")}


_FIGURES = {"electricity": (_electricity, ElectricityFigures), "heat": (_heat, HeatFigures),
            "water": (_water, WaterFigures)}


def _flows_electricity(f: ElectricityFigures, split: dict[str, float]) -> LoopFlows:
    sources: list[Flow] = []
    if f.generation is not None:
        if abs(sum(split.values()) - f.generation) > max(0.01, 1e-6 * abs(f.generation)):
            split = {"local": f.generation}  # the generators' own rows do not add up (yet): one band
        sources += [Flow(key=k, value=v, local=True) for k, v in split.items()]
    for key, v, local in (("storage_discharge", f.storage_discharge, True), ("grid_import", f.grid_import, False)):
        if v is not None:
            sources.append(Flow(key=key, value=v, local=local))
    uses = [Flow(key=k, value=v) for k, v in (("in_cell", f.used_in_cell), ("storage_charge", f.storage_charge),
                                                 ("grid_export", f.grid_export)) if v is not None]
    return LoopFlows(unit="kWh", sources=sources, uses=uses)


def _flows_heat(f: HeatFigures, chp_only: bool) -> LoopFlows:
    sources: list[Flow] = []
    if f.generation is not None:
        sources.append(Flow(key="chp" if chp_only else "local_heat", value=f.generation, local=True))
    if f.imported is not None:
        sources.append(Flow(key="heat_import", value=f.imported, local=False))
    uses: list[Flow] = []
    if f.delivered is not None and f.network_loss is not None:
        uses += [Flow(key="buildings", value=f.delivered), Flow(key="network_loss", value=f.network_loss)]
    elif f.fed is not None:
        uses.append(Flow(key="network", value=f.fed))
    if f.plant_residual is not None and f.plant_residual > 0:
        uses.append(Flow(key="plant", value=f.plant_residual))
    elif f.plant_residual is not None and f.plant_residual < 0:
        sources.append(Flow(key="unmetered", value=_r(-f.plant_residual) or 0.0, local=None))
    return LoopFlows(unit="kWh", sources=sources, uses=uses)


def _flows_water(f: WaterFigures) -> LoopFlows:
    sources: list[Flow] = []
    if f.abstraction is not None:
        sources.append(Flow(key="wells", value=f.abstraction, local=True))
    elif f.supply is not None:
        sources.append(Flow(key="supply", value=f.supply, local=None))
    if f.recycled is not None:
        sources.append(Flow(key="recycled", value=f.recycled, local=True))
    uses = [Flow(key=k, value=v) for k, v in (("consumers", f.consumption), ("export", f.export),
                                                 ("losses", f.non_revenue)) if v is not None]
    if f.consumption is None and f.non_revenue is None and f.supply is not None:
        uses.insert(0, Flow(key="network", value=f.supply))
    if f.treatment_loss is not None and f.treatment_loss > 0:
        uses.append(Flow(key="treatment", value=f.treatment_loss))
    if f.recycled is not None:
        uses.append(Flow(key="recycled_use", value=f.recycled))
    return LoopFlows(unit="m³", sources=sources, uses=uses)


async def _generation_split(db: InfluxQL, spec: CellSpec, windows: dict[WindowName, tuple[int, int]],
                            withheld: frozenset[str]) -> dict[WindowName, dict[str, float]]:
    """Electricity generation per kind of source (solar, chp, other_local; households as a group of
    K_MIN or more), from the utility's own generators' meter rows."""
    gens = {s.device: s for s in spec.series if s.loop_role == "electricity.generation"}
    households = sum(1 for s in gens.values() if s.consumer)
    names = list(windows)
    statements = [
        f"SELECT sum({ident('value')}) FROM {ident(METER_MEASUREMENT)} WHERE {ident('cell')} = {literal(spec.cell)} "
        f"AND {ident('loop')} = 'electricity' AND {ident('role')} = 'generation' "
        f"AND {ident('period')} = {literal(tiling_period(a, b, spec.tz))} AND time >= {a}ms AND time < {b}ms "
        f"GROUP BY {ident('device')}" for a, b in windows.values()]
    results = await db.query(*statements)
    out: dict[WindowName, dict[str, float]] = {}
    for name, series in zip(names, results, strict=True):
        split: dict[str, float] = {}
        for s in series:
            g = gens.get(s.tags.get("device", ""))
            if g is None or not s.values or s.values[0][1] is None:
                continue
            if g.consumer:
                if households < K_MIN or "electricity.generation" in withheld:
                    continue
                kind = "households"
            else:
                kind = _KIND.get(g.device_class, "other_local")
            split[kind] = split.get(kind, 0.0) + float(s.values[0][1])
        out[name] = {k: round(v, 3) for k, v in sorted(split.items())}
    return out


async def _today_counts(db: InfluxQL, spec: CellSpec, start: int, until: int) -> tuple[dict[str, int], dict[str, int]]:
    """Today's 15-minute rows per loop, and values per customer meter, up to `until`."""
    devices = sorted(set().union(*consumer_devices(spec).values()))
    if not devices or until <= start:
        return {}, {}
    span = f"{ident('period')} = '15m' AND time >= {start}ms AND time < {until}ms"
    cell = f"{ident('cell')} = {literal(spec.cell)}"
    loops, meters = await db.query(
        f"SELECT count({ident('n_meters')}) FROM {ident(MEASUREMENT)} WHERE {cell} AND {span} GROUP BY {ident('loop')}",
        f"SELECT count({ident('value')}) FROM {ident(METER_MEASUREMENT)} WHERE {cell} AND {span} "
        f"AND {ident('device')} =~ /^({'|'.join(devices)})$/ GROUP BY {ident('device')}")
    return ({s.tags.get("loop", ""): int(s.values[0][1]) for s in loops},
            {s.tags.get("device", ""): int(s.values[0][1]) for s in meters})


async def build_summary(store: BalanceStore, db: InfluxQL, spec: CellSpec, now_ms: int) -> PublicSummary:
    windows = window_bounds(now_ms, spec.tz)
    today_start = windows["today"][0]
    counts = await _today_counts(db, spec, today_start, max(today_start, floor_interval(now_ms)))
    withheld = withheld_roles(spec) | lagging_roles(spec, *counts)
    splits = await _generation_split(db, spec, windows, withheld)
    chp_heat = [s.chp for s in spec.series if s.loop_role == "heat.generation"]
    built: dict[WindowName, Window] = {}
    for name, (a, b) in windows.items():
        totals = await cell_totals(store, spec, a, b)
        until = max(a, min(b, floor_interval(now_ms)))
        elapsed = (until - a) // INTERVAL_MS
        future = (b - a) // INTERVAL_MS - elapsed
        w = Window(from_ms=a, to_ms=b, start=_local(a, spec.tz), end=_local(b, spec.tz), until_ms=until,
                   coverage_pct={})
        for loop, (extract, model) in _FIGURES.items():
            lp = totals.loops.get(loop)
            if lp is None:
                continue
            meters = lp.get("n_meters", 0.0)
            due = elapsed * meters
            have = due - (lp.get("n_missing", 0.0) - future * meters)
            w.coverage_pct[loop] = round(max(0.0, min(100.0, 100.0 * have / due)), 1) if due > 0 else 0.0
            if have <= 0:
                continue  # nothing measured yet: no figures, rather than zeros
            values = {}
            for k, v in extract(lp).items():
                if published(withheld, loop, k):
                    values[k] = _r(v)
                elif v is not None:
                    w.withheld.append(f"{loop}.{k}")
            setattr(w, loop, model(**values))
        if w.electricity is not None:
            w.flows["electricity"] = _flows_electricity(w.electricity, splits[name])
        if w.heat is not None:
            w.flows["heat"] = _flows_heat(w.heat, bool(chp_heat) and all(chp_heat))
        if w.water is not None:
            w.flows["water"] = _flows_water(w.water)
        for loop, flows in w.flows.items():
            flows.withheld = any(x.startswith(f"{loop}.") for x in w.withheld)
        built[name] = w
    today = datetime.fromtimestamp(now_ms / 1000, UTC).astimezone(spec.tz)
    return PublicSummary(cell=spec.cell, name=spec.name, timezone=str(spec.tz), date=today.date(),
                         generated_at=today.replace(microsecond=0), **built)


def _local(ms: int, tz: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC).astimezone(tz)
