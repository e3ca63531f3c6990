"""One physical Modbus line (a TCP endpoint or a serial bus) with one request in flight at a time.

ModbusLine is the arbiter of its line. Every read (polls of all devices on the bus, commissioning
and scan reads) goes into one FIFO queue that a single worker task drains, so requests from
several devices interleave in arrival order and only one is ever on the wire.

Failure handling:

- timeouts: each request waits at most `timeout`; a healthy device gets `retries` more tries;
- a device that stops answering (timeouts, or a gateway's exception 10/11) is left alone for a
  jittered, exponentially growing, capped period (`backoff_base` .. `backoff_max`). While it backs
  off, reads for it fail at once with DeviceBackoff and cost the bus nothing; when the period is
  over, one request probes it, without retries. A dead device therefore costs the bus at most one
  timeout per backoff period and the live devices keep their turn;
- a lost TCP connection (or serial port) is reopened on the next request; failed attempts back
  off the same way (`reconnect_base` .. `reconnect_max`), reads failing at once with LineDown in
  between. A connection that drops under a request is reopened and the request sent again once;
- on TCP kinds, several timeouts in a row without any answer on the line close the connection,
  which cures half-open connections (a device that rebooted behind a NAT or a switch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType

from edge.backoff import Backoff
from edge.modbus._errors import (
    NO_ANSWER_CODES,
    DeviceBackoff,
    DeviceError,
    LineDown,
    ModbusExceptionReply,
    ReadTimeout,
)

__all__ = ["TABLES", "LineSpec", "LineStats", "ModbusLine"]

log = logging.getLogger(__name__)

#: table -> (pymodbus client method, most items one request may ask for)
TABLES: dict[str, tuple[str, int]] = {
    "holding": ("read_holding_registers", 125),
    "input": ("read_input_registers", 125),
    "coil": ("read_coils", 2000),
    "discrete": ("read_discrete_inputs", 2000),
}

#: consecutive timeouts on a TCP line, whatever the unit, after which the connection is reopened
SILENT_LIMIT = 3


@dataclass(frozen=True, slots=True)
class LineSpec:
    kind: Literal["tcp", "rtu", "rtu_over_tcp"]
    host: str | None = None
    port: int | None = None
    serial_port: str | None = None
    baudrate: int = 9600
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8
    timeout: float = 1.0
    retries: int = 1
    #: a device that stops answering is left alone base, 2*base, 4*base ... up to max seconds (jittered)
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    #: the same for reopening a lost connection or serial port
    reconnect_base: float = 0.5
    reconnect_max: float = 30.0
    #: silence kept between the end of one exchange and the next request (slow RS-485 transceivers)
    turnaround: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("tcp", "rtu", "rtu_over_tcp"):
            msg = f"line kind must be tcp, rtu or rtu_over_tcp, not {self.kind!r}"
            raise ValueError(msg)
        if self.kind == "rtu" and not self.serial_port:
            msg = "an rtu line needs serial_port"
            raise ValueError(msg)
        if self.timeout <= 0 or self.retries < 0 or self.turnaround < 0:
            msg = f"timeout must be > 0, retries and turnaround >= 0 (got {self.timeout}, {self.retries}, {self.turnaround})"
            raise ValueError(msg)

    @property
    def key(self) -> str:
        """Identifies the physical line: devices with the same key share one arbiter.

        Serial ports are resolved through symlinks (/dev/serial/by-id/... and /dev/ttyUSB0 are
        the same bus); hosts are compared case-insensitively; a missing TCP port means 502.
        """
        if self.kind == "rtu":
            return f"rtu:{os.path.realpath(self.serial_port or '')}"
        return f"{self.kind}:{(self.host or '127.0.0.1').strip().lower()}:{self.port or 502}"

    def conflicts(self, other: LineSpec) -> list[str]:
        """Physical settings in which two specs of the same line disagree (a configuration error)."""
        names = ("kind", "baudrate", "parity", "stopbits", "bytesize") if self.kind == "rtu" else ("kind",)
        return [f"{n}: {getattr(self, n)!r} vs {getattr(other, n)!r}"
                for n in names if getattr(self, n) != getattr(other, n)]


@dataclass
class LineStats:
    """Counters for one line, for metrics and health."""

    requests: int = 0  # sent on the wire
    replies: int = 0  # answers, including exception replies
    timeouts: int = 0
    exceptions: int = 0  # Modbus exception replies
    skipped: int = 0  # refused without touching the bus: device backing off or line down
    connects: int = 0  # connection attempts
    connect_failures: int = 0
    disconnects: int = 0  # connections lost or dropped
    busy_seconds: float = 0.0  # time the line spent on requests

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass(slots=True)
class _Job:
    unit_id: int
    table: str
    address: int
    count: int
    ignore_backoff: bool
    future: asyncio.Future[list[int]]
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def where(self) -> str:
        return f"unit {self.unit_id} {self.table} {self.address}+{self.count}"


class _ConnectionLost(Exception):
    pass


class ModbusLine:
    """The arbiter of one physical line: a FIFO of reads, one in flight, backoff per device."""

    def __init__(self, spec: LineSpec, *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.spec = spec
        self._key = spec.key  # resolved once: a by-id symlink may point elsewhere after a replug
        self.stats = LineStats()
        self._clock = clock
        self._rng = rng or random.Random()
        self._queue: deque[_Job] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._lost: asyncio.Event | None = None
        self._reconnect = Backoff(spec.reconnect_base, max(spec.reconnect_base, spec.reconnect_max),
                                  clock=clock, rng=self._rng)
        self._units: dict[int, Backoff] = {}
        self._silent = 0
        self._last_exchange = 0.0

    def __repr__(self) -> str:
        return f"<ModbusLine {self.key} pending={self.pending}>"

    # ------------------------------------------------------------------ public interface

    @property
    def key(self) -> str:
        return self._key

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    @property
    def pending(self) -> int:
        """Reads waiting for their turn (not counting the one in flight)."""
        return sum(1 for j in self._queue if not j.future.done())

    def backoff_remaining(self, unit_id: int) -> float:
        """Seconds before a backing-off device is tried again (0 when it is healthy or due)."""
        b = self._units.get(unit_id)
        return b.remaining if b else 0.0

    def failures(self, unit_id: int) -> int:
        """Consecutive requests the device left unanswered."""
        b = self._units.get(unit_id)
        return b.failures if b else 0

    def reset_backoff(self, unit_id: int | None = None) -> None:
        """Forget failures (one device, or all and the connection's): the next read is sent at once."""
        if unit_id is None:
            for b in self._units.values():
                b.success()
            self._reconnect.success()
        elif unit_id in self._units:
            self._units[unit_id].success()

    async def read(self, unit_id: int, table: str, address: int, count: int, *,
                   ignore_backoff: bool = False) -> list[int]:
        """Read count registers (or bits) at a wire address; raise a DeviceError on any failure.

        Waits its turn behind earlier reads on the line. Raises DeviceBackoff without touching the
        bus while the device backs off (unless ignore_backoff, for an explicit commissioning
        probe), LineDown while the connection cannot be opened.
        """
        if table not in TABLES:
            msg = f"unknown register table {table!r}; expected one of {', '.join(TABLES)}"
            raise ValueError(msg)
        limit = TABLES[table][1]
        if not 1 <= count <= limit or not 0 <= address or address + count > 65536:
            msg = f"cannot read {table} {address}+{count}: count must be 1..{limit} within addresses 0..65535"
            raise ValueError(msg)
        if not 0 <= unit_id <= 255:
            msg = f"unit id must be 0..255, got {unit_id}"
            raise ValueError(msg)
        loop = asyncio.get_running_loop()
        job = _Job(unit_id, table, address, count, ignore_backoff, loop.create_future())
        if not ignore_backoff:
            try:
                self._refuse_if_backing_off(job)
            except DeviceError:
                job.future.cancel()
                raise
        if self._worker is not None and not self._worker.done() and self._worker.get_loop() is not loop:
            # left behind by an event loop that is gone (tests, a restarted service): start afresh
            self._worker = None
            self._queue = deque(j for j in self._queue if j.future.get_loop() is loop)
        self._queue.append(job)
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work(), name=f"modbus line {self.key}")
        return await job.future

    async def close(self) -> None:
        """Fail queued reads, stop the worker and close the connection. A later read reopens it."""
        loop = asyncio.get_running_loop()
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done() and job.future.get_loop() is loop:
                job.future.set_exception(LineDown(f"{self.key} closed"))
        worker, self._worker = self._worker, None
        if (worker is not None and not worker.done() and worker.get_loop() is loop
                and worker is not asyncio.current_task()):
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker
        self._drop_client(count=False)

    # ------------------------------------------------------------------ worker

    def _unit(self, unit_id: int) -> Backoff:
        b = self._units.get(unit_id)
        if b is None:
            b = self._units[unit_id] = Backoff(self.spec.backoff_base,
                                               max(self.spec.backoff_base, self.spec.backoff_max),
                                               clock=self._clock, rng=self._rng)
        return b

    def _refuse_if_backing_off(self, job: _Job) -> None:
        unit = self._units.get(job.unit_id)
        if unit is not None and unit.blocked:
            self.stats.skipped += 1
            raise DeviceBackoff(
                f"{self.key} {job.where}: not sent, the device missed {unit.failures} request(s) in a row; "
                f"next try in {unit.remaining:.1f} s", unit.remaining, unit.failures)
        if self._reconnect.blocked and not self.connected:
            raise self._line_down(job)

    def _line_down(self, job: _Job) -> LineDown:
        self.stats.skipped += 1
        err = LineDown(f"{self.key} {job.where}: not sent, the line is down; "
                       f"next connection attempt in {self._reconnect.remaining:.1f} s")
        err.sent = False
        return err

    async def _work(self) -> None:
        while self._queue:
            job = self._queue.popleft()
            if job.future.done():  # the caller gave up while waiting
                continue
            started = time.monotonic()
            try:
                regs = await self._execute(job)
            except asyncio.CancelledError:
                if not job.future.done():
                    job.future.set_exception(LineDown(f"{self.key} closed"))
                raise
            except DeviceError as err:
                if not job.future.done():
                    job.future.set_exception(err)
            except Exception as err:  # never let one bad reply kill the line's worker
                log.exception("%s %s: unexpected error", self.key, job.where)
                if not job.future.done():
                    job.future.set_exception(DeviceError(f"{self.key} {job.where}: {err!r}"))
            else:
                if not job.future.done():
                    job.future.set_result(regs)
            finally:
                self.stats.busy_seconds += time.monotonic() - started

    async def _execute(self, job: _Job) -> list[int]:
        if not job.ignore_backoff:
            # the device may have gone silent while this read waited in the queue
            self._refuse_if_backing_off(job)
        unit = self._unit(job.unit_id)
        # a device that already missed a request is probed once, without retries
        tries = 1 if unit.failures else self.spec.retries + 1
        reopen = 1  # a connection that drops under a request is reopened once, for free
        last: ReadTimeout | None = None
        attempt = 0
        while attempt < tries:
            await self._ensure_connected(job)
            try:
                regs = await self._transact(job)
            except _ConnectionLost as err:
                self._drop_client()
                if reopen:
                    reopen -= 1
                    continue
                raise LineDown(f"{self.key} {job.where}: connection lost ({err})") from None
            except ReadTimeout as err:
                last = err
                attempt += 1
                self.stats.timeouts += 1
                self._silent += 1
                if self.spec.kind != "rtu" and self._silent >= SILENT_LIMIT:
                    log.info("%s: %d requests in a row unanswered, reopening the connection", self.key, self._silent)
                    self._silent = 0
                    self._drop_client()
                continue
            except ModbusExceptionReply as err:
                self._silent = 0
                self.stats.exceptions += 1
                if err.code in NO_ANSWER_CODES:
                    # the gateway already waited for the device: no retry
                    last = ReadTimeout(f"{err} (gateway: the device does not answer)")
                    break
                unit.success()  # it answered: it is alive
                raise
            self._silent = 0
            unit.success()
            return regs
        assert last is not None
        delay = unit.failure()
        log.info("%s unit %d: %s; leaving it alone for %.1f s (%d failure(s) in a row)",
                 self.key, job.unit_id, last, delay, unit.failures)
        raise last

    # ------------------------------------------------------------------ transport

    def _make_client(self, lost: asyncio.Event) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        spec = self.spec

        def on_connect(up: bool) -> None:
            if not up:
                lost.set()

        common: dict[str, Any] = {"timeout": spec.timeout, "retries": 0, "reconnect_delay": 0,
                                  "trace_connect": on_connect, "name": self.key}
        client: AsyncModbusTcpClient | AsyncModbusSerialClient
        if spec.kind == "rtu":
            client = AsyncModbusSerialClient(
                spec.serial_port or "", framer=FramerType.RTU, baudrate=spec.baudrate, parity=spec.parity,
                stopbits=spec.stopbits, bytesize=spec.bytesize, **common)
        else:
            # RTU over TCP: serial device servers in transparent mode pass RTU frames (with CRC,
            # without the MBAP header) through a TCP socket
            framer = FramerType.RTU if spec.kind == "rtu_over_tcp" else FramerType.SOCKET
            client = AsyncModbusTcpClient(spec.host or "127.0.0.1", port=spec.port or 502, framer=framer, **common)
        # pymodbus closes the connection after a few unanswered requests; on a shared bus a dead
        # device would take the live ones down with it. This class decides (SILENT_LIMIT).
        client.set_max_no_responses(1 << 30)
        return client

    async def _ensure_connected(self, job: _Job) -> None:
        loop = asyncio.get_running_loop()
        if self._client is not None and self._client_loop is not loop:
            self._drop_client(count=False)  # a client belongs to the event loop that opened it
        if self._client is not None and self._client.connected:
            return
        if self._client is not None:
            self._drop_client()
        if self._reconnect.blocked:
            raise self._line_down(job)
        lost = asyncio.Event()
        client = self._make_client(lost)
        self.stats.connects += 1
        try:
            async with asyncio.timeout(self.spec.timeout + 1.0):  # not wait_for: it can swallow a cancellation on 3.11
                ok = await client.connect()
        except (TimeoutError, OSError, ModbusException):
            ok = False
        if not ok or not client.connected:
            with contextlib.suppress(Exception):
                client.close()
            self.stats.connect_failures += 1
            delay = self._reconnect.failure()
            msg = f"cannot open {self.key}; next attempt in {delay:.1f} s"
            log.warning(msg)
            err = LineDown(f"{msg} ({job.where} not sent)")
            err.sent = False
            raise err
        if self._reconnect.failures:
            log.info("%s: connected again", self.key)
        self._reconnect.success()
        self._client, self._client_loop, self._lost = client, loop, lost

    def _drop_client(self, *, count: bool = True) -> None:
        client, self._client, self._lost = self._client, None, None
        if client is not None:
            if count:
                self.stats.disconnects += 1
            with contextlib.suppress(Exception):
                client.close()

    async def _turnaround(self) -> None:
        if self.spec.turnaround > 0:
            wait = self._last_exchange + self.spec.turnaround - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)

    async def _transact(self, job: _Job) -> list[int]:
        client, lost = self._client, self._lost
        assert client is not None and lost is not None
        await self._turnaround()
        where = f"{self.key} {job.where}"
        method = getattr(client, TABLES[job.table][0])
        self.stats.requests += 1
        try:
            call = method(job.address, count=job.count, device_id=job.unit_id)
        except ConnectionException as err:
            raise _ConnectionLost(str(err)) from None
        task = asyncio.ensure_future(call)
        lost_wait = asyncio.ensure_future(lost.wait())
        try:
            # pymodbus times the request out itself; the guard only covers a stuck transport
            done, _ = await asyncio.wait({task, lost_wait}, timeout=self.spec.timeout * 2 + 1.0,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            lost_wait.cancel()
            self._last_exchange = time.monotonic()
        if task not in done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            if lost.is_set():
                raise _ConnectionLost("the other end closed the connection")
            raise ReadTimeout(f"no answer from {where}")
        try:
            reply = task.result()
        except ConnectionException as err:
            raise _ConnectionLost(str(err)) from None
        except (TimeoutError, ModbusIOException) as err:
            if lost.is_set():
                raise _ConnectionLost("the other end closed the connection") from None
            raise ReadTimeout(f"no answer from {where}: {err}") from None
        except ModbusException as err:  # a malformed reply
            raise ReadTimeout(f"bad reply from {where}: {err}") from None
        self.stats.replies += 1
        if reply.isError():
            code = int(getattr(reply, "exception_code", 0) or 0)
            raise ModbusExceptionReply(f"{where}: Modbus exception {code}", code)
        if job.table in ("coil", "discrete"):
            bits = list(reply.bits)
            if len(bits) < job.count:
                raise ReadTimeout(f"{where}: short reply ({len(bits)} bits)")
            return [int(b) for b in bits[: job.count]]
        regs = list(reply.registers)
        if len(regs) != job.count:
            raise ReadTimeout(f"{where}: reply of {len(regs)} registers")
        return regs
