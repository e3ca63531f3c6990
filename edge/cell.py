"""The cell registry: one YAML file per cell, read by its gateways (their devices) and by the central side
(the cell's structure, the roles its meters play in each loop).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from edge.modbus import LineSpec
from edge.profile import PROFILE_DIR, Point, Profile, load_profile, profile_ids
from edge.yamlio import ConfigError, LineMap, line_of, load_checked

__all__ = [
    "RATE_UNITS", "ROLES", "Cell", "CellConfig", "Connection", "Device", "Gateway", "MeterChange", "SerialLine",
    "load_cell", "load_cells",
]

Ident = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=48,
                             description="lower-case letters, digits, '-' and '_' (used in MQTT topics and tags)")]

#: what a point may contribute to a loop's balance (issue: balance engine)
ROLES: dict[str, tuple[str, ...]] = {
    "electricity": ("generation", "consumption", "grid_import", "grid_export", "storage_charge", "storage_discharge"),
    "heat": ("generation", "feed", "delivery", "import"),
    "water": ("abstraction", "supply", "consumption", "recycled", "export"),
    "fuel": ("input",),
}
#: units of points a role may integrate when a device offers no counter (the balance flags them estimated)
RATE_UNITS = ("W", "kW", "MW", "m³/h", "l/h", "m³/s")
Role = Literal[
    "electricity.generation", "electricity.consumption", "electricity.grid_import", "electricity.grid_export",
    "electricity.storage_charge", "electricity.storage_discharge",
    "heat.generation", "heat.feed", "heat.delivery", "heat.import",
    "water.abstraction", "water.supply", "water.consumption", "water.recycled", "water.export",
    "fuel.input",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Location(_Strict):
    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)


class Cell(_Strict):
    id: Ident
    name: str
    timezone: str = "Europe/Berlin"
    location: Location | None = None
    residents: int | None = Field(None, ge=0)
    connections: int | None = Field(None, ge=0, description="service connections, for per-connection figures")
    public: bool = Field(True, description="shown on the residents' page")


class SerialLine(_Strict):
    """An RS-485 bus on the gateway (or a serial device server reached by RTU over TCP)."""

    id: Ident
    kind: Literal["rtu", "rtu_over_tcp"] = "rtu"
    serial_port: str | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    baudrate: int = Field(9600, ge=300, le=921600)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    timeout: float = Field(1.0, gt=0, le=30)

    @model_validator(mode="after")
    def _endpoint(self) -> SerialLine:
        if self.kind == "rtu" and not self.serial_port:
            raise ValueError("an rtu line needs serial_port (e.g. /dev/ttyUSB0)")
        if self.kind == "rtu_over_tcp" and not (self.host and self.port):
            raise ValueError("an rtu_over_tcp line needs host and port")
        return self


class Connection(_Strict):
    """Either a Modbus TCP endpoint (host, port) or a unit on one of the gateway's serial lines."""

    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    line: Ident | None = None
    unit_id: int | None = Field(None, ge=0, le=247)
    timeout: float | None = Field(None, gt=0, le=30)

    @model_validator(mode="after")
    def _one_kind(self) -> Connection:
        if self.line is None and self.host is None:
            raise ValueError("give host (Modbus TCP) or line (a serial line of this gateway)")
        if self.line is not None and self.host is not None:
            raise ValueError("give host or line, not both")
        return self


class SimSpec(BaseModel):
    """How the site simulator drives this device; ignored by real gateways."""

    model_config = ConfigDict(extra="allow", frozen=True)
    model: Literal[
        "pv", "chp", "gas", "grid", "pump", "heat_feed", "heat_consumer",
        "water_abstraction", "water_supply", "water_consumer", "static",
    ]


class Device(_Strict):
    id: Ident
    name: str | None = None
    profile: str
    connection: Connection
    poll_interval: float | None = Field(None, ge=0.1, le=86400, description="seconds; default: the gateway's")
    points: list[str] | None = Field(None, description="publish only these points (default: all)")
    roles: dict[str, Role] = Field(default_factory=dict, description="point -> loop role")
    consumer: bool = Field(False, description="meters a single household or customer: never shown publicly")
    ratings: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="role point -> plausible maximum rate, in its unit per hour (kWh/h = kW, "
                                          "m³/h): the balance's plausibility cap")
    sim: SimSpec | None = None


class MqttIdentity(_Strict):
    username: str | None = None
    password_file: str | None = None


class OutboxSpec(_Strict):
    """Bounds of the gateway's store-and-forward buffer, what to do when it is full, and what it writes to the
    SD card (gateway/outbox.py says exactly what each setting keeps on SIGKILL and on power loss)."""

    max_mb: float = Field(512, gt=0, description="disk the outbox may use: database, WAL and .seq file together")
    max_readings: int = Field(10_000_000, ge=100)
    max_age_days: float = Field(60, gt=0, description="readings older than this are dropped (counted)")
    overflow: Literal["drop_oldest", "drop_newest"] = Field(
        "drop_oldest", description="drop_oldest keeps the present visible; drop_newest keeps the oldest gap-free")
    write_window_s: float = Field(
        5.0, ge=0, le=60, description="readings the broker has not acknowledged this long after they were taken "
                                      "are written to the card; those it acknowledges sooner never are. "
                                      "A SIGKILL with the broker connected may lose up to this much; 0: every "
                                      "reading is written before it is sent")
    sync_interval_s: float = Field(
        1.0, ge=0, le=60, description="how often written readings are forced to the card (fsync): a power cut "
                                      "loses at most this much of what was written; 0: at every commit")
    keep_sent_s: float = Field(3600, ge=0, description="acknowledged batches kept (in RAM) for resend requests")
    archive_mb: float = Field(4, ge=0, le=256, description="RAM the kept batches may use, compressed")
    batch_readings: int = Field(500, ge=1, le=50_000, description="readings per MQTT message")

    @model_validator(mode="before")
    @classmethod
    def _fsync(cls, data: object) -> object:
        """`fsync: full|normal` (before the write window) still reads: full = sync at every commit."""
        if isinstance(data, dict) and "fsync" in data:
            data = dict(data)
            mode = data.pop("fsync")
            if mode not in ("full", "normal"):
                msg = f"fsync must be full or normal (or use sync_interval_s), got {mode!r}"
                raise ValueError(msg)
            data.setdefault("sync_interval_s", 0.0 if mode == "full" else 1.0)
        return data


class Gateway(_Strict):
    id: Ident
    name: str | None = None
    poll_interval: float = Field(10.0, ge=0.1, le=86400)
    mqtt: MqttIdentity = MqttIdentity()
    outbox: OutboxSpec = OutboxSpec()
    lines: list[SerialLine] = Field(default_factory=list)
    devices: list[Device] = Field(min_length=1)


class Simulation(BaseModel):
    """Demand figures the simulator uses for this cell."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    heat_demand_kw: tuple[float, float] = (40.0, 90.0)  # summer night minimum, winter peak
    water_demand_m3h: tuple[float, float] = (4.0, 25.0)  # night minimum, morning peak
    village_load_kw: tuple[float, float] = (20.0, 70.0)
    heat_network_loss: float = Field(0.08, ge=0, lt=1)
    water_network_loss: float = Field(0.10, ge=0, lt=1)
    treatment_loss: float = Field(0.02, ge=0, lt=1)


class Fuel(_Strict):
    calorific_value_kwh_m3: float = Field(11.2, gt=0, description="Brennwert (Hs) of the gas in kWh/m³")
    correction_factor: float = Field(0.95, gt=0, le=1.2, description="Zustandszahl (z)")


class MeterChange(_Strict):
    """A meter replaced (or its register set) at a known instant: the balance counts the old meter up to its
    final reading and the new one from its initial reading (docs/balance.md, section 3)."""

    device: Ident
    point: str | None = Field(None, description="the counter; may be left out when the device has one role point")
    time: AwareDatetime = Field(description="when the meters were swapped, with its UTC offset")
    old_final: float = Field(description="the old meter's last reading, in the point's unit")
    new_initial: float = Field(description="the new meter's first reading, in the point's unit")
    note: str | None = None


class CellConfig(_Strict):
    cell: Cell
    fuel: Fuel = Fuel()
    gateways: list[Gateway] = Field(min_length=1)
    meter_changes: list[MeterChange] = Field(default_factory=list)
    simulation: Simulation = Simulation()
    source: str = Field("", exclude=True)

    @functools.cached_property
    def profiles(self) -> dict[str, Profile]:
        """Profile of every device, by device id."""
        return {d.id: _profile(d.profile) for g in self.gateways for d in g.devices}

    def gateway(self, gateway_id: str) -> Gateway:
        for g in self.gateways:
            if g.id == gateway_id:
                return g
        known = ", ".join(g.id for g in self.gateways)
        msg = f"cell {self.cell.id!r} has no gateway {gateway_id!r}; it has: {known}"
        raise LookupError(msg)

    def devices(self) -> list[tuple[Gateway, Device]]:
        return [(g, d) for g in self.gateways for d in g.devices]

    def device(self, device_id: str) -> Device:
        for _, d in self.devices():
            if d.id == device_id:
                return d
        msg = f"cell {self.cell.id!r} has no device {device_id!r}"
        raise LookupError(msg)

    def published_points(self, device: Device) -> list[Point]:
        profile = self.profiles[device.id]
        if device.points is not None:
            return [profile.by_name[n] for n in device.points]
        return [p for p in profile.points if p.publish]

    def line_spec(self, gateway: Gateway, device: Device) -> tuple[LineSpec, int]:
        """The physical line a device sits on, and its unit id."""
        profile = self.profiles[device.id]
        conn = device.connection
        unit = conn.unit_id if conn.unit_id is not None else profile.transport.unit_id
        if conn.line is not None:
            line = next(li for li in gateway.lines if li.id == conn.line)
            spec = LineSpec(kind=line.kind, serial_port=line.serial_port, host=line.host, port=line.port,
                            baudrate=line.baudrate, parity=line.parity, stopbits=line.stopbits,
                            timeout=conn.timeout or line.timeout)
        else:
            spec = LineSpec(kind="tcp", host=conn.host, port=conn.port or profile.transport.port,
                            timeout=conn.timeout or profile.transport.timeout)
        return spec, unit


@functools.cache
def _profile(profile_id: str) -> Profile:
    return load_profile(PROFILE_DIR / f"{profile_id}.yaml")


def _check_cell(cfg: CellConfig, lines: LineMap) -> list[tuple[int | None, str, str]]:
    problems: list[tuple[int | None, str, str]] = []

    def add(loc: tuple[str | int, ...], field: str, msg: str) -> None:
        problems.append((line_of(lines, loc), field, msg))

    known_profiles = set(profile_ids())
    device_seen: dict[str, str] = {}
    gateway_seen: set[str] = set()
    for gi, g in enumerate(cfg.gateways):
        gloc: tuple[str | int, ...] = ("gateways", gi)
        if g.id in gateway_seen:
            add((*gloc, "id"), f"gateways[{g.id}].id", "duplicate gateway id")
        gateway_seen.add(g.id)
        line_ids = {li.id for li in g.lines}
        for di, d in enumerate(g.devices):
            loc = (*gloc, "devices", di)
            where = f"gateways[{g.id}].devices[{d.id}]"
            if d.id in device_seen:
                add((*loc, "id"), f"{where}.id", f"duplicate device id (also in gateway {device_seen[d.id]!r}); "
                                                 "device ids are unique within a cell")
            device_seen[d.id] = g.id
            if d.profile not in known_profiles:
                add((*loc, "profile"), f"{where}.profile",
                    f"unknown profile {d.profile!r}; known profiles: {', '.join(sorted(known_profiles))}")
                continue
            try:
                profile = _profile(d.profile)
            except ConfigError as err:
                add((*loc, "profile"), f"{where}.profile", f"profile {d.profile!r} is invalid: {err}")
                continue
            if d.connection.line is not None and d.connection.line not in line_ids:
                add((*loc, "connection", "line"), f"{where}.connection.line",
                    f"no line {d.connection.line!r} on this gateway; lines: {', '.join(sorted(line_ids)) or 'none'}")
            for pi, name in enumerate(d.points or []):
                if name not in profile.by_name:
                    add((*loc, "points", pi), f"{where}.points[{pi}]",
                        f"profile {d.profile!r} has no point {name!r}")
            for name in d.roles:
                if name not in profile.by_name:
                    add((*loc, "roles", name), f"{where}.roles.{name}", f"profile {d.profile!r} has no point {name!r}")
                elif profile.by_name[name].kind != "counter" and profile.by_name[name].unit not in RATE_UNITS:
                    add((*loc, "roles", name), f"{where}.roles.{name}",
                        f"a balance role needs a cumulative counter, or a power or flow ({', '.join(RATE_UNITS)}) "
                        f"to integrate; {name!r} is a {profile.by_name[name].kind} in {profile.by_name[name].unit!r}")
            for name in d.ratings:
                if name not in d.roles:
                    add((*loc, "ratings", name), f"{where}.ratings.{name}",
                        f"{name!r} plays no balance role; ratings cap role points ({', '.join(d.roles) or 'none'})")
    roles = {d.id: list(d.roles) for _, d in cfg.devices()}
    for ci, ch in enumerate(cfg.meter_changes):
        loc = ("meter_changes", ci)
        if ch.device not in roles:
            add((*loc, "device"), f"meter_changes[{ci}].device", f"no device {ch.device!r} in this cell")
        elif ch.point is None and len(roles[ch.device]) != 1:
            add((*loc, "device"), f"meter_changes[{ci}].point",
                f"name the point: {ch.device!r} has {len(roles[ch.device])} role points ({', '.join(roles[ch.device])})")
        elif ch.point is not None and ch.point not in roles[ch.device]:
            add((*loc, "point"), f"meter_changes[{ci}].point", f"{ch.point!r} plays no balance role on {ch.device!r}")
    return problems


def load_cell(path: Path | str) -> CellConfig:
    """Load and check a cell file; every error names the file, the line and the field."""
    return load_checked(CellConfig, path, _check_cell).model_copy(update={"source": str(path)})


def load_cells(directory: Path | str) -> dict[str, CellConfig]:
    """Every cell file in a directory, by cell id; two files claiming one id is an error."""
    cells: dict[str, CellConfig] = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        cfg = load_cell(path)
        if cfg.cell.id in cells:
            raise ConfigError(path, [(None, "cell.id", f"cell {cfg.cell.id!r} is also defined in {cells[cfg.cell.id].source}")])
        cells[cfg.cell.id] = cfg
    if not cells:
        raise ConfigError(directory, [(None, "", "no cell files (*.yaml) found")])
    return cells
