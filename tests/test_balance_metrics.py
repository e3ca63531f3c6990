"""The metric definitions of docs/balance.md, with its worked examples, and how roll-ups and the alliance
combine them (from sums, never by averaging ratios)."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pytest

from collector.balance.alliance import CellTotals, alliance_totals, normalised
from collector.balance.metrics import derive
from collector.balance.rows import MEASUREMENT, roll_up

TZ = ZoneInfo("Europe/Berlin")


def test_electricity_worked_example() -> None:
    # docs/balance.md: PV 60 + CHP 480 = 540 kWh generated, 90 imported, 24 exported, pumps 72 metered
    m = derive("electricity", {"generation": 540.0, "grid_import": 90.0, "grid_export": 24.0, "consumption": 72.0})
    assert m["load"] == pytest.approx(606.0)  # 90 + 540 − 24
    assert m["residual"] == pytest.approx(534.0)  # 606 − 72: consumption no meter explains
    assert m["self_sufficiency_pct"] == pytest.approx(85.148515)  # (1 − 90/606) × 100
    assert m["self_consumption_pct"] == pytest.approx(95.555556)  # (1 − 24/540) × 100


def test_electricity_storage_and_edge_cases() -> None:
    m = derive("electricity", {"generation": 100.0, "grid_import": 10.0, "grid_export": 30.0,
                               "storage_charge": 20.0, "storage_discharge": 5.0})
    assert m["load"] == pytest.approx(65.0)  # 10 + 100 + 5 − 30 − 20
    # no load (all exported): fully self-sufficient; no generation: no self-consumption
    assert derive("electricity", {"generation": 50.0, "grid_import": 0.0, "grid_export": 50.0})[
        "self_sufficiency_pct"] == 100.0
    assert derive("electricity", {"generation": 0.0, "grid_import": 20.0, "grid_export": 0.0})[
        "self_consumption_pct"] == 0.0
    # self-sufficiency needs a grid meter; self-consumption needs a generation and an export meter
    assert "self_sufficiency_pct" not in derive("electricity", {"generation": 10.0})
    assert "self_consumption_pct" not in derive("electricity", {"generation": 10.0, "grid_import": 1.0})


def test_chp_worked_example() -> None:
    # 480 kWh el, 960 kWh heat from 180 m³ gas at Hs 10 kWh/m³, z 1.0 = 1800 kWh fuel
    m = derive("chp", {"electricity": 480.0, "heat": 960.0, "fuel": 1800.0})
    assert m == pytest.approx({"power_to_heat": 0.5, "eta_el_pct": 26.666667, "eta_th_pct": 53.333333,
                               "eta_total_pct": 80.0})
    # engine off: no fuel, no heat
    assert derive("chp", {"electricity": 0.0, "heat": 0.0, "fuel": 0.0}) == {
        "power_to_heat": 0.0, "eta_el_pct": 0.0, "eta_th_pct": 0.0, "eta_total_pct": 0.0}
    # without a fuel meter only the power-to-heat ratio
    assert set(derive("chp", {"electricity": 15.0, "heat": 32.0})) == {"power_to_heat"}


def test_heat_worked_example() -> None:
    # generated 960, fed into the network 912, delivered 480 + 336 = 816 kWh
    m = derive("heat", {"generation": 960.0, "feed": 912.0, "delivery": 816.0})
    assert m["network_loss"] == pytest.approx(96.0)  # 912 − 816
    assert m["network_loss_pct"] == pytest.approx(10.526316)  # 96 / 912
    assert m["residual"] == pytest.approx(48.0)  # 960 − 912: generated, never fed (storage, plant losses)
    # without a feed meter the network is fed what was generated (+ imported); no residual to see
    m = derive("heat", {"generation": 960.0, "delivery": 816.0})
    assert m == pytest.approx({"network_loss": 144.0, "network_loss_pct": 15.0})


def test_water_worked_example() -> None:
    # abstracted 240, supplied 230.4, consumed 201.6 m³; pumps 72 kWh; 12 m³ recycled
    m = derive("water", {"abstraction": 240.0, "supply": 230.4, "consumption": 201.6, "pumping_energy": 72.0,
                         "recycled": 12.0})
    assert m["non_revenue"] == pytest.approx(28.8)  # 230.4 − 201.6
    assert m["residual"] == pytest.approx(9.6)  # 240 − 230.4 (treatment)
    assert m["pumping_kwh_per_m3"] == pytest.approx(0.3125)  # 72 / 230.4
    assert m["recycled_share_pct"] == pytest.approx(4.761905)  # 12 / (240 + 12)
    # exports are billed: they are not non-revenue water
    assert derive("water", {"supply": 100.0, "consumption": 80.0, "export": 15.0})["non_revenue"] == pytest.approx(5.0)
    # a cell without consumption meters has no non-revenue figure
    assert "non_revenue" not in derive("water", {"abstraction": 50.0, "supply": 49.0})


def _row(start: int, **fields: float) -> tuple:
    base = {"n_meters": 2.0, "n_intervals": 1.0, "n_missing": 0.0, "n_interpolated": 0.0}
    fields = {**base, **fields}
    fields.update(derive("electricity", fields))
    return (MEASUREMENT, (("cell", "x"), ("loop", "electricity"), ("period", "15m")), start, fields)


def test_roll_up_derives_ratios_from_sums_and_counts_missing_intervals() -> None:
    t0 = 1_793_574_000_000  # 2026-11-02 00:00 Europe/Berlin
    rows = [_row(t0, generation=0.0, grid_import=10.0, grid_export=0.0, n_interpolated=1.0),  # 0 % self-sufficient
            _row(t0 + 900_000, generation=30.0, grid_import=0.0, grid_export=20.0)]  # 100 %
    (hour,) = roll_up(rows, "1h", TZ)
    f = hour[3]
    assert hour[2] == t0 and dict(hour[1])["period"] == "1h"
    # sums: import 10, generation 30, export 20 → load 20; self-sufficiency (1 − 10/20) = 50 %, which is
    # also the average of 0 % and 100 % here by chance — self-consumption shows the difference:
    # (1 − 20/30) = 33.3 % from the sums, while the intervals' 0 % (no generation) and 33.3 % average 16.7 %
    assert (f["grid_import"], f["generation"], f["load"]) == (10.0, 30.0, 20.0)
    assert f["self_sufficiency_pct"] == pytest.approx(50.0)
    assert f["self_consumption_pct"] == pytest.approx(33.333333)
    # the hour has 4 intervals, 2 with rows: the other 2 × 2 meters are missing
    assert (f["n_intervals"], f["n_missing"], f["n_interpolated"], f["n_meters"]) == (4.0, 4.0, 1.0, 2.0)


def _cell(cell: str, residents: int | None, connections: int | None, water: dict[str, float]) -> CellTotals:
    loops = {"water": {**water, **derive("water", water), "n_meters": float(len(water)), "n_missing": 0.0,
                       "n_intervals": 96.0}}
    t = CellTotals(cell, cell.title(), residents, connections, 0, 86_400_000, loops)
    t.per_resident, t.per_connection = normalised(loops, residents, connections)
    return t


def test_alliance_sums_quantities_and_computes_metrics_over_the_cells_that_meter_them() -> None:
    a = _cell("a", 800, 300, {"abstraction": 240.0, "supply": 230.4, "consumption": 201.6})
    b = _cell("b", 200, None, {"abstraction": 60.0, "supply": 59.0})  # no consumption meters
    assert a.per_resident["water"]["non_revenue"] == pytest.approx(28.8 / 800)
    assert a.per_connection["water"]["supply"] == pytest.approx(230.4 / 300)
    assert b.per_connection == {}
    total = alliance_totals([a, b])
    w = total.loops["water"]
    assert (w["abstraction"], w["supply"], w["consumption"]) == pytest.approx((300.0, 289.4, 201.6))
    # non-revenue water only where consumption is metered (a): 28.8, not 289.4 − 201.6 = 87.8
    assert w["non_revenue"] == pytest.approx(28.8)
    assert total.cells_by_field["water"]["non_revenue"] == ["a"]
    assert w["residual"] == pytest.approx(9.6 + 1.0)  # both meter abstraction and supply
    # per resident over the cells behind each figure: supply / (800 + 200), non-revenue / 800
    assert total.per_resident["water"]["supply"] == pytest.approx(289.4 / 1000)
    assert total.per_resident["water"]["non_revenue"] == pytest.approx(28.8 / 800)
    # per connection: b gives no connections, so figures that involve b have none
    assert "supply" not in total.per_connection["water"]
    assert total.per_connection["water"]["non_revenue"] == pytest.approx(28.8 / 300)
    assert (total.residents, total.connections, w["n_meters"]) == (1000, None, 5.0)


def test_days_and_hours_follow_local_time_across_the_clock_change() -> None:
    from collector.balance.timegrid import parse_time, period_starts

    # Sunday 25 October 2026: clocks go back at 03:00 CEST → 02:00 CET, so the day has 25 hours = 100 intervals
    day = parse_time("2026-10-25", TZ)
    assert day == parse_time("2026-10-24T22:00:00Z", TZ)
    hours = period_starts(day, parse_time("2026-10-26", TZ), "1h", TZ)
    assert len(hours) == 25
    rows = [_row(t, generation=1.0, grid_import=1.0, grid_export=0.0) for t in range(day, day + 25 * 3_600_000,
                                                                                       900_000)]
    (d,) = roll_up(rows, "1d", TZ)
    assert d[2] == day and (d[3]["n_intervals"], d[3]["n_missing"], d[3]["generation"]) == (100.0, 0.0, 100.0)
    (month,) = roll_up([d], "1mo", TZ)
    # October 2026: 31 days × 96 + 4 (the extra hour) = 2980 intervals; 2880 missing × 2 meters
    assert month[2] == parse_time("2026-10-01", TZ) and (month[3]["n_intervals"], month[3]["n_missing"]) == (
        2980.0, 5760.0)
