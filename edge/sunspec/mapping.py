"""SunSpec points in our shared vocabulary (edge.quantities), and reading a discovered device.

Each entry maps a SunSpec point to a shared quantity and a power-of-ten exponent that brings the
SunSpec unit to the quantity's unit (WH in Wh -> energy_export in kWh: exponent -3; PF in percent
-> power_factor as a ratio: -2). The tests check every entry's units against the model files and
edge.quantities.

Sign conventions are the device's, as SunSpec leaves them: an inverter's W is the power it
delivers; a meter's W is positive for import at most makers, but not at all (evcc negates
SolarEdge's 203 W). Check on site before a balance relies on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from edge.sunspec.decode import Value, decode_model
from edge.sunspec.discovery import ModelRef, Reader, discover, logical_devices, read_model
from edge.sunspec.modeldefs import get_model, model_ids

__all__ = ["QUANTITY_MAP", "SunSpecDevice", "read_devices", "to_quantities"]

#: what inverter and meter models name alike
_AC: dict[str, tuple[str, int]] = {
    "W": ("power", 0),
    "VA": ("apparent_power", 0),
    "PF": ("power_factor", -2),
    "PhVphA": ("voltage_l1", 0),
    "PhVphB": ("voltage_l2", 0),
    "PhVphC": ("voltage_l3", 0),
    "AphA": ("current_l1", 0),
    "AphB": ("current_l2", 0),
    "AphC": ("current_l3", 0),
    "Hz": ("frequency", 0),
}

_INVERTER: dict[str, tuple[str, int]] = {
    **_AC,
    "WH": ("energy_export", -3),
    "VAr": ("reactive_power", 0),
    "DCW": ("dc_power", 0),
    "TmpCab": ("temperature", 0),
}

_METER: dict[str, tuple[str, int]] = {
    **_AC,
    "WphA": ("power_l1", 0),
    "WphB": ("power_l2", 0),
    "WphC": ("power_l3", 0),
    "VAR": ("reactive_power", 0),
    "TotWhImp": ("energy_import", -3),
    "TotWhExp": ("energy_export", -3),
}

#: model id -> {SunSpec point: (shared quantity, exponent)}
QUANTITY_MAP: dict[int, dict[str, tuple[str, int]]] = {
    101: _INVERTER, 102: _INVERTER, 103: _INVERTER,
    201: _METER, 202: _METER, 203: _METER, 204: _METER,
}


def to_quantities(model_id: int, values: Mapping[str, Value]) -> dict[str, float | None]:
    """Decoded SunSpec points of one model -> {shared quantity: value in the quantity's unit}.

    Points the model lacks are left out; points the device does not implement give None.
    """
    out: dict[str, float | None] = {}
    for point, (quantity, exp) in QUANTITY_MAP.get(model_id, {}).items():
        if point not in values:
            continue
        v = values[point]
        if v is None or isinstance(v, str):
            out[quantity] = None
        elif exp >= 0:
            out[quantity] = float(v * 10**exp)
        else:
            out[quantity] = round(v / 10**-exp, 12)
    return out


@dataclass
class SunSpecDevice:
    """One logical device behind a unit id: its models, its identity and its readings."""

    index: int  # 0 for the first model 1 in the chain, 1 for the next...
    models: list[ModelRef]
    common: dict[str, Value] = field(default_factory=dict)  # decoded model 1: Mn, Md, SN, Vr...
    points: dict[int, dict[str, Value]] = field(default_factory=dict)  # model id -> decoded points
    quantities: dict[str, float | None] = field(default_factory=dict)  # shared vocabulary
    unknown: list[int] = field(default_factory=list)  # model ids we have no definition for

    @property
    def manufacturer(self) -> str | None:
        v = self.common.get("Mn")
        return v if isinstance(v, str) else None

    @property
    def model(self) -> str | None:
        v = self.common.get("Md")
        return v if isinstance(v, str) else None

    @property
    def serial(self) -> str | None:
        v = self.common.get("SN")
        return v if isinstance(v, str) else None


async def read_devices(read: Reader, models: Sequence[ModelRef] | None = None) -> list[SunSpecDevice]:
    """Read every model we know, decode it and map it to shared quantities, per logical device.

    models is the chain from discover(); without it the device is discovered first. When a
    logical device holds two models that both give a quantity, the first in the chain that
    implements it wins.
    """
    chain = list(models) if models is not None else await discover(read)
    known = set(model_ids())
    devices: list[SunSpecDevice] = []
    for index, refs in enumerate(logical_devices(chain)):
        dev = SunSpecDevice(index=index, models=refs)
        for ref in refs:
            if ref.model_id not in known:
                dev.unknown.append(ref.model_id)
                continue
            values = decode_model(get_model(ref.model_id), await read_model(read, ref))
            if ref.model_id == 1:
                dev.common = values
            dev.points.setdefault(ref.model_id, values)
            for q, v in to_quantities(ref.model_id, values).items():
                if dev.quantities.get(q) is None:
                    dev.quantities[q] = v
        devices.append(dev)
    return devices
