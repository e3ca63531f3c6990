"""Units and thresholds an operator expects: profile units (edge/quantities.py) → Grafana unit ids, the
quantities a device panel groups its points into, and the colours that mean trouble."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import ThresholdsConfig
from grafana_foundation_sdk.models.dashboard import Threshold, ThresholdsMode

__all__ = [
    "BLUE", "GREEN", "GROUPS", "ORANGE", "RED", "RESIDUAL_LIMITS_PCT", "grafana_unit", "group_of", "residual_steps",
    "steps",
]

GREEN, ORANGE, RED, BLUE = "green", "orange", "red", "blue"

#: profile unit → Grafana unit id (packages/grafana-data/src/valueFormats/categories.ts); W and Wh scale
#: themselves (kW, MWh); units Grafana lacks are shown with a suffix.
_UNITS: dict[str, str] = {
    "W": "watt", "kW": "kwatt", "MW": "megwatt", "VA": "voltamp", "var": "voltampreact",
    "Wh": "watth", "kWh": "kwatth", "MWh": "mwatth", "kvarh": "suffix: kvarh",
    "V": "volt", "A": "amp", "Hz": "hertz",
    "°C": "celsius", "K": "suffix: K",
    "m³": "m3", "l": "litre", "m³/h": "suffix: m³/h", "l/h": "litreh", "m³/s": "flowcms",
    "m": "lengthm", "bar": "pressurebar", "rpm": "rotrpm", "%": "percent", "h": "h", "s": "s",
    "kWh/m³": "suffix: kWh/m³", "": "none",
}

#: unit → (panel title, order) for a device's gauges: one panel per quantity
GROUPS: dict[str, tuple[str, int]] = {
    "W": ("Power", 0), "kW": ("Power", 0), "VA": ("Apparent power", 1), "var": ("Reactive power", 2),
    "°C": ("Temperatures", 3), "K": ("Temperature difference", 4), "m³/h": ("Flow", 5), "l/h": ("Flow", 5),
    "m": ("Head", 6), "bar": ("Pressure", 7), "V": ("Voltage", 8), "A": ("Current", 9), "Hz": ("Frequency", 10),
    "rpm": ("Speed", 11), "%": ("Load and set points", 12), "h": ("Hours", 13), "": ("Power factor and other", 14),
}

#: closure residual as a share of the loop's input, in %: (orange from, red from) above zero. A negative
#: residual beyond −red means the meters report more out than in: always a metering fault. Electricity's
#: residual is the consumption no meter explains (the village), so it has no upper limit.
RESIDUAL_LIMITS_PCT: dict[str, tuple[float, float] | None] = {
    "electricity": None,
    "heat": (5.0, 10.0),
    "water": (5.0, 10.0),
}


def grafana_unit(unit: str) -> str:
    return _UNITS.get(unit, f"suffix: {unit}")


def group_of(unit: str) -> tuple[str, int]:
    return GROUPS.get(unit, (unit, 99))


def steps(*pairs: tuple[float | None, str]) -> ThresholdsConfig:
    """Absolute thresholds: the first pair's value is None (the base colour)."""
    return ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps([Threshold(value=v, color=c) for v, c in pairs])


def residual_steps(loop: str) -> ThresholdsConfig:
    limits = RESIDUAL_LIMITS_PCT.get(loop)
    if limits is None:
        return steps((None, RED), (-5.0, GREEN))
    orange, red = limits
    return steps((None, RED), (-red, ORANGE), (-orange, GREEN), (orange, ORANGE), (red, RED))
