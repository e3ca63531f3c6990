"""Real pymodbus servers serving register images: for tests, benchmarks and bench work.

Nothing here is mocked: SimServer runs pymodbus' own server (SimDevice/SimData API) on a loopback
TCP port, or on a serial port such as one end of a socat pty pair, so the engine talks Modbus to it
exactly as it would to a meter.

An image is {table: {wire address: word}} (bits 0/1 for coil and discrete tables), the same shape
Profile.decode takes. By default every address from the lowest to the highest in a table is
served (gaps read as 0); with holes=True only the addresses in the image exist and the server
answers exception 2 for any request that touches another, like a device with gaps in its map.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Self

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from edge.modbus._line import LineSpec
from edge.sim.image import Image

__all__ = ["Image", "Observed", "SimServer"]

#: async action(function_code, start_address, address, count, registers, set_values) -> ExcCodes | None
Action = Callable[[int, int, int, int, list[int], Any], Awaitable[ExcCodes | None]]

_TABLE_ORDER = ("coil", "discrete", "holding", "input")
_FC_TABLE = {1: "coil", 2: "discrete", 3: "holding", 4: "input"}


def _runs(addresses: Iterable[int]) -> list[tuple[int, int]]:
    """Contiguous runs (first, last) of sorted addresses."""
    runs: list[tuple[int, int]] = []
    for a in sorted(set(addresses)):
        if runs and a == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], a)
        else:
            runs.append((a, a))
    return runs


def _blocks(table: str, words: dict[int, int], holes: bool) -> list[SimData]:
    bits = table in ("coil", "discrete")
    if not words:
        # pymodbus wants every table non-empty: park one unused block at the top of the map
        return [SimData(65520, values=[False] * 16, datatype=DataType.BITS)] if bits else \
            [SimData(65535, values=[0], datatype=DataType.REGISTERS)]
    runs = _runs(words) if holes else [(min(words), max(words))]
    out = []
    for first, last in runs:
        vals = [words.get(a, 0) for a in range(first, last + 1)]
        if bits:
            out.append(SimData(first, values=[bool(v) for v in vals], datatype=DataType.BITS))
        else:
            out.append(SimData(first, values=[int(v) & 0xFFFF for v in vals], datatype=DataType.REGISTERS))
    return out


def sim_device(unit_id: int, image: Image, *, holes: bool = False, action: Action | None = None) -> SimDevice:
    """A pymodbus SimDevice with separate coil, discrete, holding and input tables."""
    simdata = tuple(_blocks(t, dict(image.get(t, {})), holes) for t in _TABLE_ORDER)
    return SimDevice(id=unit_id, simdata=simdata, action=action)  # type: ignore[arg-type]


@dataclass
class Observed:
    """What the server saw: one entry per request received."""

    unit_id: int
    table: str
    address: int
    count: int


@dataclass
class SimServer:
    """A pymodbus server for several unit ids on one line (TCP, RTU over TCP, or a serial port).

    units: unit id -> image. dead: unit ids whose requests are swallowed without an answer (a
    device that is off, on a shared bus). actions: unit id -> pymodbus SimDevice action.
    """

    units: dict[int, Image]
    framer: str = "socket"  # socket (Modbus TCP) or rtu (RTU over TCP, or serial)
    serial_port: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    holes: bool = False
    dead: set[int] = field(default_factory=set)
    actions: dict[int, Action] = field(default_factory=dict)
    seen: list[Observed] = field(default_factory=list)
    exceptions: list[tuple[int, int]] = field(default_factory=list)  # (unit id, exception code) answered
    _server: ModbusTcpServer | ModbusSerialServer | None = None

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU | None:
        if sending:
            if isinstance(pdu, ExceptionResponse):
                self.exceptions.append((pdu.dev_id, pdu.exception_code))
            return pdu
        table = _FC_TABLE.get(pdu.function_code, str(pdu.function_code))
        self.seen.append(Observed(pdu.dev_id, table, getattr(pdu, "address", 0), getattr(pdu, "count", 0)))
        if pdu.dev_id in self.dead:
            return None  # the server never handles it: no answer at all
        return pdu

    async def start(self) -> Self:
        devices = [sim_device(u, img, holes=self.holes, action=self.actions.get(u)) for u, img in self.units.items()]
        framer = FramerType.RTU if self.framer == "rtu" else FramerType.SOCKET
        if self.serial_port is not None:
            self._server = ModbusSerialServer(devices, framer=framer, port=self.serial_port, baudrate=115200,
                                              trace_pdu=self._trace_pdu)  # type: ignore[arg-type]
        else:
            # port 0: the system picks one and we read it back; a restart (stop, start) asks for that same port
            self._server = ModbusTcpServer(devices, framer=framer, address=(self.host, self.port),
                                           trace_pdu=self._trace_pdu)  # type: ignore[arg-type]
        await self._server.serve_forever(background=True)
        if self.serial_port is None:
            self.port = self._server.transport.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            self.drop_connections()
            await server.shutdown()
            await asyncio.sleep(0)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def drop_connections(self) -> int:
        """Close every client connection from the server side (like a device that resets); return how many."""
        if self._server is None:
            return 0
        handlers = list(self._server.active_connections.values())
        for h in handlers:
            if h.transport is not None:
                h.transport.close()
        return len(handlers)

    def spec(self, **kw: Any) -> LineSpec:
        """A LineSpec that reaches this server."""
        if self.serial_port is not None:
            return LineSpec(kind="rtu", serial_port=self.serial_port, baudrate=115200, **kw)
        if self.framer == "rtu":
            return LineSpec(kind="rtu_over_tcp", host=self.host, port=self.port, **kw)
        return LineSpec(kind="tcp", host=self.host, port=self.port, **kw)

    def requests_for(self, unit_id: int) -> list[Observed]:
        return [o for o in self.seen if o.unit_id == unit_id]
