"""Cell balance: one dashboard per cell, without template variables, so Grafana's public (externally shared)
dashboards can show it. Everything comes from `kwwk_balance` (docs/balance.md §6): energy and water flows
from the 15-minute rows, daily ratios from the `1d` rows, closure residuals from the `1h` rows, and the
figures over the selected range derived again from the sums of 15-minute rows, as the engine derives them.

Which loops, roles and metrics appear is read from the cell config through the balance engine's own spec
(collector/balance/spec.py) and definitions (collector/balance/metrics.py): a cell without a fuel meter
gets no efficiencies, a cell without a feed meter no heat residual.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import stat, timeseries
from grafana_foundation_sdk.models import common

from collector.balance.metrics import derive
from collector.balance.spec import CellSpec, build_cell_spec
from dashboards.board import BALANCE, Board, Built, Expect, Target, ident, literal
from dashboards.units import BLUE, GREEN, ORANGE, RED, grafana_unit, residual_steps, steps
from edge.cell import CellConfig

__all__ = ["balance_dashboard", "loop_fields"]

LOOP_TITLES = {"electricity": "Electricity", "heat": "Heat", "water": "Water", "chp": "CHP", "fuel": "Fuel"}
LOOP_UNIT = {"electricity": "kWh", "heat": "kWh", "water": "m³", "fuel": "kWh", "chp": "kWh"}
Row = dict[str, float]


@dataclass
class Kpi:
    """A figure over the selected range, derived from sums of 15-minute rows exactly as the engine derives
    it from a period's sums; `engine` computes the same figure from a period row (the test compares them)."""

    title: str
    loop: str
    expr: str
    unit: str
    engine: Callable[[Row], float]
    thresholds: object | None = None
    description: str = ""
    decimals: int = 1


def _s(name: str) -> str:
    return f"sum({ident(name)})"


def loop_fields(spec: CellSpec) -> dict[str, list[str]]:
    """Fields of each `kwwk_balance` loop row of this cell: metered roles, extra quantities, metrics."""
    out: dict[str, list[str]] = {}
    pumps = any(s.loop_role == "electricity.consumption" and s.device_class == "pump" for s in spec.series)
    for loop in spec.loops():
        base = {r: 1.0 for r in spec.roles(loop)}
        if loop == "water" and pumps:
            base["pumping_energy"] = 1.0
        if loop == "fuel" and any(s.native_volume for s in spec.series if s.loop == "fuel"):
            base["input_m3"] = 1.0
        out[loop] = [*base, *derive(loop, base)]
    if spec.has_chp:
        base = {"electricity": 1.0, "heat": 1.0}
        if "fuel" in out:
            base["fuel"] = 1.0
        out["chp"] = [*base, *derive("chp", base)]
    return out


def _kpis(fields: dict[str, list[str]]) -> list[Kpi]:
    k: list[Kpi] = []
    el, heat, water, chp = (set(fields.get(x, ())) for x in ("electricity", "heat", "water", "chp"))
    if "self_sufficiency_pct" in el:
        k.append(Kpi("Self-sufficiency", "electricity", f"100 * (1 - {_s('grid_import')} / {_s('load')})", "%",
                     lambda r: r["self_sufficiency_pct"],
                     steps((None, RED), (30, ORANGE), (60, GREEN)),
                     "Share of the cell's electricity load not drawn from the grid"))
    if "self_consumption_pct" in el:
        k.append(Kpi("Self-consumption", "electricity", f"100 * (1 - {_s('grid_export')} / {_s('generation')})", "%",
                     lambda r: r["self_consumption_pct"], steps((None, BLUE)),
                     "Share of local generation used in the cell rather than exported"))
    if "network_loss_pct" in heat:
        fed = _s("feed") if "feed" in heat else " + ".join(_s(r) for r in ("generation", "import") if r in heat)
        k.append(Kpi("Heat network loss", "heat", f"100 * (({fed}) - {_s('delivery')}) / ({fed})", "%",
                     lambda r: r["network_loss_pct"], steps((None, GREEN), (12, ORANGE), (20, RED)),
                     "Heat fed into the network but not delivered to consumers"))
    if "non_revenue" in water:
        v_in = "supply" if "supply" in water else "abstraction"
        k.append(Kpi("Non-revenue water", "water", f"100 * {_s('non_revenue')} / {_s(v_in)}", "%",
                     lambda r, v=v_in: 100 * r["non_revenue"] / r[v], steps((None, GREEN), (10, ORANGE), (20, RED)),
                     f"Water put into supply but not metered at consumers (IWA), share of {v_in}"))
    if "pumping_kwh_per_m3" in water:
        v_in = "supply" if "supply" in water else "abstraction"
        k.append(Kpi("Pumping energy per m³", "water", f"{_s('pumping_energy')} / {_s(v_in)}", "kWh/m³",
                     lambda r: r["pumping_kwh_per_m3"], steps((None, GREEN), (0.6, ORANGE), (1.0, RED)),
                     f"Electricity of the cell's pumps per m³ of {v_in}", decimals=3))
    if "eta_total_pct" in chp:
        k.append(Kpi("CHP total efficiency", "chp", f"100 * ({_s('electricity')} + {_s('heat')}) / {_s('fuel')}", "%",
                     lambda r: r["eta_total_pct"], steps((None, RED), (70, ORANGE), (80, GREEN)),
                     "Electricity plus heat per fuel energy (gross calorific value Hs, as billed)"))
        k.append(Kpi("CHP electrical efficiency", "chp", f"100 * {_s('electricity')} / {_s('fuel')}", "%",
                     lambda r: r["eta_el_pct"], steps((None, BLUE)), "Electricity per fuel energy (Hs)"))
    if "power_to_heat" in chp:
        k.append(Kpi("Power-to-heat ratio", "chp", f"{_s('electricity')} / {_s('heat')}", "",
                     lambda r: r["power_to_heat"], steps((None, BLUE)), "CHP electricity per CHP heat (2012/27/EU)",
                     decimals=2))
    for loop, title, den_roles in (("electricity", "Electricity residual", ("load",)),
                                   ("heat", "Heat residual", ("generation", "import")),
                                   ("water", "Water residual", ("abstraction",))):
        have = set(fields.get(loop, ()))
        if "residual" not in have:
            continue
        den = [r for r in den_roles if r in have]
        k.append(Kpi(title, loop, f"100 * {_s('residual')} / ({' + '.join(_s(r) for r in den)})", "%",
                     lambda r, d=tuple(den): 100 * r["residual"] / sum(r[x] for x in d), residual_steps(loop),
                     _RESIDUAL_TEXT[loop]))
    return k


_RESIDUAL_TEXT = {
    "electricity": "Load no consumption meter explains (unmetered households), share of the load. "
                   "Red when negative: meters report more consumed than available.",
    "heat": "Heat produced but never fed into the network (plant losses, storage), share of production. "
            "Red beyond ±10 %: a meter or an unmetered boiler is wrong.",
    "water": "Water abstracted but not supplied (treatment backwash, storage), share of abstraction. "
             "Red beyond ±10 %.",
}
_FLOW_ORDER = ("generation", "import", "feed", "grid_import", "storage_discharge", "abstraction", "supply", "recycled",
               "input", "electricity", "heat", "fuel", "consumption", "delivery", "grid_export", "storage_charge",
               "export", "load", "network_loss", "non_revenue", "pumping_energy")
_RATIOS = {"electricity": ("self_sufficiency_pct", "self_consumption_pct"), "heat": ("network_loss_pct",),
           "water": ("recycled_share_pct",), "chp": ("eta_el_pct", "eta_th_pct", "eta_total_pct")}


def balance_dashboard(cfg: CellConfig, datasource_uid: str) -> Built:
    spec = build_cell_spec(cfg)
    cell = cfg.cell.id
    fields = loop_fields(spec)
    tags = ["balance", f"cell:{cell}"] + (["public"] if cfg.cell.public else [])
    b = Board(f"kwwk-balance-{cell}", f"{cfg.cell.name}: energy, heat and water balance", BALANCE, tags=tags,
              description=f"Balance of the cell {cfg.cell.name} ({cell}) (measurement kwwk_balance). No template variables, "
                          "so it can be shared publicly. Generated by `kwwk dashboards build`; do not edit.",
              time_from="now-7d", refresh="5m", datasource_uid=datasource_uid)
    where = f"{ident('cell')} = {literal(cell)}"

    def q(loop: str, period: str) -> str:
        return (f"FROM {ident('kwwk_balance')} WHERE {where} AND {ident('loop')} = {literal(loop)} "
                f"AND {ident('period')} = {literal(period)} AND $timeFilter")

    # -- overview: figures over the selected range ------------------------------------------------
    b.row("Over the selected range")
    for kpi in _kpis(fields):
        panel = (stat.Panel().title(kpi.title).description(kpi.description).unit(grafana_unit(kpi.unit))
                 .decimals(kpi.decimals).color_mode(common.BigValueColorMode.BACKGROUND)
                 .graph_mode(common.BigValueGraphMode.NONE)
                 .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
        if kpi.thresholds is not None:
            panel.thresholds(kpi.thresholds)
        b.panel(panel, Target(f"SELECT {kpi.expr} AS {ident('value')} {q(kpi.loop, '15m')}",
                              Expect(columns=["value"], kpi=(kpi.loop, kpi.engine))), width=4, height=4)
    b.panel(stat.Panel().title("Data complete").unit("percent").decimals(1)
            .description("Meter-intervals with a value, of all meter-intervals of the range (all loops)")
            .color_mode(common.BigValueColorMode.BACKGROUND).graph_mode(common.BigValueGraphMode.NONE)
            .thresholds(steps((None, RED), (95, ORANGE), (99, GREEN))),
            Target(f"SELECT 100 * (1 - {_s('n_missing')} / {_s('n_meters')}) AS {ident('value')} "
                   f"FROM {ident('kwwk_balance')} WHERE {where} AND {ident('period')} = '15m' AND $timeFilter",
                   Expect(columns=["value"])), width=4, height=4)

    # -- one row per loop ------------------------------------------------------------------------------
    for loop in [*spec.loops(), *(["chp"] if spec.has_chp else [])]:
        have = fields[loop]
        unit = grafana_unit(LOOP_UNIT[loop])
        b.row(LOOP_TITLES[loop])
        flows = [f for f in _FLOW_ORDER if f in have and not (loop == "fuel" and f == "input_m3")]
        if flows:
            sel = ", ".join(f"{_s(f)} AS {ident(f)}" for f in flows)
            b.panel(timeseries.Panel().title(f"{LOOP_TITLES[loop]} per interval").unit(unit).interval("15m")
                    .description("Sums of the 15-minute balance rows per displayed interval")
                    .draw_style(common.GraphDrawStyle.BARS).fill_opacity(60).line_width(1),
                    Target(f"SELECT {sel} {q(loop, '15m')} GROUP BY time($__interval) fill(none)",
                           Expect(columns=flows), alias="$col"))
        ratios = [f for f in _RATIOS.get(loop, ()) if f in have]
        if ratios:
            sel = ", ".join(ident(f) for f in ratios)
            b.panel(timeseries.Panel().title(f"{LOOP_TITLES[loop]}: daily ratios").unit("percent").min(0).max(100)
                    .description("From the day rows (period 1d): ratios derived from each day's sums")
                    .draw_style(common.GraphDrawStyle.BARS).fill_opacity(40),
                    Target(f"SELECT {sel} {q(loop, '1d')}", Expect(columns=ratios), alias="$col"))
        if loop == "water" and "pumping_kwh_per_m3" in have:
            b.panel(timeseries.Panel().title("Pumping energy per m³, daily").unit(grafana_unit("kWh/m³")).decimals(3)
                    .draw_style(common.GraphDrawStyle.BARS).fill_opacity(40)
                    .thresholds(steps((None, GREEN), (0.6, ORANGE), (1.0, RED)))
                    .thresholds_style(cb.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED)),
                    Target(f"SELECT {ident('pumping_kwh_per_m3')} {q(loop, '1d')}",
                           Expect(columns=["pumping_kwh_per_m3"]), alias="$col"))
        if loop == "fuel" and "input_m3" in have:
            b.panel(timeseries.Panel().title("Gas volume per interval").unit(grafana_unit("m³")).interval("15m")
                    .draw_style(common.GraphDrawStyle.BARS).fill_opacity(60),
                    Target(f"SELECT {_s('input_m3')} AS {ident('input_m3')} {q(loop, '15m')} "
                           "GROUP BY time($__interval) fill(none)", Expect(columns=["input_m3"]), alias="$col"))
        if "residual" in have:
            den = {"electricity": ("load",), "heat": ("generation", "import"), "water": ("abstraction",)}[loop]
            den = tuple(r for r in den if r in have)
            expr = f"100 * {ident('residual')} / ({' + '.join(ident(r) for r in den)})"
            b.panel(timeseries.Panel().title(f"{LOOP_TITLES[loop]} closure residual, hourly").unit("percent")
                    .description(_RESIDUAL_TEXT[loop]).thresholds(residual_steps(loop))
                    .thresholds_style(cb.GraphThresholdsStyleConfig()
                                      .mode(common.GraphThresholdsStyleMode.LINE_AND_AREA)),
                    Target(f"SELECT {expr} AS {ident('residual_pct')} {q(loop, '1h')}",
                           Expect(columns=["residual_pct"]), alias="residual %"))
            b.panel(timeseries.Panel().title(f"{LOOP_TITLES[loop]} closure residual per interval").unit(unit)
                    .interval("15m").draw_style(common.GraphDrawStyle.BARS).fill_opacity(60),
                    Target(f"SELECT {_s('residual')} AS {ident('residual')} {q(loop, '15m')} "
                           "GROUP BY time($__interval) fill(none)", Expect(columns=["residual"]), alias="$col"))

    # -- data quality ------------------------------------------------------------------------------------
    b.row("Data quality", collapsed=True)
    counts = ("n_missing", "n_interpolated", "n_estimated", "n_capped", "n_reset", "n_rollover", "n_meter_change",
              "n_spike", "n_drop")
    sel = ", ".join(f"{_s(c)} AS {ident(c[2:])}" for c in counts)
    b.panel(timeseries.Panel().title("Meter-intervals by flag").unit("none").interval("15m")
            .description("How many meter-intervals were missing, interpolated across a gap, estimated from a "
                         "power or flow, capped, or hit a reset, rollover, meter change, spike or drop")
            .draw_style(common.GraphDrawStyle.BARS).stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL)),
            Target(f"SELECT {sel} FROM {ident('kwwk_balance')} WHERE {where} AND {ident('period')} = '15m' "
                   "AND $timeFilter GROUP BY time($__interval), \"loop\" fill(none)",
                   Expect(series=[{"loop": loop} for loop in spec.loops()], columns=[c[2:] for c in counts]),
                   alias="$tag_loop $col"), width=24)
    return b.build()
