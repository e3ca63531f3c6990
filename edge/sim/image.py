"""Values to register images through a device's profile: the one encoder of every simulated device.

The simulator (RegisterImage, whose registers follow the site's physics), the test Modbus servers
(image_for, synthetic_values) and the benchmarks all encode here, through edge/codec.py's
encode_value, in the profile's word and byte order, so what they serve is exactly what
Profile.decode reads back.

An image is {table: {wire address: word}} (bits 0/1 for coil and discrete tables).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from edge.codec import REGISTER_COUNT, encode_value
from edge.profile import Point, Profile

__all__ = ["Image", "RegisterImage", "encode_point", "image_for", "scale_exponent", "synthetic_values"]

Image = dict[str, dict[int, int]]


def encode_point(profile: Profile, p: Point, value: float | str, values: Mapping[str, float | str]) -> list[int]:
    """A point's register words for an engineering value: the inverse of Profile.decode.

    Scale and offset are undone; a point with a scale_register is encoded against that register's
    exponent in `values` (0 if absent). An integer point cannot hold NaN: it is sent as 0.
    """
    if p.table in ("coil", "discrete"):
        return [1 if value else 0] * p.registers
    word_order, byte_order = profile.orders(p)
    if p.type == "string":
        return encode_value(str(value), "string", p.registers, word_order=word_order, byte_order=byte_order)
    factor = p.scale
    if p.scale_register is not None:
        factor *= 10.0 ** int(values.get(p.scale_register, 0))  # type: ignore[arg-type]
    raw = (float(value) - p.offset) / factor if factor else 0.0
    if p.type not in ("f32", "f64") and math.isnan(raw):
        raw = 0.0
    return encode_value(raw, p.type, word_order=word_order, byte_order=byte_order)


def image_for(profile: Profile, values: Mapping[str, float | str], image: Image | None = None) -> Image:
    """Encode engineering values into a register image (only the points given; into `image` if passed).

    A scale factor not in `values` is chosen (scale_exponent) and encoded too, so every value given
    decodes back.
    """
    values = dict(values)
    needed = sorted({p.scale_register for p in profile.points if p.scale_register and p.name in values})
    for sf in needed:
        if sf not in values:
            values[sf] = scale_exponent(profile, sf, values)
    image = image if image is not None else {}
    for name, value in values.items():
        p = profile.by_name[name]
        t = image.setdefault(p.table, {})
        for i, w in enumerate(encode_point(profile, p, value, values), start=profile.wire(p)):
            t[i] = w
    return image


def scale_exponent(profile: Profile, scale_register: str, values: Mapping[str, float | str]) -> int:
    """The smallest exponent (most resolution) at which every value scaled by this scale-factor point fits
    its register (0 when none does)."""
    users = [p for p in profile.points if p.scale_register == scale_register]
    for exp in range(-3, 7):
        fits = True
        for p in users:
            v = values.get(p.name)
            if not isinstance(v, float | int):
                continue
            raw = (v - p.offset) / (p.scale * 10.0**exp)
            bits = 16 * REGISTER_COUNT.get(p.type, 1)
            lo, hi = (-(1 << (bits - 1)) + 1, (1 << (bits - 1)) - 1) if p.type.startswith("s") else (0, (1 << bits) - 2)
            if not lo <= round(raw) <= hi:
                fits = False
                break
        if fits:
            return exp
    return 0


def synthetic_values(profile: Profile) -> dict[str, float | str]:
    """A plausible value for every point but the scale factors (image_for chooses those): mid-range
    numbers, the first enum member, short strings."""
    out: dict[str, float | str] = {}
    for p in profile.points:
        if p.table in ("coil", "discrete"):
            out[p.name] = 1
        elif p.type == "string":
            out[p.name] = "KWWK"[: 2 * p.registers]
        elif p.enum:
            out[p.name] = min(p.enum)
        elif any(q.scale_register == p.name for q in profile.points):
            continue  # a scale factor
        elif p.range is not None and all(math.isfinite(x) for x in p.range):
            lo, hi = p.range
            out[p.name] = (lo + hi) / 2 if p.type in ("f32", "f64") else round((lo + hi) / 2 / (p.scale or 1)) * (p.scale or 1)
        else:
            out[p.name] = 1
    return out


def _default(p: Point) -> float | str:
    if p.type == "string":
        return "KWWK-SIM"
    if p.range is not None:
        lo, hi = p.range
        return lo if p.kind in ("state", "info", "counter") else (lo + hi) / 2
    return 0.0


class RegisterImage:
    """The four Modbus tables of one simulated device, {table: {wire address: word}}, kept up to date
    with the simulated values; scale factors are chosen so every value fits its register."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.tables: Image = {"holding": {}, "input": {}, "coil": {}, "discrete": {}}
        self._scale_factors = {p.scale_register for p in profile.points if p.scale_register}
        idents = {r.point: r.equals if r.equals is not None else (r.one_of or [None])[0] for r in profile.identification}
        self.fixed: dict[str, float | str] = {k: v for k, v in idents.items() if v is not None}
        self.update({})

    def spans(self) -> dict[str, tuple[int, int]]:
        """First and last wire address used in each table."""
        out: dict[str, tuple[int, int]] = {}
        for p in self.profile.points:
            a = self.profile.wire(p)
            lo, hi = out.get(p.table, (a, a + p.registers - 1))
            out[p.table] = (min(lo, a), max(hi, a + p.registers - 1))
        return out

    def update(self, values: dict[str, float]) -> None:
        """Encode the given engineering values; points without a value get a plausible constant, scale
        factors the exponent their values need."""
        merged = {p.name: values.get(p.name, self.fixed.get(p.name, _default(p)))
                  for p in self.profile.points if p.name not in self._scale_factors}
        image_for(self.profile, merged, self.tables)

    def written(self, table: str, address: int, words: list[int]) -> dict[str, float]:
        """Apply a Modbus write; return the engineering values of the points it fully covers."""
        t = self.tables[table]
        for i, w in enumerate(words):
            t[address + i] = w
        covered = [p for p in self.profile.points if p.table == table and address <= self.profile.wire(p)
                   and self.profile.wire(p) + p.registers <= address + len(words)]
        values = self.profile.decode({table: t})
        return {p.name: v for p in covered if isinstance(v := values.get(p.name), float)}
