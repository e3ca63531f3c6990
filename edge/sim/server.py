"""Serve a simulated cell over Modbus: one TCP server per endpoint in the cell config, one unit per device.

Reads see the registers of the moment; writes pin the written points, so a test (or a curious
technician) can change what a device reports with an ordinary Modbus client.

With any_port=True every endpoint is served on a port the system picks (port 0) instead of its
configured one, and `ports` tells which: tests then write the gateway's cell config with those ports
(tests/conftest.py `served_cell`), so no port is ever guessed free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from edge.cell import CellConfig, Device
from edge.sim.image import RegisterImage
from edge.sim.site import SimClock, Site

__all__ = ["SimulatorServer"]

log = logging.getLogger("kwwk.sim")

_FC_TABLE = {1: "coil", 5: "coil", 15: "coil", 2: "discrete", 3: "holding", 6: "holding", 16: "holding",
             23: "holding", 4: "input"}


@dataclass
class _Unit:
    device: Device
    image: RegisterImage
    unit_id: int


class SimulatorServer:
    """Runs the physics and the Modbus servers of one or more cells."""

    def __init__(self, cells: Iterable[CellConfig], clock: SimClock | None = None, step: float = 0.5,
                 host_override: str | None = None, sites: dict[str, Site] | None = None,
                 any_port: bool = False) -> None:
        self.clock = clock or SimClock()
        self.step = step
        self.sites: dict[str, Site] = {}
        self.units: dict[tuple[str, str], _Unit] = {}  # (cell, device) -> unit
        self._endpoints: dict[tuple[str, int], list[tuple[str, _Unit]]] = {}
        self._servers: dict[tuple[str, int], ModbusTcpServer] = {}
        #: injected faults per (cell, device): answer with an exception, or never answer
        self.faults: dict[tuple[str, str], Literal["exception", "timeout"]] = {}
        self._task: asyncio.Task[None] | None = None
        self._host_override = host_override
        self._any_port = any_port
        #: configured (host, port) -> the port it is served on, once served (kept when taken offline)
        self._served: dict[tuple[str, int], int] = {}
        for cfg in cells:
            # a site handed in (e.g. after a simulated history) carries on from its state
            site = (sites or {}).get(cfg.cell.id) or Site(cfg, self.clock.now())
            self.sites[cfg.cell.id] = site
            for gw, dev in cfg.devices():
                if dev.sim is None:
                    continue
                if dev.connection.host is None:
                    log.warning("device %s sits on serial line %s; the simulator serves TCP only", dev.id,
                                dev.connection.line)
                    continue
                _spec, unit_id = cfg.line_spec(gw, dev)
                unit = _Unit(dev, RegisterImage(cfg.profiles[dev.id]), unit_id)
                self.units[(cfg.cell.id, dev.id)] = unit
                port = dev.connection.port or cfg.profiles[dev.id].transport.port
                self._endpoints.setdefault((dev.connection.host, port), []).append((cfg.cell.id, unit))
        self.refresh()

    @property
    def endpoints(self) -> list[tuple[str, int, list[str]]]:
        """(host, served port, device ids) per endpoint."""
        return [(h, self._served.get((h, p), p), [u.device.id for _, u in units])
                for (h, p), units in sorted(self._endpoints.items())]

    @property
    def ports(self) -> dict[tuple[str, int], int]:
        """Configured (host, port) -> the port that endpoint is served on (after start)."""
        return dict(self._served)

    def refresh(self) -> None:
        """Advance every site to the clock's now and re-encode every device's registers."""
        now = self.clock.now()
        for cell_id, site in self.sites.items():
            site.advance(now)
            for dev_id, state in site.state.items():
                unit = self.units.get((cell_id, dev_id))
                if unit is not None:
                    unit.image.update(state)

    def pin(self, cell: str, device: str, point: str, value: float) -> None:
        """Hold a point at a value from now on (what a Modbus write to it does too)."""
        self.sites[cell].pin(device, point, value)
        unit = self.units.get((cell, device))
        if unit is not None:
            unit.image.update(self.sites[cell].state[device])

    def _action(self, cell_id: str, unit: _Unit):  # noqa: ANN202 - pymodbus callback signature
        async def action(function_code: int, start_address: int, address: int, count: int,
                         registers: list[int], set_values: list[int] | list[bool] | None) -> None:
            fault = self.faults.get((cell_id, unit.device.id))
            if fault == "exception":
                return ExcCodes.DEVICE_FAILURE
            if fault == "timeout":
                await asyncio.sleep(3600)  # the client gives up long before; the task dies with the server
            table = _FC_TABLE.get(function_code)
            if table is None:
                return None
            image = unit.image.tables[table]
            if set_values is not None and function_code not in (1, 2, 3, 4):
                words = [int(v) for v in (set_values if isinstance(set_values, list) else [set_values])]
                for name, value in unit.image.written(table, address, words).items():
                    self.sites[cell_id].pin(unit.device.id, name, value)
                    log.info("pinned %s.%s = %s by a Modbus write", unit.device.id, name, value)
                return None
            if table in ("coil", "discrete"):
                return None  # bit tables keep their initial values; no profile simulates them yet
            for i in range(count):
                idx = address - start_address + i
                if 0 <= idx < len(registers):
                    registers[idx] = image.get(address + i, 0)
            return None

        return action

    def _simdevice(self, cell_id: str, unit: _Unit) -> SimDevice:
        spans = unit.image.spans()
        blocks: list[list[SimData]] = []
        for table in ("coil", "discrete", "holding", "input"):
            lo, hi = spans.get(table, (0, 0))
            if table in ("coil", "discrete"):
                blocks.append([SimData(lo, count=hi - lo + 1, values=False, datatype=DataType.BITS)])
            else:
                exists = table in spans
                blocks.append([SimData(lo, count=hi - lo + 1, values=0,
                                       datatype=DataType.REGISTERS if exists else DataType.INVALID)])
        return SimDevice(unit.unit_id, simdata=(blocks[0], blocks[1], blocks[2], blocks[3]),
                         action=self._action(cell_id, unit))

    def fault(self, cell: str, device: str, kind: Literal["exception", "timeout"] | None) -> None:
        """Make a device answer every request with Modbus exception 4, or never answer; None heals it."""
        if kind is None:
            self.faults.pop((cell, device), None)
        else:
            self.faults[(cell, device)] = kind

    def _endpoint_of(self, cell: str, device: str) -> tuple[str, int]:
        for endpoint, units in self._endpoints.items():
            if any(c == cell and u.device.id == device for c, u in units):
                return endpoint
        msg = f"no simulated device {cell}/{device}"
        raise LookupError(msg)

    async def set_offline(self, cell: str, device: str, offline: bool) -> None:
        """Take a device's TCP endpoint down (dropping open connections) or bring it back."""
        endpoint = self._endpoint_of(cell, device)
        if offline:
            server = self._servers.pop(endpoint, None)
            if server is not None:
                await server.shutdown()
        elif endpoint not in self._servers:
            await self._serve(endpoint)

    async def _serve(self, endpoint: tuple[str, int]) -> None:
        host, port = endpoint
        # back online after set_offline: the port it had. Another process' bind(0) could have taken it in
        # between; pymodbus listens with SO_REUSEADDR, so only a listener there stops it, and that is rare
        # enough to leave to the error pymodbus raises.
        port = self._served.get(endpoint, 0 if self._any_port else port)
        devices = [self._simdevice(cell_id, u) for cell_id, u in self._endpoints[endpoint]]
        server = ModbusTcpServer(devices, address=(self._host_override or host, port))
        await server.serve_forever(background=True)
        self._served[endpoint] = server.transport.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._servers[endpoint] = server

    async def start(self) -> None:
        for endpoint in self._endpoints:
            await self._serve(endpoint)
        self._task = asyncio.create_task(self._run(), name="kwwk.sim.physics")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.step)
            self.refresh()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for server in self._servers.values():
            with contextlib.suppress(Exception):
                await server.shutdown()
        self._servers.clear()
