"""Balance rows in the storage schema: 15-minute rows built from the meters' interval values, and their
roll-up to hours, days and months (quantities and quality counts summed, metrics derived again from
the sums). A row is a line-protocol row: (measurement, tags, start ms, float fields).

`kwwk_balance`        tags cell, loop, period             one row per loop (and the `chp` pseudo-loop)
`kwwk_balance_meter`  tags cell, loop, role, device, point, period    one row per metered series
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from zoneinfo import ZoneInfo

from collector.balance.counters import FLAGS, IntervalValue
from collector.balance.metrics import DERIVED, derive
from collector.balance.spec import CellSpec, SeriesSpec
from collector.balance.timegrid import INTERVAL_MS, Period, period_end, period_start
from collector.lineprotocol import Row

__all__ = ["MEASUREMENT", "METER_MEASUREMENT", "loop_rows", "meter_rows", "roll_up", "row_tags", "sum_fields"]

MEASUREMENT = "kwwk_balance"
METER_MEASUREMENT = "kwwk_balance_meter"
_CONSTANT = frozenset({"n_meters"})


def row_tags(row: Row) -> dict[str, str]:
    return dict(row[1])


def _tags(**kw: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kw.items()))


def _counts(values: Sequence[IntervalValue | None]) -> dict[str, float]:
    out = {"n_meters": float(len(values)), "n_intervals": 1.0,
           "n_missing": float(sum(1 for v in values if v is None or v.value is None))}
    for flag in FLAGS:
        out[f"n_{flag}"] = float(sum(1 for v in values if v is not None and flag in v.flags))
    return out


def _q(s: SeriesSpec, v: IntervalValue | None) -> float:
    return v.value * s.to_loop if v is not None and v.value is not None else 0.0


def loop_rows(spec: CellSpec, start: int, values: Mapping[tuple[str, str], IntervalValue]) -> list[Row]:
    """The 15-minute rows of every loop of a cell for the interval starting at `start`.

    values: (device, point) → that series' interval value. A loop none of whose meters has a value gets no row.
    """
    rows: list[Row] = []
    by_loop: dict[str, list[SeriesSpec]] = {}
    for s in spec.series:
        by_loop.setdefault(s.loop, []).append(s)
    for loop in spec.loops():
        series = by_loop[loop]
        vals = [values.get(s.key) for s in series]
        if all(v is None or v.value is None for v in vals):
            continue
        fields: dict[str, float] = {role: 0.0 for role in spec.roles(loop)}
        for s, v in zip(series, vals, strict=True):
            fields[s.role] += _q(s, v)
        if loop == "water":
            pumps = [s for s in spec.series if s.loop_role == "electricity.consumption" and s.device_class == "pump"]
            if pumps:
                fields["pumping_energy"] = sum(_q(s, values.get(s.key)) for s in pumps)
        if loop == "fuel" and any(s.native_volume for s in series):
            fields["input_m3"] = sum(v.value for s, v in zip(series, vals, strict=True)
                                     if s.native_volume and v is not None and v.value is not None)
        fields.update(derive(loop, fields))
        fields.update(_counts(vals))
        rows.append((MEASUREMENT, _tags(cell=spec.cell, loop=loop, period="15m"), start, fields))
    if spec.has_chp:
        el = [s for s in spec.series if s.chp and s.loop_role == "electricity.generation"]
        th = [s for s in spec.series if s.chp and s.loop_role == "heat.generation"]
        fuel = [s for s in spec.series if s.loop == "fuel"]
        vals = [values.get(s.key) for s in (*el, *th, *fuel)]
        if not all(v is None or v.value is None for v in vals):
            fields = {"electricity": sum(_q(s, values.get(s.key)) for s in el),
                      "heat": sum(_q(s, values.get(s.key)) for s in th)}
            if fuel:
                fields["fuel"] = sum(_q(s, values.get(s.key)) for s in fuel)
            fields.update(derive("chp", fields))
            fields.update(_counts(vals))
            rows.append((MEASUREMENT, _tags(cell=spec.cell, loop="chp", period="15m"), start, fields))
    return rows


def meter_rows(spec: CellSpec, values: Iterable[tuple[SeriesSpec, IntervalValue]]) -> list[Row]:
    """15-minute rows of single series (only intervals with a value)."""
    rows: list[Row] = []
    for s, v in values:
        if v.value is None:
            continue
        fields = {"value": v.value * s.to_loop, "n_intervals": 1.0, "n_missing": 0.0}
        if s.native_volume:
            fields["volume_m3"] = v.value
        for flag in FLAGS:
            fields[f"n_{flag}"] = 1.0 if flag in v.flags else 0.0
        rows.append((METER_MEASUREMENT, _tags(cell=spec.cell, loop=s.loop, role=s.role, device=s.device,
                                              point=s.point, period="15m"), v.start, fields))
    return rows


def roll_up(rows: Iterable[Row], period: Period, tz: ZoneInfo) -> list[Row]:
    """Rows of a longer period from rows of shorter ones (15m → 1h, 1d; 1d → 1mo).

    Quantities and counts are summed; metrics are derived again from the sums; intervals of the period
    without a row count as missing for every meter (n_missing), so a partial day says so.
    """
    groups: dict[tuple[str, tuple[tuple[str, str], ...], int], list[dict[str, float]]] = {}
    for measurement, tags, ts, fields in rows:
        key_tags = tuple((k, v) for k, v in tags if k != "period")
        groups.setdefault((measurement, key_tags, period_start(ts, period, tz)), []).append(fields)
    out: list[Row] = []
    for (measurement, key_tags, start), members in sorted(groups.items()):
        expected = (period_end(start, period, tz) - start) // INTERVAL_MS
        summed = sum_fields(members, expected, dict(key_tags).get("loop") if measurement == MEASUREMENT else None)
        out.append((measurement, tuple(sorted((*key_tags, ("period", period)))), start, summed))
    return out


def sum_fields(members: Iterable[Mapping[str, float]], expected_intervals: int, loop: str | None) -> dict[str, float]:
    """Sum the fields of rows covering part of a span of `expected_intervals` 15-minute intervals.

    Quantities and counts add up; n_meters is the same in every row; intervals without a row count as
    missing for every meter; with a loop, its metrics are derived again from the sums.
    """
    summed: dict[str, float] = {}
    for f in members:
        for k, v in f.items():
            if k in DERIVED:
                continue
            if k in _CONSTANT:
                summed[k] = max(summed.get(k, 0.0), v)
            else:
                summed[k] = summed.get(k, 0.0) + v
    meters = summed.get("n_meters", 1.0)
    summed["n_missing"] = summed.get("n_missing", 0.0) + (expected_intervals - summed.get("n_intervals", 0.0)) * meters
    summed["n_intervals"] = float(expected_intervals)
    if loop is not None:
        summed.update(derive(loop, summed))
    return summed
