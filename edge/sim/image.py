"""Turn a device's simulated values into the register image its profile describes, and back for writes."""

from __future__ import annotations

import math

from edge.codec import REGISTER_COUNT, encode_value
from edge.profile import Point, Profile

__all__ = ["RegisterImage"]


def _default(p: Point) -> float | str:
    if p.type == "string":
        return "KWWK-SIM"
    if p.range is not None:
        lo, hi = p.range
        return lo if p.kind in ("state", "info", "counter") else (lo + hi) / 2
    return 0.0


class RegisterImage:
    """The four Modbus tables of one simulated device, {table: {wire address: word}}."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.tables: dict[str, dict[int, int]] = {"holding": {}, "input": {}, "coil": {}, "discrete": {}}
        self._sf_users: dict[str, list[Point]] = {}
        for p in profile.points:
            if p.scale_register:
                self._sf_users.setdefault(p.scale_register, []).append(p)
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

    def _choose_sf(self, sf_point: Point, values: dict[str, float | str]) -> int:
        """Smallest exponent (most resolution) at which every value using this scale factor fits its type."""
        for exp in range(-3, 7):
            ok = True
            for p in self._sf_users[sf_point.name]:
                v = values.get(p.name)
                if not isinstance(v, float | int):
                    continue
                raw = (v - p.offset) / (p.scale * 10.0**exp)
                bits = 16 * REGISTER_COUNT.get(p.type, 1)
                lo, hi = (-(1 << (bits - 1)) + 1, (1 << (bits - 1)) - 1) if p.type.startswith("s") else (0, (1 << bits) - 2)
                if not lo <= round(raw) <= hi:
                    ok = False
                    break
            if ok:
                return exp
        return 0

    def update(self, values: dict[str, float]) -> None:
        """Encode the given engineering values; points without a value get a plausible constant."""
        merged: dict[str, float | str] = {}
        for p in self.profile.points:
            merged[p.name] = values.get(p.name, self.fixed.get(p.name, _default(p)))
        exps: dict[str, int] = {}
        for sf_name in self._sf_users:
            sf_point = self.profile.by_name[sf_name]
            exps[sf_name] = self._choose_sf(sf_point, merged)
            merged[sf_name] = exps[sf_name]
        for p in self.profile.points:
            self._encode(p, merged[p.name], exps)

    def _encode(self, p: Point, value: float | str, exps: dict[str, int]) -> None:
        base = self.profile.wire(p)
        table = self.tables[p.table]
        if p.table in ("coil", "discrete"):
            table[base] = 1 if value else 0
            return
        if isinstance(value, float | int) and p.type != "string":
            if p.scale_register is None or p.name in exps:
                factor = p.scale
            else:
                factor = p.scale * 10.0 ** exps.get(p.scale_register, 0)
            raw: float | str = (float(value) - p.offset) / factor if factor else 0.0
            if p.type not in ("f32", "f64") and isinstance(raw, float):
                raw = 0.0 if math.isnan(raw) else raw
        else:
            raw = value
        word_order, byte_order = self.profile.orders(p)
        words = encode_value(raw, p.type, p.count, word_order=word_order, byte_order=byte_order)
        for i, w in enumerate(words):
            table[base + i] = w

    def written(self, table: str, address: int, words: list[int]) -> dict[str, float]:
        """Apply a Modbus write; return the engineering values of the points it fully covers."""
        t = self.tables[table]
        for i, w in enumerate(words):
            t[address + i] = w
        touched: dict[str, float] = {}
        raw: dict[str, int | float | str | None] = {}
        for p in self.profile.points:
            if p.table != table:
                continue
            base = self.profile.wire(p)
            raw[p.name] = self.profile.decode_raw(p, [t.get(base + i, 0) for i in range(p.registers)])
        for p in self.profile.points:
            base = self.profile.wire(p)
            if p.table == table and address <= base and base + p.registers <= address + len(words):
                v = self.profile.engineering(p, raw[p.name], raw)
                if isinstance(v, float):
                    touched[p.name] = v
        return touched
