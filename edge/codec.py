"""Register words to values and back.

pymodbus converts words with a given word order; devices also swap bytes inside a word, so that is
done here first. The same functions encode for the simulator, so a value survives the round trip.
"""

from __future__ import annotations

import math
import struct
from typing import Literal

from pymodbus.client.mixin import ModbusClientMixin

__all__ = ["REGISTER_COUNT", "Order", "decode_words", "encode_value", "shortest_f32"]

Order = Literal["big", "little"]
DT = ModbusClientMixin.DATATYPE

_DATATYPES: dict[str, ModbusClientMixin.DATATYPE] = {
    "u16": DT.UINT16,
    "s16": DT.INT16,
    "u32": DT.UINT32,
    "s32": DT.INT32,
    "u64": DT.UINT64,
    "s64": DT.INT64,
    "f32": DT.FLOAT32,
    "f64": DT.FLOAT64,
    "bitfield": DT.UINT16,
    "enum": DT.UINT16,
    "bitfield32": DT.UINT32,
}

#: registers each type occupies; strings say their own count
REGISTER_COUNT: dict[str, int] = {
    "u16": 1, "s16": 1, "bitfield": 1, "enum": 1,
    "u32": 2, "s32": 2, "f32": 2, "bitfield32": 2,
    "u64": 4, "s64": 4, "f64": 4,
}


def _swap_bytes(words: list[int]) -> list[int]:
    return [((w & 0xFF) << 8) | (w >> 8) for w in words]


def decode_words(words: list[int], dtype: str, *, word_order: Order = "big", byte_order: Order = "big") -> int | float | str:
    """Decode raw register words (as they came off the wire) to a number or a string."""
    if any(not 0 <= w <= 0xFFFF for w in words):
        msg = f"register words must be 0..65535, got {words}"
        raise ValueError(msg)
    if byte_order == "little":
        words = _swap_bytes(words)
    if dtype == "string":
        raw = b"".join(w.to_bytes(2, "big") for w in words)
        return raw.split(b"\x00", 1)[0].decode("latin-1").strip()
    expected = REGISTER_COUNT[dtype]
    if len(words) != expected:
        msg = f"type {dtype} needs {expected} registers, got {len(words)}"
        raise ValueError(msg)
    value = ModbusClientMixin.convert_from_registers(words, _DATATYPES[dtype], word_order=word_order)
    assert isinstance(value, int | float)
    return value


def encode_value(value: float | int | str, dtype: str, count: int | None = None, *, word_order: Order = "big",
                 byte_order: Order = "big") -> list[int]:
    """Encode a value into register words in the device's order (the inverse of decode_words)."""
    if dtype == "string":
        assert count is not None
        raw = str(value).encode("latin-1")[: count * 2].ljust(count * 2, b"\x00")
        words = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    else:
        dt = _DATATYPES[dtype]
        if dtype.startswith(("u", "s", "bit", "enum")):
            if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
                msg = f"cannot encode {value} as {dtype}"
                raise ValueError(msg)
            value = int(round(value))
            bits = 16 * REGISTER_COUNT[dtype]
            lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if dtype.startswith("s") else (0, (1 << bits) - 1)
            value = min(max(value, lo), hi)
        else:
            value = float(value)
        words = ModbusClientMixin.convert_to_registers(value, dt, word_order=word_order)
    if byte_order == "little":
        words = _swap_bytes(words)
    return words


def shortest_f32(value: float) -> float:
    """The shortest decimal that is the same float32: a meter's 230.1 stays 230.1, not the 230.10000610351562
    float32 becomes as a double. What the device meant, in fewer bytes on the uplink."""
    if not math.isfinite(value):
        return value
    try:
        target = struct.pack("<f", value)
    except OverflowError:
        return value
    for digits in range(1, 10):  # 9 significant digits always identify a float32
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == target:
            return candidate
    return value
