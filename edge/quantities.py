"""The shared vocabulary of measured quantities.

A profile that calls a point by one of these names promises the unit and kind given here, so the
collector, the balance engine and the dashboards can rely on names alone. Anything device-specific
(status words, alarms) keeps a name of its own and is stored as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["QUANTITIES", "Quantity"]

Kind = Literal["gauge", "counter", "state", "info"]


@dataclass(frozen=True, slots=True)
class Quantity:
    unit: str
    kind: Kind
    description: str


def _q(unit: str, kind: Kind, description: str) -> Quantity:
    return Quantity(unit, kind, description)


QUANTITIES: dict[str, Quantity] = {
    # electricity
    "power": _q("W", "gauge", "active power, total; sign as the device defines it"),
    "power_l1": _q("W", "gauge", "active power L1"),
    "power_l2": _q("W", "gauge", "active power L2"),
    "power_l3": _q("W", "gauge", "active power L3"),
    "reactive_power": _q("var", "gauge", "reactive power, total"),
    "apparent_power": _q("VA", "gauge", "apparent power, total"),
    "power_factor": _q("", "gauge", "power factor, total"),
    "voltage_l1": _q("V", "gauge", "voltage L1-N"),
    "voltage_l2": _q("V", "gauge", "voltage L2-N"),
    "voltage_l3": _q("V", "gauge", "voltage L3-N"),
    "current_l1": _q("A", "gauge", "current L1"),
    "current_l2": _q("A", "gauge", "current L2"),
    "current_l3": _q("A", "gauge", "current L3"),
    "frequency": _q("Hz", "gauge", "grid frequency"),
    "energy_import": _q("kWh", "counter", "active energy drawn by the metered side (consumption)"),
    "energy_export": _q("kWh", "counter", "active energy delivered by the metered side (generation, feed-in)"),
    "energy_total": _q("kWh", "counter", "import plus export"),
    "dc_power": _q("W", "gauge", "DC power of a PV inverter"),
    # heat
    "heat_power": _q("W", "gauge", "thermal power"),
    "heat_energy": _q("kWh", "counter", "thermal energy"),
    "temp_supply": _q("°C", "gauge", "supply (flow) temperature"),
    "temp_return": _q("°C", "gauge", "return temperature"),
    "temp_diff": _q("K", "gauge", "supply minus return temperature"),
    # water, gas
    "flow": _q("m³/h", "gauge", "volume flow"),
    "volume": _q("m³", "counter", "volume, forward"),
    "volume_reverse": _q("m³", "counter", "volume, reverse"),
    "head": _q("m", "gauge", "pump head"),
    "pressure": _q("bar", "gauge", "pressure"),
    # machines
    "speed": _q("rpm", "gauge", "rotational speed"),
    "runtime": _q("h", "counter", "operating hours"),
    "starts": _q("", "counter", "number of starts"),
    "temperature": _q("°C", "gauge", "device or medium temperature"),
}
