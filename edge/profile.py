"""Device profiles: one YAML file per register map, validated before anything talks to a device.

Adding a meter is adding a file under edge/profiles/. The format is documented in
edge/profiles/README.md; every error names the file, the line, the point and the field.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from edge.codec import REGISTER_COUNT, Order, decode_words, shortest_f32
from edge.quantities import QUANTITIES
from edge.yamlio import LineMap, line_of, load_checked

__all__ = [
    "PROFILE_DIR", "DataType", "Decoded", "GoldenVector", "Point", "Profile", "RegisterType",
    "golden_check", "load_profile", "profile_ids", "get_profile", "wire_address",
]

PROFILE_DIR = Path(__file__).parent / "profiles"

RegisterType = Literal["holding", "input", "coil", "discrete"]
DataType = Literal["u16", "s16", "u32", "s32", "u64", "s64", "f32", "f64", "string", "bitfield", "bitfield32", "enum"]
Addressing = Literal["raw", "one_based", "modicon"]
Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]

#: first Modicon number of each register table, 5-digit and 6-digit notation
_MODICON_BASE: dict[str, tuple[int, int]] = {
    "coil": (1, 1),
    "discrete": (10001, 100001),
    "input": (30001, 300001),
    "holding": (40001, 400001),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Source(_Strict):
    """Where the register map comes from; a profile without a public document is not accepted."""

    document: str = Field(min_length=3)
    url: str | None = None
    revision: str | None = None
    confidence: Literal["high", "medium", "low"] = "medium"
    notes: str | None = None


class TransportDefaults(_Strict):
    kind: Literal["tcp", "rtu", "rtu_over_tcp"] = "tcp"
    port: int = Field(502, ge=1, le=65535)
    unit_id: int = Field(1, ge=0, le=255)
    baudrate: int = Field(9600, ge=300, le=921600)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    timeout: float = Field(1.0, gt=0, le=30)


class Limits(_Strict):
    """What the device tolerates in one request; the read planner obeys these."""

    max_registers: int = Field(125, ge=1, le=125)
    max_bits: int = Field(2000, ge=1, le=2000)
    max_gap: int = Field(8, ge=0, le=124, description="unused registers a merged request may span")
    #: wire-address ranges [first, last] the device answers with an exception; never read across them
    failing: list[tuple[RegisterType, int, int]] = Field(default_factory=list)


class Point(_Strict):
    name: Name
    table: RegisterType = Field(alias="register", description="holding, input, coil or discrete")
    address: int = Field(description="as the document prints it; see the profile's addressing")
    type: DataType
    count: int | None = Field(None, ge=1, le=125, description="registers; required for strings")
    scale: float = 1.0
    offset: float = 0.0
    scale_register: Name | None = Field(None, description="point holding a power-of-ten exponent (SunSpec sunssf)")
    publish: bool = Field(True, description="False for helper points such as scale factors")
    unit: str = Field("", validate_default=True)
    kind: Literal["gauge", "counter", "state", "info"] = Field("gauge", validate_default=True)
    range: tuple[float, float] | None = Field(None, description="plausible range, in the point's unit")
    word_order: Order | None = None
    byte_order: Order | None = None
    not_implemented: int | None = Field(None, description="raw value the device sends when it lacks the point")
    enum: dict[int, str] | None = None
    bits: dict[int, str] | None = None
    description: str = ""
    doc: str | None = Field(None, description="where in the document: page, table, row")

    @field_validator("count")
    @classmethod
    def _count_fits(cls, v: int | None, info: ValidationInfo) -> int | None:
        dtype, table = info.data.get("type"), info.data.get("table")
        if v is not None and dtype not in (None, "string") and table not in ("coil", "discrete") \
                and v != REGISTER_COUNT[dtype]:
            msg = f"count {v} does not fit type {dtype}, which takes {REGISTER_COUNT[dtype]} register(s)"
            raise ValueError(msg)
        return v

    @field_validator("unit", "kind")
    @classmethod
    def _shared_quantity(cls, v: str, info: ValidationInfo) -> str:
        """A shared quantity name promises its unit and kind (edge/quantities.py)."""
        q = QUANTITIES.get(info.data.get("name", ""))
        if q is None or not info.data.get("publish", True):
            return v
        name = info.data["name"]
        if info.field_name == "unit" and v != q.unit:
            msg = (f"unit {v!r} is wrong for the shared quantity {name!r}: it is measured in {q.unit!r}; "
                   f"scale the raw value to {q.unit!r}")
            raise ValueError(msg)
        if info.field_name == "kind" and v != q.kind:
            msg = f"kind {v!r} is wrong for the shared quantity {name!r}, which is a {q.kind}"
            raise ValueError(msg)
        return v

    @field_validator("range")
    @classmethod
    def _range_ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and v[0] > v[1]:
            msg = f"range minimum {v[0]} is above its maximum {v[1]}"
            raise ValueError(msg)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Point:
        if self.table in ("coil", "discrete"):
            if self.type not in ("u16", "bitfield"):
                msg = f"a {self.table} holds one bit: use type u16 or bitfield, not {self.type}"
                raise ValueError(msg)
        if self.type == "string" and self.count is None:
            msg = "a string needs count (its length in registers)"
            raise ValueError(msg)
        return self

    @property
    def registers(self) -> int:
        if self.table in ("coil", "discrete"):
            return self.count or 1
        return self.count if self.type == "string" else REGISTER_COUNT[self.type]

    @property
    def numeric(self) -> bool:
        return self.type != "string"


class GoldenVector(_Strict):
    """Register words written by hand from the document, and the values they must decode to."""

    name: str
    source: str = Field(min_length=3, description="where the expected values come from")
    registers: dict[RegisterType, dict[int, list[Annotated[int, Field(ge=0, le=0xFFFF)]]]]
    expect: dict[Name, float | str | None]
    tolerance: float = Field(1e-6, ge=0, description="relative tolerance for floats")


class IdentRule(_Strict):
    """How scan recognises the device: a point's decoded value."""

    point: Name
    equals: float | str | None = None
    one_of: list[float | str] | None = None


@dataclass
class Decoded:
    """What a register image says about some points: their values, and why the others have none."""

    raw: dict[str, int | float | str | None] = field(default_factory=dict)  # before scaling
    values: dict[str, float | str | None] = field(default_factory=dict)  # in the point's unit; None: not implemented
    missing: list[str] = field(default_factory=list)  # points whose registers are not (all) in the image
    undecodable: dict[str, str] = field(default_factory=dict)  # point -> why its words do not decode
    unscaled: dict[str, str] = field(default_factory=dict)  # point -> its scale-factor point, which has no value


class Profile(_Strict):
    id: Name
    manufacturer: str
    model: str
    device_class: Literal[
        "electricity_meter", "pv_inverter", "chp", "heat_meter", "water_meter", "gas_meter", "pump",
        "flow_meter", "pulse_counter", "battery", "sensor",
    ]
    products: list[str] = Field(default_factory=list, description="other products sharing this map")
    source: Source
    transport: TransportDefaults = TransportDefaults()
    byte_order: Order = "big"
    word_order: Order = "big"
    addressing: Addressing
    limits: Limits = Limits()
    identification: list[IdentRule] = Field(default_factory=list)
    points: list[Point] = Field(min_length=1)
    golden: list[GoldenVector] = Field(default_factory=list)
    notes: str | None = None

    @functools.cached_property
    def by_name(self) -> dict[str, Point]:
        return {p.name: p for p in self.points}

    def with_scale_factors(self, points: Iterable[Point]) -> list[Point]:
        """The points, each once, plus the scale-factor points they need (read together, so they agree)."""
        out: dict[str, Point] = {}
        for p in points:
            out.setdefault(p.name, p)
        for p in list(out.values()):
            if p.scale_register:
                out.setdefault(p.scale_register, self.by_name[p.scale_register])
        return list(out.values())

    def wire(self, point: Point) -> int:
        return wire_address(point.address, point.table, self.addressing)

    def orders(self, point: Point) -> tuple[Order, Order]:
        return point.word_order or self.word_order, point.byte_order or self.byte_order

    def decode_raw(self, point: Point, words: list[int]) -> int | float | str | None:
        """Decode a point's own words, before scaling; None for the not-implemented sentinel."""
        if point.table in ("coil", "discrete"):
            return int(bool(words[0]))
        if point.not_implemented is not None and _raw_int(words) == point.not_implemented:
            return None
        word_order, byte_order = self.orders(point)
        value = decode_words(words, point.type, word_order=word_order, byte_order=byte_order)
        if isinstance(value, float) and math.isnan(value):
            return None
        return value

    def decode_points(self, image: dict[str, dict[int, int]], points: Iterable[Point] | None = None) -> Decoded:
        """Decode points (all by default) from a register image {table: {wire address: word}}.

        The one decoding step of every read (DeviceReader, commissioning, golden vectors): a point
        gets a value only when all its registers are in the image, they decode, and its scale factor
        (if it has one) has a value too; otherwise it is listed with the reason, never guessed.
        """
        pts = list(self.points if points is None else points)
        out = Decoded()
        for p in pts:
            base = self.wire(p)
            table = image.get(p.table, {})
            try:
                words = [table[base + i] for i in range(p.registers)]
            except KeyError:
                out.missing.append(p.name)
                continue
            try:
                out.raw[p.name] = self.decode_raw(p, words)
            except (ValueError, TypeError) as err:
                out.undecodable[p.name] = f"{p.name}: cannot decode {words}: {err}"
        for p in pts:
            if p.name not in out.raw:
                continue
            if p.scale_register and p.scale_register not in out.raw:
                # without its scale factor the value would be silently wrong by powers of ten
                out.unscaled[p.name] = p.scale_register
                continue
            out.values[p.name] = self.engineering(p, out.raw[p.name], out.raw)
        return out

    def decode(self, image: dict[str, dict[int, int]]) -> dict[str, float | str | None]:
        """The values of every point that decode_points can decode from the image."""
        return self.decode_points(image).values

    def engineering(self, p: Point, value: int | float | str | None,
                    raw: dict[str, int | float | str | None]) -> float | str | None:
        """Apply scale, scale factor and offset: the value in the point's unit."""
        if value is None or isinstance(value, str):
            return value
        if p.type == "f32" and isinstance(value, float):
            value = shortest_f32(value)
        factor = p.scale
        if p.scale_register is not None:
            sf = raw.get(p.scale_register)
            if sf is None or isinstance(sf, str) or not -10 <= int(sf) <= 10:
                return None  # SunSpec allows exponents -10..10; anything else is not a value
            factor *= 10.0 ** int(sf)
        result = float(value * factor + p.offset)
        if factor == 1 and p.offset == 0 or p.type == "f64":
            return result
        # decimal scales (2345 × 0.1) should not print as 234.50000000000003
        return float(f"{result:.12g}")


def _raw_int(words: list[int]) -> int:
    v = 0
    for w in words:
        v = (v << 16) | w
    return v


def wire_address(address: int, register: str, addressing: str) -> int:
    """The address on the wire (0-based PDU address) for an address as the document prints it."""
    if addressing == "raw":
        return address
    if addressing == "one_based":
        return address - 1
    five, six = _MODICON_BASE[register]
    if register == "coil":
        return address - 1
    if six <= address < six + 65536:
        return address - six
    return address - five


def _check_profile(p: Profile, lines: LineMap, path: Path) -> list[tuple[int | None, str, str]]:
    """Checks that span fields: addresses, overlaps, references, golden vectors."""
    problems: list[tuple[int | None, str, str]] = []

    def add(loc: tuple[str | int, ...], field: str, msg: str) -> None:
        problems.append((line_of(lines, loc), field, msg))

    if p.id != path.stem:
        add(("id",), "id", f"must equal the file name {path.stem!r}, got {p.id!r}")
    seen: dict[str, int] = {}
    spans: dict[str, list[tuple[int, int, str]]] = {}
    for i, pt in enumerate(p.points):
        loc = ("points", i)
        if pt.name in seen:
            add((*loc, "name"), f"points[{pt.name}].name", f"duplicate point name (first is points[{seen[pt.name]}])")
            continue
        seen[pt.name] = i
        if p.addressing == "modicon":
            five, six = _MODICON_BASE[pt.table]
            ok = five <= pt.address <= five + 9998 or six <= pt.address < six + 65536
            if not ok:
                add((*loc, "address"), f"points[{pt.name}].address",
                    f"{pt.address} is not a Modicon {pt.table} address ({five}..{five + 9998} or {six}..{six + 65535})")
                continue
        wire = p.wire(pt)
        if wire < 0 or wire + pt.registers > 65536:
            add((*loc, "address"), f"points[{pt.name}].address",
                f"{pt.address} ({p.addressing}) is wire address {wire}; a {pt.registers}-register value must lie in 0..65535")
            continue
        spans.setdefault(pt.table, []).append((wire, wire + pt.registers - 1, pt.name))
        if pt.scale_register is not None:
            ref = p.by_name.get(pt.scale_register)
            if ref is None:
                add((*loc, "scale_register"), f"points[{pt.name}].scale_register",
                    f"no point named {pt.scale_register!r} in this profile")
            elif ref.type not in ("s16", "u16"):
                add((*loc, "scale_register"), f"points[{pt.name}].scale_register",
                    f"{pt.scale_register!r} must be an s16 exponent, it is {ref.type}")
    for table, items in spans.items():
        items.sort()
        for (a0, a1, n0), (b0, b1, n1) in zip(items, items[1:], strict=False):
            if b0 <= a1:
                i = seen[n1]
                add(("points", i, "address"), f"points[{n1}].address",
                    f"{table} registers {b0}..{b1} overlap point {n0!r} ({a0}..{a1})")
    for i, rule in enumerate(p.identification):
        if rule.point not in p.by_name:
            add(("identification", i, "point"), f"identification[{i}].point", f"no point named {rule.point!r}")
    for i, g in enumerate(p.golden):
        for name in g.expect:
            if name not in p.by_name:
                add(("golden", i, "expect", name), f"golden[{g.name}].expect.{name}", "no point of that name")
    return problems


def load_profile(path: Path | str) -> Profile:
    """Load and check one profile file; raise ConfigError naming file, line, point and field."""
    path = Path(path)
    return load_checked(Profile, path, lambda profile, lines: _check_profile(profile, lines, path),
                        prepare=lambda data: {"id": path.stem, **data}
                        if isinstance(data, dict) and "id" not in data else data)


def profile_ids(directory: Path = PROFILE_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


@functools.cache
def get_profile(profile_id: str, directory: Path = PROFILE_DIR) -> Profile:
    """The profile with this id from the library (cached: profiles are immutable)."""
    path = directory / f"{profile_id}.yaml"
    if not path.is_file():
        known = ", ".join(profile_ids(directory))
        msg = f"unknown profile {profile_id!r}; known profiles: {known}"
        raise LookupError(msg)
    return load_profile(path)


def golden_check(profile: Profile) -> list[str]:
    """Decode each golden vector; return a description of every mismatch (empty when all agree)."""
    failures: list[str] = []
    for g in profile.golden:
        image: dict[str, dict[int, int]] = {}
        for table, regs in g.registers.items():
            t = image.setdefault(table, {})
            for addr, words in regs.items():
                wire = wire_address(addr, table, profile.addressing)
                for k, w in enumerate(words):
                    t[wire + k] = w
        decoded = profile.decode_points(image)
        values = decoded.values
        for name, want in g.expect.items():
            if name not in values:
                why = decoded.undecodable.get(name) or (
                    f"its scale factor {decoded.unscaled[name]} is missing" if name in decoded.unscaled
                    else "registers missing from the vector")
                failures.append(f"{profile.id} golden {g.name!r}: {name}: {why}")
                continue
            got = values[name]
            if isinstance(want, float | int) and isinstance(got, float | int):
                if not math.isclose(got, want, rel_tol=g.tolerance, abs_tol=g.tolerance):
                    failures.append(f"{profile.id} golden {g.name!r}: {name}: decoded {got!r}, document says {want!r}")
            elif got != want:
                failures.append(f"{profile.id} golden {g.name!r}: {name}: decoded {got!r}, document says {want!r}")
    return failures


