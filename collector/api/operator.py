"""Operators' view of the registry and the live data: cells, their devices, the latest value of every point."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from collector.query import InfluxQL, ident, literal
from collector.registry import Registry
from collector.api.errors import known_cell
from edge.cell import CellConfig

__all__ = ["CellLatest", "CellSummary", "DeviceInfoOut", "DeviceLatest", "PointValue", "make_operator_router"]


class PointValue(BaseModel):
    value: float | None
    ts: int | None = None
    unit: str = ""


class DeviceLatest(BaseModel):
    id: str
    gateway: str
    device_class: str
    profile: str
    points: dict[str, PointValue]


class CellLatest(BaseModel):
    cell: str
    devices: list[DeviceLatest]


class CellSummary(BaseModel):
    id: str
    name: str
    gateways: list[str]
    devices: int
    residents: int | None = None
    connections: int | None = None
    public: bool = Field(True, description="shown on the residents' page")


class DeviceInfoOut(BaseModel):
    id: str
    name: str | None
    gateway: str
    profile: str
    device_class: str
    consumer: bool = Field(description="meters a single household or customer: never shown publicly")
    roles: dict[str, str] = Field(description="point → loop role in the balance")
    points: dict[str, str] = Field(description="published point → unit")


def make_operator_router(registry: Registry, db: InfluxQL) -> APIRouter:
    router = APIRouter(tags=["cells"])

    def cell_cfg(cell: str) -> CellConfig:
        return known_cell(registry, cell)

    @router.get("/api/cells")
    async def cells() -> list[CellSummary]:
        """Every cell of the alliance."""
        return [CellSummary(id=c.cell.id, name=c.cell.name, gateways=[g.id for g in c.gateways],
                            devices=sum(len(g.devices) for g in c.gateways), residents=c.cell.residents,
                            connections=c.cell.connections, public=c.cell.public)
                for c in registry.cells.values()]

    @router.get("/api/cells/{cell}/devices")
    async def devices(cell: str) -> list[DeviceInfoOut]:
        """The cell's devices: gateway, profile, balance roles, published points and units."""
        cfg = cell_cfg(cell)
        out = []
        for gw, dev in cfg.devices():
            info = registry.device(cell, dev.id)
            out.append(DeviceInfoOut(id=dev.id, name=dev.name, gateway=gw.id, profile=dev.profile,
                                     device_class=cfg.profiles[dev.id].device_class, consumer=dev.consumer,
                                     roles=dict(dev.roles), points=dict(sorted(info.units.items())) if info else {}))
        return out

    @router.get("/api/cells/{cell}/latest")
    async def latest(cell: str) -> CellLatest:
        """The latest value and timestamp of every point of every device in the cell."""
        cfg = cell_cfg(cell)
        devs = registry.cell_devices(cell)
        statements: list[tuple[str, str]] = []  # (measurement, field)
        for meas in sorted({d.measurement for d in devs}):
            fields = sorted({p for d in devs if d.measurement == meas for p in d.points})
            statements += [(meas, f) for f in fields]
        results = await db.query(*[
            f"SELECT last({ident(f)}) FROM {ident(m)} WHERE {ident('cell')} = {literal(cell)} GROUP BY {ident('device')}"
            for m, f in statements])
        found: dict[tuple[str, str], tuple[int, float]] = {}
        for (_m, f), series in zip(statements, results, strict=True):
            for s in series:
                found[(s.tags.get("device", ""), f)] = (s.values[0][0], s.values[0][1])
        out = []
        for d in sorted(devs, key=lambda d: d.device):
            pts = {}
            for p in sorted(d.points):
                ts, value = found.get((d.device, p), (None, None))
                pts[p] = PointValue(value=value, ts=ts, unit=d.units.get(p, ""))
            out.append(DeviceLatest(id=d.device, gateway=d.gateway, device_class=d.measurement,
                                    profile=cfg.device(d.device).profile, points=pts))
        return CellLatest(cell=cell, devices=out)

    return router
