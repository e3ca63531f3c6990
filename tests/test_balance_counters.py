"""Counter and rate arithmetic of the balance engine, series by series, with hand-computed numbers.

Times are minutes from 00:00 UTC of 2026-11-02; intervals are 15 minutes. Quantities in kWh or m³.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from collector.balance.counters import counter_intervals
from collector.balance.rates import rate_intervals
from collector.balance.spec import BalanceConfigError, MeterChange, SeriesSpec, build_cell_spec
from edge.cell import CellConfig

T0 = 1_793_577_600_000  # 2026-11-02T00:00:00Z
MIN = 60_000


def at(minute: float) -> int:
    return T0 + int(minute * MIN)


def starts(first_min: int, n: int) -> list[int]:
    return [at(first_min + 15 * k) for k in range(n)]


SPEC = SeriesSpec(device="m", point="energy_import", measurement="electricity_meter", loop="electricity",
                  role="grid_import", kind="counter", unit="kWh", to_loop=1.0, native_volume=False, rated=12.0,
                  modulus=None, abs_res=0.0, rel_res=0.0, gap_ms=300_000, device_class="electricity_meter",
                  chp=False, consumer=False)


def linear(rate_per_h: float, start_value: float, minutes: range, offset: float = 0.0) -> list[tuple[int, float]]:
    return [(at(m), start_value + rate_per_h * (m - offset) / 60) for m in minutes]


def values(ivs):  # noqa: ANN001, ANN201
    return [None if iv.value is None else round(iv.value, 9) for iv in ivs]


def test_boundaries_are_read_off_the_line_between_readings() -> None:
    # readings every 5 minutes from 00:02 to 00:47 at 6 kWh/h: 0.5 kWh per reading step
    readings = linear(6.0, 100.0, range(2, 48, 5), offset=2)
    ivs = counter_intervals(readings, SPEC, starts(0, 4))
    # 00:00 lies before the first reading → missing; 00:15..00:30 = 15 min × 6 kWh/h = 1.5 kWh;
    # 00:45 is read off the line (00:42..00:47), but 01:00 lies after the last reading → missing
    assert values(ivs) == [None, 1.5, 1.5, None]
    assert all(iv.flags == frozenset() for iv in ivs)


def test_reset_counts_from_zero() -> None:
    # 10 kWh/h; the meter restarts from 0 at 00:22:30; readings every 5 min
    readings = [(at(m), 500.0 + 10 * m / 60) for m in range(0, 21, 5)]  # .. 00:20 = 503.3333
    readings += [(at(m), 10 * (m - 22.5) / 60) for m in range(25, 61, 5)]  # 00:25 = 0.41667
    ivs = counter_intervals(readings, SPEC, starts(0, 4))
    # 00:15-00:30: 00:15→00:20 = 0.83333, 00:20→00:25 counted from zero = 0.41667 (the 0.41667 before the
    # reset is lost with the meter's memory), 00:25→00:30 = 0.83333: 2.08333 instead of 2.5
    assert values(ivs) == pytest.approx([2.5, 2.5 - 10 * 2.5 / 60, 2.5, 2.5], abs=1e-9)
    assert [sorted(iv.flags) for iv in ivs] == [[], ["reset"], [], []]


def test_rollover_adds_the_modulus() -> None:
    spec = replace(SPEC, modulus=6553.6, abs_res=0.1)  # u16 register × 0.1 kWh
    readings = [(at(m), round((6550.0 + 12 * m / 60) % 6553.6, 1)) for m in range(0, 31, 5)]
    # 6550.0, 6551.0, 6552.0, 6553.0, 0.4 (= 6554.0 − 6553.6), 1.4, 2.4
    ivs = counter_intervals(readings, spec, starts(0, 2))
    assert values(ivs) == pytest.approx([3.0, 3.0], abs=1e-9)  # 12 kWh/h × 15 min
    assert [sorted(iv.flags) for iv in ivs] == [[], ["rollover"]]


@pytest.mark.parametrize("glitch", [0.0, 9_999_999.0, 480.0])
def test_a_single_glitch_is_dropped(glitch: float) -> None:
    # 12 kWh/h from 1000 kWh; the reading at 00:20 is garbage (a zero, a huge number, a small fall)
    readings = [(at(m), 1000.0 + 12 * m / 60) for m in range(0, 31, 5)]
    readings[4] = (at(20), glitch)
    ivs = counter_intervals(readings, SPEC, starts(0, 2))
    assert values(ivs) == pytest.approx([3.0, 3.0], abs=1e-9)
    assert "spike" in ivs[1].flags and "reset" not in ivs[1].flags


def test_a_glitch_up_within_the_cap_is_taken_back() -> None:
    # +0.5 kWh at 00:10 is within the cap (12 kWh/h × 5 min × 1.1 = 1.1 kWh) but 00:15 falls back
    readings = [(at(m), 1000.0 + 12 * m / 60) for m in range(0, 31, 5)]
    readings[2] = (at(10), readings[2][1] + 0.5)
    ivs = counter_intervals(readings, SPEC, starts(0, 2))
    assert values(ivs) == pytest.approx([3.0, 3.0], abs=1e-9)
    assert "spike" in ivs[0].flags


def test_a_persistent_jump_counts_only_the_cap() -> None:
    # at 00:20 the counter jumps by 100 kWh and stays up (rated 12 kWh/h)
    readings = [(at(m), 1000.0 + 12 * m / 60 + (100 if m >= 20 else 0)) for m in range(0, 46, 5)]
    ivs = counter_intervals(readings, SPEC, starts(0, 3))
    # the step 00:15→00:20 counts its cap, 12 kWh/h × 5/60 h × 1.1 = 1.1 kWh, instead of 101 kWh:
    # 00:15-00:30 = 1.1 + 2 × 1.0 = 3.1 kWh
    assert values(ivs) == pytest.approx([3.0, 3.1, 3.0], abs=1e-9)
    assert ivs[1].flags == frozenset({"capped"})


def test_an_unexplained_fall_adds_nothing() -> None:
    # at 00:20 a new meter reading 400 kWh appears without a change record; it then counts on
    readings = [(at(m), 1000.0 + 12 * m / 60) for m in range(0, 16, 5)]
    readings += [(at(m), 400.0 + 12 * (m - 20) / 60) for m in range(20, 46, 5)]
    ivs = counter_intervals(readings, SPEC, starts(0, 3))
    # 00:15→00:20 is unknown (counts 0), the rest counts on: 00:15-00:30 = 0 + 1 + 1 = 2 kWh
    assert values(ivs) == pytest.approx([3.0, 2.0, 3.0], abs=1e-9)
    assert ivs[1].flags == frozenset({"drop"})


def test_meter_change_splits_the_counter() -> None:
    # old meter at 12 kWh/h from 1000 kWh until 00:22 (final 1004.4), new meter from 7.0 kWh
    change = [(at(22), 1000.0 + 12 * 22 / 60, 7.0)]
    readings = [(at(m), 1000.0 + 12 * m / 60) for m in range(0, 21, 5)]
    readings += [(at(m), 7.0 + 12 * (m - 22) / 60) for m in range(25, 46, 5)]
    ivs = counter_intervals(readings, SPEC, starts(0, 3), change)
    # 00:15-00:30: old meter 00:15→00:22 = 1.4, new meter 00:22→00:30 = 1.6: 3.0 kWh
    assert values(ivs) == pytest.approx([3.0, 3.0, 3.0], abs=1e-9)
    assert [sorted(iv.flags) for iv in ivs] == [[], ["meter_change"], []]
    # without the record the new meter's 7 kWh start looks like a reset: 00:20→00:25 counts 7.6 kWh from 0,
    # capped at 12 kWh/h × 5 min × 1.1 = 1.1 kWh
    ivs = counter_intervals(readings, SPEC, starts(0, 3))
    assert ivs[1].value == pytest.approx(1.0 + 1.1 + 1.0) and "reset" in ivs[1].flags


def test_gap_is_interpolated_and_flagged_where_a_boundary_falls_in_it() -> None:
    # 6 kWh/h until 00:40, 10 kWh/h after; no readings between 00:10 and 01:05
    def value(m: float) -> float:
        return 200.0 + 6 * min(m, 40) / 60 + 10 * max(0.0, m - 40) / 60

    readings = [(at(m), value(m)) for m in [*range(0, 11, 5), *range(65, 91, 5)]]
    ivs = counter_intervals(readings, SPEC, starts(0, 6))
    # across the gap 00:10→01:05 the counter rose 6 kWh/h × 30 min + 10 kWh/h × 25 min = 3.0 + 4.1666667
    # = 7.1666667 kWh in 55 min: 0.1303030 kWh/min, which the boundaries 00:15 .. 01:00 are read off
    # 00:00-00:15: 1.0 (to 00:10) + 5 × 0.1303030 = 1.6515152; 00:15, 00:30, 00:45: 15 × 0.1303030 = 1.9545455
    # 01:00-01:15: 5 × 0.1303030 + 10 min × 10 kWh/h = 0.6515152 + 1.6666667 = 2.3181818; 01:15-01:30: 2.5
    slope = (3.0 + 25 / 6) / 55
    assert values(ivs) == pytest.approx([1 + 5 * slope, 15 * slope, 15 * slope, 15 * slope, 5 * slope + 10 / 6, 2.5])
    assert values(ivs) == pytest.approx([1.6515152, 1.9545455, 1.9545455, 1.9545455, 2.3181818, 2.5], abs=1e-7)
    assert [("interpolated" in iv.flags) for iv in ivs] == [True, True, True, True, True, False]
    assert sum(iv.value for iv in ivs) == pytest.approx(value(90) - value(0))  # counters lose nothing


RATE = replace(SPEC, point="power", kind="rate", unit="W", to_loop=0.001, rated=50_000.0)


def test_power_is_integrated_and_flagged_estimated() -> None:
    # 12 kW constant for 00:00-00:15; then a ramp from +6 kW at 00:15 to −6 kW at 00:30 (export side)
    readings = [(at(m), 12_000.0) for m in range(0, 16, 5)]
    readings += [(at(m), 6_000.0 - 12_000.0 * (m - 15) / 15) for m in range(20, 31, 5)]
    readings[3] = (at(15), 6_000.0)
    ivs = rate_intervals(readings, RATE, starts(0, 3))
    # 00:00-00:15: 12 kW held from 00:00 to 00:10, then straight to 6 kW at 00:15:
    #   12 kW × 10 min + (12 + 6)/2 kW × 5 min = 2.0 + 0.75 = 2.75 kWh (= 2750 Wh before to_loop)
    # 00:15-00:30: only the positive part of the ramp counts: 6 kW × 7.5 min / 2 = 0.375 kWh
    # 00:30-00:45: no reading after 00:30 → missing
    assert [None if v.value is None else round(v.value * RATE.to_loop, 9) for v in ivs] == [2.75, 0.375, None]
    assert all("estimated" in iv.flags for iv in ivs)


def test_rate_above_its_rating_is_clipped() -> None:
    readings = [(at(m), 80_000.0 if m == 5 else 10_000.0) for m in range(0, 16, 5)]
    ivs = rate_intervals(readings, RATE, starts(0, 1))
    # 80 kW clipped to the 50 kW rating: 00:00-00:05 and 00:05-00:10 average 30 kW, 00:10-00:15 10 kW:
    # (30 + 30 + 10) kW × 5 min = 5.8333 kWh
    assert ivs[0].value * RATE.to_loop == pytest.approx(70 * 5 / 60)
    assert ivs[0].flags == frozenset({"estimated", "capped"})


CELL = {
    "cell": {"id": "specdorf", "name": "Specdorf", "residents": 100, "connections": 40},
    "fuel": {"calorific_value_kwh_m3": 10.0, "correction_factor": 0.95},
    "gateways": [{"id": "gw", "poll_interval": 120, "devices": [
        {"id": "gas", "profile": "isma_sfar_1m_4di", "connection": {"host": "h"}, "roles": {"volume": "fuel.input"}},
        {"id": "chp", "profile": "kwenergy_smartblock", "connection": {"host": "h"},
         "roles": {"energy_export": "electricity.generation", "heat_energy": "heat.generation"}},
        {"id": "grid", "profile": "eastron_sdm630", "connection": {"host": "h"},
         "roles": {"energy_import": "electricity.grid_import"}},
        {"id": "net", "profile": "siemens_mag6000", "connection": {"host": "h"}, "roles": {"volume": "water.supply"}},
        {"id": "pv", "profile": "eastron_sdm72", "connection": {"host": "h"},
         "roles": {"power": "electricity.generation"}},
    ]}],
}


def test_spec_reads_roles_units_ratings_and_rollover_from_config_and_profiles() -> None:
    spec = build_cell_spec(CellConfig.model_validate(CELL), ratings={("chp", "heat_energy"): 110.0})
    by = {s.key: s for s in spec.series}
    gas = by[("gas", "volume")]
    # gas m³ × 10 kWh/m³ × 0.95 = 9.5 kWh per m³; u32 × 0.01 m³ rolls over at 2^32 × 0.01 m³
    assert (gas.loop, gas.to_loop, gas.native_volume) == ("fuel", pytest.approx(9.5), True)
    assert gas.modulus == pytest.approx(42_949_672.96) and gas.rated is None  # a pulse counter has no flow
    # the CHP's power range [0, 100000] W rates its energy counter at 100 kWh/h; heat from the override
    assert by[("chp", "energy_export")].rated == 100.0 and by[("chp", "heat_energy")].rated == 110.0
    assert by[("chp", "energy_export")].chp and by[("chp", "energy_export")].abs_res == 1.0
    # f32 counter of the SDM630: power range ±200 kW, no rollover, relative resolution
    assert (by[("grid", "energy_import")].rated, by[("grid", "energy_import")].modulus) == (200.0, None)
    # a power point is integrated: W × h → kWh, rated by its own range (75 kW)
    assert (by[("pv", "power")].kind, by[("pv", "power")].to_loop, by[("pv", "power")].rated) == ("rate", 0.001, 75_000)
    # gaps: three polls of 120 s = 360 s, more than the 300 s minimum
    assert by[("net", "volume")].gap_ms == 360_000
    assert spec.roles("electricity") == ["generation", "grid_import"] and spec.has_chp


def test_spec_errors_name_the_cell_device_and_point() -> None:
    bad = {**CELL, "gateways": [{"id": "gw", "devices": [
        {"id": "grid", "profile": "eastron_sdm630", "connection": {"host": "h"},
         "roles": {"energy_import": "water.supply"}}]}]}
    with pytest.raises(BalanceConfigError, match=r"'specdorf'.*'grid'.*'energy_import'.*m³"):
        build_cell_spec(CellConfig.model_validate(bad))
    from datetime import UTC, datetime

    with pytest.raises(BalanceConfigError, match="must name its point"):
        build_cell_spec(CellConfig.model_validate(CELL),
                        meter_changes=[MeterChange("chp", None, datetime(2026, 11, 2, tzinfo=UTC), 1.0, 0.0)])
    spec = build_cell_spec(CellConfig.model_validate(CELL),
                           meter_changes=[MeterChange("gas", None, datetime(2026, 11, 2, tzinfo=UTC), 1.0, 0.0)])
    assert spec.changes == {("gas", "volume"): [(T0, 1.0, 0.0)]}
