"""The Modbus engine against real pymodbus servers on loopback: arbiter, backoff, reconnect, split."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from pymodbus.constants import ExcCodes

from edge.modbus import (
    Backoff,
    DeviceBackoff,
    DeviceError,
    DeviceReader,
    LineDown,
    LineRegistry,
    LineSpec,
    ModbusExceptionReply,
    ModbusLine,
    ReadTimeout,
)
from edge.profile import Profile, get_profile
from edge.sim.image import image_for
from edge.sim.modbus_server import SimServer
from edge.sim.ports import reserve_port
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

FAST: dict[str, Any] = {"timeout": 0.15, "retries": 0, "backoff_base": 0.3, "backoff_max": 0.6,
        "reconnect_base": 0.2, "reconnect_max": 0.4}


def make_profile(points: list[dict[str, Any]], **limits: Any) -> Profile:
    return Profile.model_validate({
        "id": "test_device", "manufacturer": "Test", "model": "T1", "device_class": "sensor",
        "source": {"document": "made up for a test"}, "addressing": "raw", "limits": limits, "points": points,
    })


def golden_image(profile: Profile) -> tuple[dict[str, dict[int, int]], dict[str, Any]]:
    """All golden vectors of a profile in one image, and the values they decode to."""
    from edge.profile import wire_address

    image: dict[str, dict[int, int]] = {}
    expect: dict[str, Any] = {}
    for g in profile.golden:
        for table, regs in g.registers.items():
            for addr, words in regs.items():
                w = wire_address(addr, table, profile.addressing)
                for k, word in enumerate(words):
                    image.setdefault(table, {})[w + k] = word
        expect.update(g.expect)
    return image, expect


# A device whose map has holes: registers 0..3, 4..5 and 20..23 exist, 6..19 do not.
HOLEY_POINTS = [
    {"name": "a", "register": "holding", "address": 0, "type": "f32"},
    {"name": "b", "register": "holding", "address": 2, "type": "u16"},
    {"name": "c", "register": "holding", "address": 3, "type": "s16"},
    {"name": "d", "register": "holding", "address": 4, "type": "u32"},
    {"name": "e", "register": "holding", "address": 20, "type": "f32"},
    {"name": "f", "register": "holding", "address": 22, "type": "u16", "scale": 0.1},
    {"name": "g", "register": "holding", "address": 23, "type": "s16"},
]
HOLEY_VALUES = {"a": 1.5, "b": 7, "c": -3, "d": 70000, "e": -2.25, "f": 12.3, "g": 42}


# ---------------------------------------------------------------- plain reads


async def test_reads_a_profile_over_tcp_and_decodes_the_golden_values() -> None:
    prof = get_profile("eastron_sdm630")
    image, expect = golden_image(prof)
    async with SimServer({1: image}) as server:
        line = ModbusLine(server.spec(timeout=1.0))
        try:
            reader = DeviceReader(line, prof, 1)
            result = await reader.read()
        finally:
            await line.close()
    assert not result.errors
    for name, value in expect.items():
        assert result.values[name] == pytest.approx(value)
    assert result.requests == len(reader.plan_for(prof.points)) == 3
    assert [(o.table, o.address, o.count) for o in server.seen] == [("input", 0, 18), ("input", 52, 2), ("input", 70, 6)]


async def test_reads_selected_points_by_name() -> None:
    prof = get_profile("eastron_sdm630")
    image, _ = golden_image(prof)
    async with SimServer({1: image}) as server:
        line = ModbusLine(server.spec())
        result = await DeviceReader(line, prof, 1).read(["frequency", "voltage_l1"])
        await line.close()
    assert result.values == {"frequency": 50.0, "voltage_l1": 230.0}
    assert result.requests == 2


async def test_coils_and_discrete_inputs() -> None:
    prof = make_profile([
        {"name": "relay1", "register": "coil", "address": 0, "type": "u16"},
        {"name": "relay2", "register": "coil", "address": 1, "type": "u16"},
        {"name": "relay9", "register": "coil", "address": 9, "type": "u16"},
        {"name": "alarm", "register": "discrete", "address": 3, "type": "u16"},
    ])
    image = {"coil": {0: 1, 1: 0, 9: 1}, "discrete": {3: 1}}
    async with SimServer({1: image}) as server:
        line = ModbusLine(server.spec())
        result = await DeviceReader(line, prof, 1).read()
        assert await line.read(1, "coil", 0, 10) == [1, 0, 0, 0, 0, 0, 0, 0, 0, 1]
        await line.close()
    assert result.values == {"relay1": 1.0, "relay2": 0.0, "relay9": 1.0, "alarm": 1.0}
    assert result.requests == 2  # one per table, the coils in one request of 10 bits


async def test_rtu_over_tcp_framing() -> None:
    prof = make_profile(HOLEY_POINTS)
    image = image_for(prof, HOLEY_VALUES)
    async with SimServer({7: image}, framer="rtu") as server:
        spec = server.spec(timeout=0.3)
        assert spec.kind == "rtu_over_tcp"
        line = ModbusLine(spec)
        result = await DeviceReader(line, prof, 7).read()
        await line.close()
        # the same server does not understand Modbus TCP (MBAP) framing
        tcp = ModbusLine(LineSpec(kind="tcp", host=server.host, port=server.port, timeout=0.3, retries=0))
        with pytest.raises(DeviceError):
            await tcp.read(7, "holding", 0, 2)
        await tcp.close()
    assert result.values == pytest.approx(HOLEY_VALUES)


async def test_request_arguments_are_checked() -> None:
    line = ModbusLine(LineSpec(kind="tcp", host="127.0.0.1", port=reserve_port()))
    for args in [(1, "holding", 0, 126), (1, "holding", 0, 0), (1, "coil", 0, 2001), (1, "bogus", 0, 1),
                 (1, "holding", 65535, 2), (256, "holding", 0, 1)]:
        with pytest.raises(ValueError):
            await line.read(*args)
    await line.close()


# ---------------------------------------------------------------- split and remember


async def test_device_rejecting_a_merged_request_gets_split_and_it_is_remembered() -> None:
    prof = make_profile(HOLEY_POINTS, max_gap=20)
    image = image_for(prof, HOLEY_VALUES)
    async with SimServer({1: image}, holes=True) as server:
        line = ModbusLine(server.spec(timeout=0.5))
        reader = DeviceReader(line, prof, 1)
        assert len(reader.plan_for(prof.points)) == 1  # the planner merges 0..23 over the hole
        first = await reader.read()
        assert first.values == pytest.approx(HOLEY_VALUES)
        assert not first.errors
        assert first.rejected >= 1
        assert (1, 2) in server.exceptions  # the device did answer exception 2 to the merged request
        assert reader.breaks

        exceptions_before, seen_before = len(server.exceptions), len(server.seen)
        second = await reader.read()
        await line.close()
    assert second.values == pytest.approx(HOLEY_VALUES)
    assert not second.errors
    assert second.rejected == 0
    assert len(server.exceptions) == exceptions_before  # no exception the second time
    plan = reader.plan_for(prof.points)
    assert second.requests == len(plan) == len(server.seen) - seen_before
    assert len(plan) == 2  # 0..5 and 20..23: the split plan is as merged as the device allows
    assert [(o.address, o.count) for o in server.seen[seen_before:]] == [(0, 6), (20, 4)]


async def test_a_point_the_device_lacks_is_an_error_for_that_point_only() -> None:
    prof = make_profile([*HOLEY_POINTS, {"name": "h", "register": "holding", "address": 10, "type": "u16"}],
                        max_gap=20)
    image = image_for(prof, HOLEY_VALUES)  # no value for h: register 10 does not exist
    async with SimServer({1: image}, holes=True) as server:
        line = ModbusLine(server.spec(timeout=0.5))
        reader = DeviceReader(line, prof, 1)
        result = await reader.read()
        again = await reader.read()
        await line.close()
    for r in (result, again):
        assert set(r.errors) == {"h"}
        assert isinstance(r.errors["h"], ModbusExceptionReply) and r.errors["h"].code == 2
        assert r.values == pytest.approx(HOLEY_VALUES)
    assert again.rejected == 0
    assert again.requests == 3  # 0..5, 10 (fails alone), 20..23


async def test_device_failure_everywhere_is_not_learnt_as_breaks() -> None:
    prof = make_profile(HOLEY_POINTS, max_gap=20)

    async def broken(*_: Any) -> ExcCodes:
        return ExcCodes.DEVICE_FAILURE

    async with SimServer({1: image_for(prof, HOLEY_VALUES)}, actions={1: broken}) as server:
        line = ModbusLine(server.spec(timeout=0.5))
        reader = DeviceReader(line, prof, 1)
        result = await reader.read()
        await line.close()
    assert set(result.errors) == set(HOLEY_VALUES)
    assert all(isinstance(e, ModbusExceptionReply) and e.code == 4 for e in result.errors.values())
    assert reader.breaks == frozenset()  # nothing succeeded: a sick device, not a merge it dislikes
    assert line.failures(1) == 0  # but it answers: no backoff


async def test_missing_scale_factor_makes_the_point_an_error_not_a_wrong_value() -> None:
    prof = make_profile([
        {"name": "w", "register": "holding", "address": 0, "type": "s16", "scale_register": "w_sf"},
        {"name": "w_sf", "register": "holding", "address": 5, "type": "s16", "publish": False},
    ], max_gap=0)
    async with SimServer({1: {"holding": {0: 123}}}, holes=True) as server:  # 5 does not exist
        line = ModbusLine(server.spec(timeout=0.5))
        result = await DeviceReader(line, prof, 1).read(["w"])
        await line.close()
    assert "w" not in result.values
    assert isinstance(result.errors["w"], ModbusExceptionReply)


# ---------------------------------------------------------------- arbiter


async def test_one_request_in_flight_and_fifo_between_devices_and_commissioning() -> None:
    in_flight = 0
    most = 0

    async def slow(*_: Any) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.005)  # a slow device: the reply takes time, which is what overlapping requests would show
        in_flight -= 1

    units = {u: {"holding": {i: u * 100 + i for i in range(10)}} for u in (1, 2, 3)}
    async with SimServer(units, actions=dict.fromkeys(units, slow)) as server:
        registry = LineRegistry()
        spec = server.spec(timeout=1.0)
        line = registry.get(spec)
        assert registry.get(server.spec(timeout=1.0)) is line
        order = [(u, a) for a in range(10) for u in (1, 2, 3)]
        tasks = [asyncio.create_task(line.read(u, "holding", a, 1)) for u, a in order]
        results = await asyncio.gather(*tasks)
        await registry.close()
    assert most == 1
    assert [r[0] for r in results] == [u * 100 + a for u, a in order]
    # served in the order asked for, whatever the device
    assert [(o.unit_id, o.address) for o in server.seen] == order


async def test_a_read_cancelled_while_queued_is_never_sent() -> None:
    async def slow(*_: Any) -> None:
        await asyncio.sleep(0.05)  # a slow device: the first read is still in flight while the second waits its turn

    async with SimServer({1: {"holding": {0: 1, 1: 2}}}, actions={1: slow}) as server:
        line = ModbusLine(server.spec(timeout=1.0))
        first = asyncio.create_task(line.read(1, "holding", 0, 1))
        second = asyncio.create_task(line.read(1, "holding", 1, 1))
        await wait_for(lambda: line.pending == 1, 5, "the first read on the wire, the second queued", 0.001)
        second.cancel()
        assert await first == [1]
        with pytest.raises(asyncio.CancelledError):
            await second
        assert await line.read(1, "holding", 1, 1) == [2]
        await line.close()
    assert [o.address for o in server.seen] == [0, 1]


async def test_close_fails_queued_reads() -> None:
    async def slow(*_: Any) -> None:
        # a device slow enough that its reply cannot arrive before the close, even on a loaded machine:
        # one read stays on the wire and two stay queued behind it while the line closes
        await asyncio.sleep(2.0)

    async with SimServer({1: {"holding": {0: 1}}}, actions={1: slow}) as server:
        line = ModbusLine(server.spec(timeout=5.0))
        tasks = [asyncio.create_task(line.read(1, "holding", 0, 1)) for _ in range(3)]
        await wait_for(lambda: line.pending == 2, 5, "one read on the wire, two queued", 0.001)
        await line.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, LineDown) for r in results)
        assert await line.read(1, "holding", 0, 1) == [1]  # a closed line opens again on demand
        await line.close()


# ---------------------------------------------------------------- dead devices


async def test_dead_unit_on_a_shared_bus_backs_off_and_never_starves_the_live_ones() -> None:
    prof = make_profile(HOLEY_POINTS)
    images = {u: image_for(prof, {k: v * u if k != "d" else v for k, v in HOLEY_VALUES.items()}) for u in (1, 2, 3)}
    async with SimServer(images, dead={3}) as server:
        registry = LineRegistry()
        readers = {u: DeviceReader(registry.get(server.spec(**FAST)), prof, u) for u in (1, 2, 3)}
        assert len(registry) == 1
        line = registry.get(server.spec(**FAST))
        reads: dict[int, list[Any]] = {1: [], 2: [], 3: []}
        slowest = 0.0
        duration = 2.0

        async def poll(unit: int) -> None:
            nonlocal slowest
            end = time.monotonic() + duration
            while time.monotonic() < end:
                t0 = time.monotonic()
                reads[unit].append(await readers[unit].read())
                if unit != 3:
                    slowest = max(slowest, time.monotonic() - t0)
                await asyncio.sleep(0.01)  # poll pacing, as a gateway's poller spaces its reads

        await asyncio.gather(*(poll(u) for u in (1, 2, 3)))
        await registry.close()

    for u in (1, 2):
        assert len(reads[u]) > 30, f"unit {u} starved: {len(reads[u])} reads"
        assert all(not r.errors for r in reads[u])
        assert reads[u][-1].values["g"] == 42 * u
    dead_reads = reads[3]
    assert all(set(r.errors) == set(HOLEY_VALUES) and not r.values for r in dead_reads)
    assert isinstance(dead_reads[0].errors["a"], ReadTimeout)
    assert dead_reads[0].errors["a"].reason == "timeout"
    assert any(isinstance(r.errors["a"], DeviceBackoff) for r in dead_reads)
    # each probe of the dead unit costs one timeout (0.15 s) and is followed by at least half the
    # backoff base (0.15 s) of silence: at most duration / 0.3 + 1 probes, one request each
    probes = len(server.requests_for(3))
    assert 2 <= probes <= duration / 0.3 + 1
    # a live device never waits for more than one dead-device timeout plus its own request
    assert slowest < FAST["timeout"] + 0.25
    assert line.stats.timeouts == probes


async def test_backoff_grows_and_recovers() -> None:
    async with SimServer({1: {"holding": {0: 5}}}, dead={1}) as server:
        line = ModbusLine(server.spec(timeout=0.1, retries=2, backoff_base=0.2, backoff_max=0.8))
        with pytest.raises(ReadTimeout) as err:
            await line.read(1, "holding", 0, 1)
        assert type(err.value) is ReadTimeout
        assert len(server.seen) == 3  # a healthy device gets its retries
        assert line.failures(1) == 1
        with pytest.raises(DeviceBackoff):
            await line.read(1, "holding", 0, 1)
        assert len(server.seen) == 3  # not sent
        await wait_for(lambda: line.backoff_remaining(1) == 0, 5, "the backoff over", 0.01)
        with pytest.raises(ReadTimeout):
            await line.read(1, "holding", 0, 1)
        assert len(server.seen) == 4  # a backing-off device is probed once, without retries
        assert line.failures(1) == 2
        assert 0.1 <= line.backoff_remaining(1) <= 0.4
        # a commissioning probe may go around the backoff
        server.dead.clear()
        assert await line.read(1, "holding", 0, 1, ignore_backoff=True) == [5]
        assert line.failures(1) == 0
        assert await line.read(1, "holding", 0, 1) == [5]
        await line.close()


async def test_gateway_exception_11_counts_as_a_silent_device() -> None:
    async def no_response(*_: Any) -> ExcCodes:
        return ExcCodes.GATEWAY_NO_RESPONSE

    async with SimServer({4: {"holding": {0: 1}}}, actions={4: no_response}) as server:
        line = ModbusLine(server.spec(timeout=0.5, retries=3, backoff_base=5))
        with pytest.raises(ReadTimeout):
            await line.read(4, "holding", 0, 1)
        assert len(server.seen) == 1  # the gateway already waited: no retries
        with pytest.raises(DeviceBackoff):
            await line.read(4, "holding", 0, 1)
        await line.close()


async def test_dead_device_costs_one_timeout_per_read_not_one_per_request() -> None:
    prof = get_profile("eastron_sdm630")
    async with SimServer({1: {"input": dict.fromkeys(range(80), 0)}}, dead={1}) as server:
        line = ModbusLine(server.spec(timeout=0.1, retries=1, backoff_base=10))
        result = await DeviceReader(line, prof, 1).read()
        await line.close()
    assert len(server.seen) == 2  # the first request and its one retry; the other two never sent
    assert result.requests == 1
    assert all(isinstance(e, ReadTimeout) for e in result.errors.values())
    assert len(result.errors) == len(prof.points)


async def test_timeouts_in_a_row_reopen_a_tcp_connection() -> None:
    async with SimServer({1: {"holding": {0: 1}}, 2: {"holding": {0: 2}}}, dead={2}) as server:
        line = ModbusLine(server.spec(timeout=0.05, retries=0))
        assert await line.read(1, "holding", 0, 1) == [1]
        for _ in range(3):
            with pytest.raises(ReadTimeout):
                await line.read(2, "holding", 0, 1, ignore_backoff=True)
        assert line.stats.disconnects == 1
        assert await line.read(1, "holding", 0, 1) == [1]
        assert line.stats.connects == 2
        await line.close()


# ---------------------------------------------------------------- connections


async def test_reconnects_after_the_device_drops_the_connection() -> None:
    async with SimServer({1: {"holding": {0: 11, 1: 12}}}) as server:
        line = ModbusLine(server.spec(timeout=0.5))
        assert await line.read(1, "holding", 0, 2) == [11, 12]
        assert server.drop_connections() == 1
        await wait_for(lambda: not line.connected, 5, "the line to notice the dropped connection", 0.005)
        assert await line.read(1, "holding", 0, 2) == [11, 12]
        assert line.stats.connects == 2
        await line.close()


async def test_connection_dropped_under_a_request_is_reopened_and_the_request_sent_again() -> None:
    dropped = False
    server: SimServer

    async def drop_once(*_: Any) -> None:
        nonlocal dropped
        if not dropped:
            dropped = True
            server.drop_connections()  # the reply to this request is lost with the connection

    server = SimServer({1: {"holding": {0: 11}}}, actions={1: drop_once})
    async with server:
        line = ModbusLine(server.spec(timeout=2.0))
        t0 = time.monotonic()
        assert await line.read(1, "holding", 0, 1) == [11]
        assert time.monotonic() - t0 < 1.0  # the loss was noticed at once, not after the timeout
        assert line.stats.connects == 2
        assert len(server.seen) == 2
        await line.close()


async def test_line_down_backs_off_and_comes_back() -> None:
    port = reserve_port()
    line = ModbusLine(LineSpec(kind="tcp", host="127.0.0.1", port=port, **FAST))
    with pytest.raises(LineDown) as err:
        await line.read(1, "holding", 0, 1)
    assert err.value.reason == "connection" and not err.value.sent
    assert line.stats.connects == 1
    with pytest.raises(LineDown, match="not sent"):
        await line.read(1, "holding", 0, 1)
    assert line.stats.connects == 1  # no new attempt while the line backs off
    async def answer() -> list[int] | None:
        try:
            return await line.read(1, "holding", 0, 1)
        except LineDown:
            return None  # still backing off: refused without a connection attempt

    async with SimServer({1: {"holding": {0: 9}}}, port=port):
        assert await wait_for(answer, 5, "the line to come back", 0.02) == [9]
        assert line.stats.connects == 2
    # the server went away: the next read finds the connection gone and reports the line down
    await wait_for(lambda: not line.connected, 5, "the line to notice the server gone", 0.005)
    with pytest.raises(LineDown):
        await line.read(1, "holding", 0, 1)
    await line.close()


async def test_device_reader_reports_line_down_for_every_point() -> None:
    prof = get_profile("eastron_sdm630")
    line = ModbusLine(LineSpec(kind="tcp", host="127.0.0.1", port=reserve_port(), **FAST))
    result = await DeviceReader(line, prof, 1).read()
    await line.close()
    assert set(result.errors) == {p.name for p in prof.points}
    assert all(isinstance(e, LineDown) for e in result.errors.values())
    assert result.requests == 0


# ---------------------------------------------------------------- registry, spec, backoff


def test_registry_shares_a_line_per_physical_line(tmp_path: Path) -> None:
    reg = LineRegistry()
    a = reg.get(LineSpec(kind="tcp", host="Gateway.local", port=502))
    assert reg.get(LineSpec(kind="tcp", host="gateway.local")) is a  # port 502 by default, host case-blind
    assert reg.get(LineSpec(kind="tcp", host="gateway.local", port=503)) is not a
    assert reg.get(LineSpec(kind="rtu_over_tcp", host="gateway.local", port=502)) is not a
    dev = tmp_path / "ttyUSB0"
    dev.touch()
    link = tmp_path / "by-id-usb-FTDI"
    os.symlink(dev, link)
    bus = reg.get(LineSpec(kind="rtu", serial_port=str(dev), baudrate=9600))
    assert reg.get(LineSpec(kind="rtu", serial_port=str(link), baudrate=9600, timeout=3)) is bus
    with pytest.raises(ValueError, match="baudrate"):
        reg.get(LineSpec(kind="rtu", serial_port=str(link), baudrate=19200))
    assert len(reg) == 4


def test_line_spec_is_checked() -> None:
    with pytest.raises(ValueError):
        LineSpec(kind="rtu")
    with pytest.raises(ValueError):
        LineSpec(kind="tcp", host="x", timeout=0)
    with pytest.raises(ValueError):
        LineSpec(kind="udp", host="x")  # type: ignore[arg-type]


def test_backoff_is_jittered_exponential_and_capped() -> None:
    now = [100.0]
    b = Backoff(1.0, 8.0, clock=lambda: now[0], rng=random.Random(1))
    assert not b.blocked
    delays = [b.failure() for _ in range(8)]
    for n, d in enumerate(delays, start=1):
        nominal = min(8.0, 2.0 ** (n - 1))
        assert nominal / 2 <= d <= nominal
    assert max(delays) <= 8.0
    assert b.blocked and b.remaining == pytest.approx(delays[-1])
    now[0] += delays[-1]
    assert not b.blocked
    b.success()
    assert b.failures == 0 and b.nominal(1) == 1.0
    # jitter spreads devices that died together
    spread = {round(Backoff(1.0, 8.0, clock=lambda: 0.0).failure(), 6) for _ in range(20)}
    assert len(spread) > 10


def test_a_line_outlives_its_event_loop() -> None:
    port = reserve_port()
    line = ModbusLine(LineSpec(kind="tcp", host="127.0.0.1", port=port, timeout=0.5))

    async def once(value: int) -> list[int]:
        async with SimServer({1: {"holding": {0: value}}}, port=port):
            return await line.read(1, "holding", 0, 1)

    assert asyncio.run(once(1)) == [1]  # the line is not closed: its client belongs to a dead loop
    assert asyncio.run(once(2)) == [2]
    asyncio.run(line.close())
