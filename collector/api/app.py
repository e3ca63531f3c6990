"""FastAPI application: health, the cell registry and the latest values of every device."""

from __future__ import annotations

import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel

from collector.api.balance import make_router
from collector.audit import BATCH_MEASUREMENT
from collector.query import InfluxQL, QueryError, ident, literal
from collector.registry import Registry
from collector.storage import InfluxSettings

__all__ = ["ApiSettings", "create_app"]


@dataclass(frozen=True)
class ApiSettings:
    influx: InfluxSettings
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883


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


def create_app(registry: Registry, settings: ApiSettings) -> FastAPI:
    metrics = CollectorRegistry()
    requests = Counter("kwwk_api_requests_total", "API requests", ["route", "status"], registry=metrics)
    latency = Histogram("kwwk_api_request_seconds", "API request latency", ["route"], registry=metrics)
    db = InfluxQL(settings.influx)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # noqa: ANN202
        yield
        await db.close()

    app = FastAPI(title="KWWK Telemetry API", version="1", lifespan=lifespan,
                  description="Cells, their devices and the latest value of every point.")
    app.include_router(make_router(registry, db))

    @app.middleware("http")
    async def observe(request: Request, call_next: Any) -> Response:
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        requests.labels(name, str(response.status_code)).inc()
        latency.labels(name).observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(QueryError)
    async def db_error(_r: Request, err: QueryError) -> JSONResponse:
        return JSONResponse({"detail": f"the database is not available: {err}"}, status_code=503)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> JSONResponse:
        db_ok = await db.ping()
        broker_ok = _tcp_ok(settings.mqtt_host, settings.mqtt_port)
        gateways: dict[str, Any] = {}
        if db_ok:
            try:
                (series,) = await db.query(f"SELECT last({ident('seq')}) FROM {ident(BATCH_MEASUREMENT)} "
                                           f"GROUP BY {ident('cell')}, {ident('gateway')}")
                now = time.time() * 1000
                for s in series:
                    ts = s.values[0][0]
                    gateways[f"{s.tags['cell']}/{s.tags['gateway']}"] = {
                        "last_telemetry": ts, "age_s": round((now - ts) / 1000, 1), "last_seq": s.values[0][1]}
            except QueryError:
                db_ok = False
        for cell, gw in sorted(registry.gateways):
            gateways.setdefault(f"{cell}/{gw}", {"last_telemetry": None, "age_s": None, "last_seq": None})
        ok = db_ok and broker_ok
        return JSONResponse({"status": "ok" if ok else "degraded", "database": db_ok, "broker": broker_ok,
                             "gateways": gateways}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"], include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/cells", tags=["cells"])
    async def cells() -> list[CellSummary]:
        return [CellSummary(id=c.cell.id, name=c.cell.name, gateways=[g.id for g in c.gateways],
                            devices=sum(len(g.devices) for g in c.gateways), residents=c.cell.residents)
                for c in registry.cells.values()]

    @app.get("/api/cells/{cell}/latest", tags=["cells"])
    async def latest(cell: str) -> CellLatest:
        """The latest value and timestamp of every point of every device in the cell."""
        cfg = registry.cells.get(cell)
        if cfg is None:
            raise HTTPException(404, f"unknown cell {cell!r}; known cells: {', '.join(sorted(registry.cells))}")
        devices = registry.cell_devices(cell)
        statements: list[tuple[str, str]] = []  # (measurement, field)
        for meas in sorted({d.measurement for d in devices}):
            fields = sorted({p for d in devices if d.measurement == meas for p in d.points})
            statements += [(meas, f) for f in fields]
        results = await db.query(*[
            f"SELECT last({ident(f)}) FROM {ident(m)} WHERE {ident('cell')} = {literal(cell)} GROUP BY {ident('device')}"
            for m, f in statements])
        found: dict[tuple[str, str], tuple[int, float]] = {}
        for (_m, f), series in zip(statements, results, strict=True):
            for s in series:
                ts, value = s.values[0][0], s.values[0][1]
                found[(s.tags.get("device", ""), f)] = (ts, value)
        out = []
        for d in sorted(devices, key=lambda d: d.device):
            pts = {}
            for p in sorted(d.points):
                ts, value = found.get((d.device, p), (None, None))
                pts[p] = PointValue(value=value, ts=ts, unit=d.units.get(p, ""))
            out.append(DeviceLatest(id=d.device, gateway=d.gateway, device_class=d.measurement,
                                    profile=cfg.device(d.device).profile, points=pts))
        return CellLatest(cell=cell, devices=out)

    return app


def _tcp_ok(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False
