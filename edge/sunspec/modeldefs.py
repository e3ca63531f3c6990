"""SunSpec model definitions: our own YAML files under edge/sunspec/models/, one per model.

The files are written from the SunSpec Information Model Specification; pysunspec2's JSON is never
read at run time (the tests use pysunspec2 as an independent reference). Every file is checked on
load: offsets must follow each other without gaps, sizes must fit the types, scale-factor names
must name a sunssf point in scope, and the fixed length must equal the sum of the point sizes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge.yamlio import LineMap, line_of, load_checked

__all__ = [
    "MODEL_DIR", "TYPE_SIZE", "ModelDef", "PointDef", "RepeatingDef", "SunSpecType",
    "get_model", "load_model", "model_ids",
]

MODEL_DIR = Path(__file__).parent / "models"

SunSpecType = Literal[
    "int16", "uint16", "count", "acc16", "enum16", "bitfield16", "sunssf", "pad",
    "int32", "uint32", "acc32", "enum32", "bitfield32", "float32",
    "int64", "uint64", "acc64", "float64", "string",
]

#: registers per type; a string says its own size
TYPE_SIZE: dict[str, int] = {
    "int16": 1, "uint16": 1, "count": 1, "acc16": 1, "enum16": 1, "bitfield16": 1, "sunssf": 1, "pad": 1,
    "int32": 2, "uint32": 2, "acc32": 2, "enum32": 2, "bitfield32": 2, "float32": 2,
    "int64": 4, "uint64": 4, "acc64": 4, "float64": 4,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PointDef(_Strict):
    """One point as the specification lists it."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    offset: int = Field(ge=0, description="registers from the model's ID register (or the block start)")
    type: SunSpecType
    size: int | None = Field(None, ge=1, description="registers; required for strings")
    sf: str | None = Field(None, description="name of the sunssf point that scales this one")
    units: str | None = None
    mandatory: bool = False
    access: Literal["R", "RW"] = "R"
    label: str = ""
    symbols: dict[int, str] | None = Field(None, description="enum values or bitfield bit numbers")

    @model_validator(mode="after")
    def _size(self) -> PointDef:
        if self.type == "string":
            if self.size is None:
                msg = "a string needs size (its length in registers)"
                raise ValueError(msg)
        elif self.size is not None and self.size != TYPE_SIZE[self.type]:
            need = TYPE_SIZE[self.type]
            msg = f"size {self.size} does not fit type {self.type}, which takes {need} register(s)"
            raise ValueError(msg)
        if self.sf is not None and self.type in ("string", "pad", "sunssf", "enum16", "enum32", "bitfield16",
                                                 "bitfield32", "count"):
            msg = f"a {self.type} point cannot have a scale factor"
            raise ValueError(msg)
        return self

    @property
    def registers(self) -> int:
        return self.size if self.size is not None else TYPE_SIZE[self.type]


class RepeatingDef(_Strict):
    """A block repeated N times after the fixed part (model 160: one block per MPPT module)."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    count: str = Field(description="the fixed-part point holding the number of blocks")
    length: int = Field(ge=1, description="registers per block")
    points: list[PointDef] = Field(min_length=1)


class ModelDef(_Strict):
    id: int = Field(ge=1, le=65534)
    name: str
    label: str
    length: int | None = Field(None, ge=0, description="L for a fixed-length model; None when it repeats")
    points: list[PointDef] = Field(min_length=2)
    repeating: RepeatingDef | None = None

    @functools.cached_property
    def by_name(self) -> dict[str, PointDef]:
        return {p.name: p for p in self.points}

    @property
    def fixed_registers(self) -> int:
        """Registers of the fixed part, ID and L included."""
        last = self.points[-1]
        return last.offset + last.registers

    def blocks_for(self, length: int) -> int:
        """Number of repeating blocks a model of length L holds (0 for a fixed model).

        Raises ValueError when L does not fit the fixed part plus whole blocks.
        """
        if self.repeating is None:
            return 0
        rest = length + 2 - self.fixed_registers
        if rest < 0 or rest % self.repeating.length:
            msg = (f"model {self.id}: length {length} is not {self.fixed_registers - 2} + "
                   f"{self.repeating.length} x N")
            raise ValueError(msg)
        return rest // self.repeating.length

    def length_for(self, blocks: int = 0) -> int:
        """L of this model with that many repeating blocks."""
        if self.repeating is None:
            assert self.length is not None
            return self.length
        return self.fixed_registers - 2 + blocks * self.repeating.length


_Add = Callable[[tuple[str | int, ...], str], None]


def _check_points(points: list[PointDef], loc: tuple[str | int, ...], start: int, add: _Add) -> None:
    expected = start
    seen: set[str] = set()
    for i, p in enumerate(points):
        if p.name in seen:
            add((*loc, i, "name"), f"duplicate point name {p.name!r}")
        seen.add(p.name)
        if p.offset != expected:
            add((*loc, i, "offset"),
                f"{p.name}: offset {p.offset}, but the previous point ends at {expected}")
        expected = p.offset + p.registers


def _check_model(m: ModelDef, path: Path, lines: LineMap) -> list[tuple[int | None, str, str]]:
    problems: list[tuple[int | None, str, str]] = []

    def add(loc: tuple[str | int, ...], msg: str) -> None:
        problems.append((line_of(lines, loc), ".".join(str(x) for x in loc), msg))

    if path.stem != f"model_{m.id}":
        add(("id",), f"model {m.id} must live in model_{m.id}.yaml")
    if [p.name for p in m.points[:2]] != ["ID", "L"] or m.points[0].offset != 0:
        add(("points",), "a model starts with ID (offset 0) and L (offset 1)")
    _check_points(m.points, ("points",), 0, add)
    fixed_sf = {p.name for p in m.points if p.type == "sunssf"}
    for i, p in enumerate(m.points):
        if p.sf is not None and p.sf not in fixed_sf:
            add(("points", i, "sf"), f"{p.name}: no sunssf point named {p.sf!r} in this model")
    if m.repeating is None:
        if m.length is None:
            add(("length",), "a model without a repeating block needs its length L")
        elif m.length + 2 != m.fixed_registers:
            span = m.fixed_registers - 2
            add(("length",), f"L = {m.length}, but the points span {span} registers after ID and L")
    else:
        r = m.repeating
        if m.length is not None:
            add(("length",), "a model with a repeating block has no fixed length")
        if r.count not in m.by_name or m.by_name[r.count].type != "count":
            add(("repeating", "count"), f"{r.count!r} must name a count point of the fixed part")
        _check_points(r.points, ("repeating", "points"), 0, add)
        end = r.points[-1].offset + r.points[-1].registers
        if end != r.length:
            add(("repeating", "length"), f"length {r.length}, but the block's points span {end} registers")
        block_sf = {p.name for p in r.points if p.type == "sunssf"}
        for i, p in enumerate(r.points):
            if p.sf is not None and p.sf not in block_sf | fixed_sf:
                add(("repeating", "points", i, "sf"), f"{p.name}: no sunssf point named {p.sf!r} in scope")
    return problems


def load_model(path: Path | str) -> ModelDef:
    """Load and check one model file; raise ConfigError naming file, line and field."""
    path = Path(path)
    return load_checked(ModelDef, path, lambda model, lines: _check_model(model, path, lines))


def model_ids(directory: Path = MODEL_DIR) -> list[int]:
    """The models we have definitions for."""
    return sorted(int(p.stem.removeprefix("model_")) for p in directory.glob("model_*.yaml"))


@functools.cache
def get_model(model_id: int) -> ModelDef:
    """The definition of a model; LookupError for a model we have no file for."""
    path = MODEL_DIR / f"model_{int(model_id)}.yaml"
    if not path.is_file():
        known = ", ".join(str(i) for i in model_ids())
        msg = f"no definition for SunSpec model {model_id}; known models: {known}"
        raise LookupError(msg)
    return load_model(path)
