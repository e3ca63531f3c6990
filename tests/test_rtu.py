"""Modbus RTU on a serial line: a socat pty pair, a pymodbus serial server on one end, the engine on the other."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from edge.modbus import DeviceBackoff, DeviceReader, LineDown, LineRegistry, LineSpec, ModbusLine, ReadTimeout
from edge.sim.image import image_for
from edge.sim.modbus_server import SimServer
from edge.profile import get_profile

pytestmark = pytest.mark.integration  # socat (installed by make) links two pseudo-terminals: see pty_pair

SDM = get_profile("eastron_sdm630")
VALUES = {
    1: {"voltage_l1": 230.0, "voltage_l2": 231.5, "voltage_l3": 229.0, "current_l1": 10.5, "power": 2415.0,
        "frequency": 50.0, "energy_import": 12345.5, "energy_export": 0.25},
    2: {"voltage_l1": 400.0, "voltage_l2": 401.0, "voltage_l3": 399.0, "current_l1": 3.25, "power": -1500.0,
        "frequency": 49.5, "energy_import": 7.0, "energy_export": 99.0},
}


def images() -> dict[int, dict[str, dict[int, int]]]:
    out = {}
    for unit, values in VALUES.items():
        image = {"input": dict.fromkeys(range(76), 0)}  # the whole map answers, like the meter
        out[unit] = image_for(SDM, values, image)
    return out


async def test_two_live_meters_and_a_dead_one_on_one_rtu_bus(pty_pair: tuple[str, str]) -> None:
    server_end, client_end = pty_pair
    server = SimServer(images(), framer="rtu", serial_port=server_end, dead={3})
    async with server:
        spec = LineSpec(kind="rtu", serial_port=client_end, baudrate=115200, timeout=0.2, retries=1,
                        backoff_base=0.6, backoff_max=1.2)
        registry = LineRegistry()
        readers = {u: DeviceReader(registry.get(spec), SDM, u) for u in (1, 2, 3)}
        assert len(registry) == 1  # three devices, one bus, one arbiter
        line = registry.get(spec)
        results: dict[int, list[Any]] = {1: [], 2: [], 3: []}
        slowest = 0.0
        duration = 2.5

        async def poll(unit: int) -> None:
            nonlocal slowest
            end = time.monotonic() + duration
            while time.monotonic() < end:
                t0 = time.monotonic()
                results[unit].append(await readers[unit].read())
                if unit != 3:
                    slowest = max(slowest, time.monotonic() - t0)
                await asyncio.sleep(0.02)  # a poller's pause between reads: time passing is the point

        await asyncio.gather(*(poll(u) for u in (1, 2, 3)))
        stats = line.stats.as_dict()
        await registry.close()

    # the live meters decode their own values on every read
    for unit in (1, 2):
        assert len(results[unit]) >= 10, f"unit {unit} was starved: {len(results[unit])} reads"
        for r in results[unit]:
            assert not r.errors
            for name, want in VALUES[unit].items():
                assert r.values[name] == pytest.approx(want)
            assert r.requests == 3
    # the third is reported as not answering: a timeout, then backoff without touching the bus
    dead = results[3]
    first = dead[0]
    assert not first.values
    assert set(first.errors) == {p.name for p in SDM.points}
    assert all(isinstance(e, ReadTimeout) and e.reason == "timeout" for e in first.errors.values())
    assert any(all(isinstance(e, DeviceBackoff) for e in r.errors.values()) for r in dead[1:])
    # one probe per backoff period (timeout 0.2 s, at least 0.3 s of backoff after each): the first
    # request and its retry, then single probes; the live meters kept being read in between
    probes = len(server.requests_for(3))
    assert 2 <= probes <= 2 + duration / 0.5
    assert slowest < 0.2 + 0.45, f"a live meter waited {slowest:.2f} s"
    live_requests = len(server.requests_for(1)) + len(server.requests_for(2))
    print(f"\nRTU bus: {len(results[1])}+{len(results[2])} live reads, {len(dead)} dead-unit reads, "
          f"{probes} requests to the dead unit, slowest live read {slowest:.3f} s, line {stats}")
    assert live_requests >= 20 * 3 // 2
    # a live meter's reply can miss the 0.2 s timeout on a loaded machine: the line then sends that request
    # once more (retries=1), and counts the timeout; nothing else is ever repeated
    live_timeouts = stats["timeouts"] - probes
    assert 0 <= live_timeouts <= 2, f"live meters timed out {live_timeouts} times"
    assert live_requests == 3 * (len(results[1]) + len(results[2])) + live_timeouts, \
        "three requests per live read, one more only for a retry after a timeout"
    # the line's counters agree with what the server saw: every request sent arrived, all but the
    # dead unit's were answered, on the one connection the arbiter held throughout
    assert stats["requests"] == len(server.seen) == live_requests + probes
    assert stats["replies"] == stats["requests"] - stats["timeouts"] and stats["exceptions"] == 0
    assert stats["connects"] == 1 and stats["disconnects"] == 0
    # every read of the dead unit but the probing ones (the first sends a retry too) is refused off the bus
    assert len(dead) > probes
    assert stats["skipped"] == len(dead) - (probes - 1)


async def test_commissioning_reads_share_the_bus_with_polls(pty_pair: tuple[str, str]) -> None:
    server_end, client_end = pty_pair
    async with SimServer(images(), framer="rtu", serial_port=server_end) as server:
        line = ModbusLine(LineSpec(kind="rtu", serial_port=client_end, baudrate=115200, timeout=0.3))
        poll = asyncio.create_task(DeviceReader(line, SDM, 1).read())
        scan = [asyncio.create_task(line.read(u, "input", 70, 2)) for u in (2, 1)]
        result = await poll
        found = await asyncio.gather(*scan)
        await line.close()
    assert result.values["frequency"] == 50.0
    assert found[0] == [0x4246, 0x0000] and found[1] == [0x4248, 0x0000]  # 49.5 Hz, 50.0 Hz
    # FIFO: the poll's first request, the two scan reads, then the poll's other two requests
    assert [(o.unit_id, o.address) for o in server.seen] == [(1, 0), (2, 70), (1, 70), (1, 52), (1, 70)]


async def test_missing_serial_port_is_line_down_with_backoff(tmp_path: Path) -> None:
    line = ModbusLine(LineSpec(kind="rtu", serial_port=str(tmp_path / "ttyUSB9"), timeout=0.2,
                               reconnect_base=5, reconnect_max=10))
    with pytest.raises(LineDown) as err:
        await line.read(1, "input", 0, 2)
    assert not err.value.sent
    with pytest.raises(LineDown, match="not sent"):
        await line.read(1, "input", 0, 2)
    assert line.stats.connects == 1
    await line.close()
