"""`kwwk commission verify`: is this gateway ready to deliver trusted data?

One run checks, for one gateway of a cell config:

- config: the cell file loads and has the gateway;
- every device: reachable, identified, every value plausible, counters alive (see probe.py);
- secrets: the MQTT password file (and the broker's CA) are in place and private;
- broker: a TLS login with the gateway's own credentials;
- acl: the broker lets the gateway publish its status (PUBACK success) and refuses other topics;
- clock: within a configurable offset of the central clock (time beacon), or NTP-synchronised;
- outbox: its folder is writable, its database sound, the disk has room for it to fill;
- service: the gateway service is not holding a serial bus the check needs.

Each check passes, warns or fails with the fix to try; the report (HTML and Markdown) names the
site, the devices, their readings and the checks, for the cooperative's files.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from edge.cell import CellConfig, Device, Gateway
from edge.modbus import LineRegistry, LineSpec
from edge.mqtt import MqttSettings
from gateway.commission.checks import (
    Check,
    broker_checks,
    clock_check,
    mqtt_session,
    outbox_check,
    secrets_check,
)
from gateway.commission.common import Status, worst
from gateway.commission.probe import DeviceProbe, probe_device

__all__ = ["VerifyReport", "device_check", "verify"]


@dataclass
class VerifyReport:
    cfg: CellConfig
    gateway: Gateway
    started: datetime
    finished: datetime | None = None
    technician: str | None = None
    host: str = field(default_factory=socket.gethostname)
    checks: list[Check] = field(default_factory=list)
    devices: list[tuple[Device, LineSpec, DeviceProbe]] = field(default_factory=list)
    broker: MqttSettings | None = None
    outbox: Path | None = None

    @property
    def status(self) -> Status:
        return worst(c.status for c in self.checks)

    @property
    def passed(self) -> bool:
        return self.status in ("pass", "warn")

    def counts(self) -> dict[str, int]:
        out = {"pass": 0, "warn": 0, "fail": 0, "skip": 0}
        for c in self.checks:
            out[c.status] += 1
        return out


def device_check(device: Device, spec: LineSpec, probe: DeviceProbe) -> Check:
    where = spec.key.replace("rtu:", "serial ").replace("tcp:", "tcp ")
    summary = f"{probe.profile.id} at unit {probe.unit_id} on {where}: {probe.summary}"
    fails = [f for f in probe.findings if f.status == probe.status]
    fix = " / ".join(dict.fromkeys(f.fix for f in fails if f.fix))
    details = [f"{f.status}: {f.message}" for f in probe.findings]
    return Check(f"device {device.id}", probe.status, summary, fix, details)


def _service_running(name: str = "kwwk-gateway") -> bool | None:
    try:
        res = subprocess.run(["systemctl", "is-active", "--quiet", name], timeout=3, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.returncode == 0


async def verify(cfg: CellConfig, gateway_id: str, *, broker: MqttSettings, outbox: Path,
                 password_file: str | None = None, pause: float = 5.0, clock_max_offset: float = 10.0,
                 min_free_mb: float | None = None, require_tls: bool = True, now: Callable[[], float] = time.time,
                 beacon_wait: float = 3.0, technician: str | None = None, service_user: str | None = "kwwk",
                 time_state: dict | None = None, check_service: bool = True) -> VerifyReport:
    """Run every check for one gateway; never raises for a failed check (see VerifyReport.status).

    `broker`, `outbox` and `password_file` are what the gateway runs with: gateway.settings.resolve() gives them.
    """
    gw = cfg.gateway(gateway_id)
    report = VerifyReport(cfg, gw, datetime.now(UTC), technician=technician, broker=broker, outbox=Path(outbox))
    report.checks.append(Check("config", "pass", f"{cfg.source or 'cell config'}: cell {cfg.cell.id!r}, gateway "
                                                 f"{gw.id!r} with {len(gw.devices)} device(s)"))
    serial = any(d.connection.line is not None and next(li for li in gw.lines if li.id == d.connection.line).kind
                 == "rtu" for d in gw.devices)
    if check_service and serial and _service_running():
        report.checks.append(Check(
            "service", "warn", "kwwk-gateway is running and polls the same serial bus: verify's reads interleave "
                               "with its polls from another process",
            "sudo systemctl stop kwwk-gateway before verifying, and start it again afterwards"))

    lines = LineRegistry()
    jobs = []
    for dev in gw.devices:
        spec, unit = cfg.line_spec(gw, dev)
        line = lines.get(spec)
        points = cfg.published_points(dev)
        jobs.append((dev, spec, probe_device(line, cfg.profiles[dev.id], unit, points=points, pause=pause,
                                             name=dev.name or dev.id)))

    async def devices() -> list[DeviceProbe]:
        try:
            return list(await asyncio.gather(*(job for _, _, job in jobs)))
        finally:
            for line in lines:
                await line.close()

    mqtt_task = asyncio.to_thread(mqtt_session, broker, cfg.cell.id, gw.id, beacon_wait=beacon_wait, now=now)
    probes, session = await asyncio.gather(devices(), mqtt_task)
    for (dev, spec, _), probe in zip(jobs, probes, strict=True):
        report.devices.append((dev, spec, probe))
        report.checks.append(device_check(dev, spec, probe))
    report.checks.append(secrets_check(password_file, broker.ca_file, broker.tls))
    report.checks.extend(broker_checks(session, broker, cfg.cell.id, gw.id, require_tls=require_tls,
                                       password_file=password_file))
    report.checks.append(clock_check(session, max_offset=clock_max_offset, now=now, state=time_state))
    report.checks.append(outbox_check(Path(outbox), max_mb=gw.outbox.max_mb, min_free_mb=min_free_mb,
                                      service_user=service_user))
    report.finished = datetime.now(UTC)
    return report
