"""SunSpec register words to point values, and back (for simulators and tests).

Rules from the SunSpec Information Model Specification:

* every multi-register value is big-endian, high word first; strings hold two characters per
  register and are padded with NUL;
* a device that lacks a point sends its type's "not implemented" value: int16 and sunssf 0x8000,
  uint16 / count / enum16 / bitfield16 0xFFFF, acc16 / acc32 / acc64 0, int32 0x80000000,
  uint32 / enum32 / bitfield32 0xFFFFFFFF, int64 0x8000000000000000, uint64 0xFFFFFFFFFFFFFFFF,
  float NaN, a string whose first byte is NUL. We decode those to None;
* a point with a scale factor is value x 10^SF. A scale factor is an int16 in -10..10; when it is
  not implemented (or out of range) the points it scales decode to None.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence

from edge.sunspec.modeldefs import ModelDef, PointDef, get_model

__all__ = ["SF_RANGE", "UNIMPLEMENTED", "Value", "decode_model", "decode_point", "encode_model", "scale"]

Value = int | float | str | None

#: allowed scale-factor exponents
SF_RANGE = range(-10, 11)

#: the raw (unsigned, as read from the wire) value a device sends for a point it does not implement
UNIMPLEMENTED: dict[str, int] = {
    "int16": 0x8000, "sunssf": 0x8000,
    "uint16": 0xFFFF, "count": 0xFFFF, "enum16": 0xFFFF, "bitfield16": 0xFFFF,
    "acc16": 0, "acc32": 0, "acc64": 0,
    "int32": 0x8000_0000, "uint32": 0xFFFF_FFFF, "enum32": 0xFFFF_FFFF, "bitfield32": 0xFFFF_FFFF,
    "int64": 0x8000_0000_0000_0000, "uint64": 0xFFFF_FFFF_FFFF_FFFF,
    "float32": 0x7FC0_0000, "float64": 0x7FF8_0000_0000_0000,
}

_SIGNED = {"int16", "sunssf", "int32", "int64"}


def _unsigned(words: Sequence[int]) -> int:
    v = 0
    for w in words:
        if not 0 <= w <= 0xFFFF:
            msg = f"register words must be 0..65535, got {w}"
            raise ValueError(msg)
        v = (v << 16) | w
    return v


def decode_point(p: PointDef, words: Sequence[int]) -> Value:
    """Decode one point's own words, before scaling; None when not implemented."""
    if len(words) != p.registers:
        msg = f"{p.name}: a {p.type} needs {p.registers} register(s), got {len(words)}"
        raise ValueError(msg)
    if p.type == "pad":
        return None
    raw = _unsigned(words)
    if p.type == "string":
        data = raw.to_bytes(2 * len(words), "big")
        if data[:1] == b"\x00":
            return None
        return data.split(b"\x00", 1)[0].decode("utf-8", errors="replace")
    if p.type in ("float32", "float64"):
        fmt = ">f" if p.type == "float32" else ">d"
        f = struct.unpack(fmt, raw.to_bytes(2 * len(words), "big"))[0]
        return None if math.isnan(f) else f
    if raw == UNIMPLEMENTED[p.type]:
        return None
    if p.type in _SIGNED:
        bits = 16 * len(words)
        if raw >= 1 << (bits - 1):
            raw -= 1 << bits
    return raw


def scale(value: int | float, sf: int) -> float:
    """value x 10^sf, computed so that 2345 with SF -1 gives exactly 234.5."""
    if sf >= 0:
        return float(value * 10**sf)
    return value / 10**-sf


def _apply_sf(p: PointDef, value: Value, sf_value: Value) -> Value:
    if value is None or p.sf is None or isinstance(value, str):
        return value
    if not isinstance(sf_value, int) or sf_value not in SF_RANGE:
        return None
    return scale(value, sf_value)


def decode_model(model: ModelDef | int, words: Sequence[int]) -> dict[str, Value]:
    """Decode a model's registers, starting at its ID register, to {point: engineering value}.

    Scale factors are applied and not-implemented values are None. Points of a repeating block
    are named ``block[i].point`` with i counting from 1 (model 160: ``module[1].DCW``). Pad
    points are left out. The model length is taken from the L register: points beyond it (a
    model 1 with L = 65 has no Pad) are left out, registers beyond it are ignored.
    """
    m = model if isinstance(model, ModelDef) else get_model(model)
    if len(words) < 2:
        msg = f"model {m.id}: need at least the ID and L registers, got {len(words)} word(s)"
        raise ValueError(msg)
    if words[0] != m.id:
        msg = f"model {m.id}: the ID register holds {words[0]}"
        raise ValueError(msg)
    length = words[1]
    end = length + 2
    if len(words) < end:
        msg = f"model {m.id}: L = {length} needs {end} registers, got {len(words)}"
        raise ValueError(msg)
    blocks = m.blocks_for(length)

    raw: dict[str, Value] = {}
    for p in m.points:
        if p.offset + p.registers <= end and p.type != "pad":
            raw[p.name] = decode_point(p, words[p.offset: p.offset + p.registers])
    out: dict[str, Value] = {name: _apply_sf(m.by_name[name], v, raw.get(m.by_name[name].sf or ""))
                             for name, v in raw.items()}
    if m.repeating is not None:
        r = m.repeating
        for b in range(blocks):
            base = m.fixed_registers + b * r.length
            block_raw = {p.name: decode_point(p, words[base + p.offset: base + p.offset + p.registers])
                         for p in r.points if p.type != "pad"}
            for p in r.points:
                if p.type == "pad":
                    continue
                sf = block_raw.get(p.sf) if p.sf in block_raw else raw.get(p.sf or "")
                out[f"{r.name}[{b + 1}].{p.name}"] = _apply_sf(p, block_raw[p.name], sf)
    return out


def _encode_point(p: PointDef, value: Value) -> list[int]:
    n = p.registers
    if value is None or p.type == "pad":
        if p.type == "pad":
            return [0] * n
        if p.type == "string":
            return [0] * n
        raw = UNIMPLEMENTED[p.type]
    elif p.type == "string":
        data = str(value).encode("utf-8")
        if len(data) > 2 * n:
            msg = f"{p.name}: {value!r} does not fit in {n} registers"
            raise ValueError(msg)
        data = data.ljust(2 * n, b"\x00")
        return [int.from_bytes(data[i: i + 2], "big") for i in range(0, 2 * n, 2)]
    elif p.type in ("float32", "float64"):
        fmt = ">f" if p.type == "float32" else ">d"
        raw = int.from_bytes(struct.pack(fmt, float(value)), "big")
    else:
        if isinstance(value, float) and not value.is_integer():
            msg = f"{p.name}: raw value of a {p.type} must be an integer, got {value!r}"
            raise ValueError(msg)
        raw = int(value)
        bits = 16 * n
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if p.type in _SIGNED else (0, (1 << bits) - 1)
        if not lo <= raw <= hi:
            msg = f"{p.name}: {raw} is out of range for {p.type}"
            raise ValueError(msg)
        raw &= (1 << bits) - 1
    return [(raw >> (16 * (n - 1 - i))) & 0xFFFF for i in range(n)]


def encode_model(model: ModelDef | int, raw: Mapping[str, Value] | None = None, *, blocks: int = 0,
                 length: int | None = None) -> list[int]:
    """Build a model's registers (ID and L included) from RAW point values.

    raw holds register values before scaling (W = 24150 with W_SF = -1 for 2415.0 W); a point
    that is missing or None gets its not-implemented value. Repeating-block points are named
    ``module[1].DCA`` as decode_model names them; blocks says how many there are (model 160 also
    gets N = blocks unless raw gives N). length overrides L (65 for an old model 1 without Pad).
    """
    m = model if isinstance(model, ModelDef) else get_model(model)
    values = dict(raw or {})
    if m.repeating is not None:
        values.setdefault(m.repeating.count, blocks)
    L = m.length_for(blocks) if length is None else length
    values["ID"] = m.id
    values["L"] = L
    unknown = [k for k in values if k not in m.by_name and "[" not in k]
    if unknown:
        msg = f"model {m.id} has no point(s) {', '.join(sorted(unknown))}"
        raise KeyError(msg)
    words: list[int] = []
    for p in m.points:
        words += _encode_point(p, values.get(p.name))
    if m.repeating is not None:
        r = m.repeating
        for b in range(blocks):
            for p in r.points:
                words += _encode_point(p, values.get(f"{r.name}[{b + 1}].{p.name}"))
    return words[: L + 2] if L + 2 <= len(words) else words + [0] * (L + 2 - len(words))
