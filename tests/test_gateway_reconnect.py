"""The gateway is back on the broker within seconds of its return (issue 15, item 5), on real Mosquitto.

A wait for the broker's answer (CONNACK, PUBACK, SUBACK) ends when the connection is lost, not at its timeout;
reconnect attempts during an outage stay a couple of seconds apart, so the first one after the broker's return
comes soon.
"""

from __future__ import annotations

import asyncio
import math
import signal
import time
import urllib.request
from collections.abc import Awaitable
from pathlib import Path

import aiomqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge.cell import load_cell
from edge.mqtt import MqttSettings, aiomqtt_client_kwargs
from gateway.client import CheckedClient
from gateway.service import GatewayService
from gateway.settings import gateway_mqtt
from kwwk.dev.localservers import Mosquitto
from tests.conftest import ROOT, start_simulator
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

OUTAGE_S = 60
#: a bound on a test's own wait, far above any answer: reaching it means the wait never ended
NEVER_S = 60


def _client(port: int) -> CheckedClient:
    """A client that would wait for an answer forever: only the lost connection can end its waits."""
    return CheckedClient(**aiomqtt_client_kwargs(MqttSettings(port=port), client_id_prefix="kwwk-test"),
                         timeout=math.inf)


async def _fails_when_the_broker_dies(broker: Mosquitto, waiting: Awaitable[object]) -> None:
    """Start `waiting` on a frozen broker (SIGSTOP: the kernel still takes our bytes, nobody answers), kill the
    broker (its sockets close), and check the wait ends with an MqttError (the client's timeout is infinite)."""
    task = asyncio.ensure_future(waiting)
    await asyncio.sleep(0.5)
    assert not task.done(), "a frozen broker answered"
    broker.kill()
    try:
        async with asyncio.timeout(NEVER_S):
            with pytest.raises(aiomqtt.MqttError):
                await task
    except TimeoutError:
        pytest.fail("the wait for the broker's answer went on after the broker was gone")


@pytest.mark.parametrize("call", ["publish_acked", "subscribe_acked"])
async def test_a_wait_for_the_brokers_ack_fails_when_the_connection_is_lost(mosquitto: Mosquitto, call: str) -> None:
    async with _client(mosquitto.port) as client:
        assert mosquitto.proc is not None
        mosquitto.proc.send_signal(signal.SIGSTOP)
        waiting = (client.publish_acked("kwwk/test/reconnect", b"x" * 1000) if call == "publish_acked"
                   else client.subscribe_acked("kwwk/test/reconnect"))
        await _fails_when_the_broker_dies(mosquitto, waiting)


async def test_a_connect_fails_when_the_broker_dies_before_its_connack(mosquitto: Mosquitto) -> None:
    """The broker accepted the TCP connection (its listen queue did) but dies before it answers CONNECT."""
    assert mosquitto.proc is not None
    mosquitto.proc.send_signal(signal.SIGSTOP)
    client = _client(mosquitto.port)

    async def connect() -> None:
        async with client:
            pass

    await _fails_when_the_broker_dies(mosquitto, connect())


async def _more(value: Awaitable[float], than: float) -> bool:
    return await value > than


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:  # noqa: S310 - loopback
        return r.read().decode()


async def _counter(port: int, name: str, **labels: str) -> float:
    """A counter's value read from the gateway's /metrics (0 when not exported yet); the request runs in a
    thread, since the gateway serves it from this event loop."""
    text = await asyncio.to_thread(_scrape, port)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def test_the_gateway_keeps_trying_every_couple_of_seconds_and_is_back_soon_after_the_broker(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """A 60 s outage: attempts stay at most ~2 s apart throughout (the backoff's cap), so the gateway is
    connected and publishing again soon after the broker's return. The figure is printed, not asserted."""
    sim, cell = await start_simulator(ROOT / "tests/data/tinycell.yaml", tmp_path / "cells")
    gw = GatewayService(load_cell(cell), "gw-tiny", gateway_mqtt(port=mosquitto.port), tmp_path / "outbox.sqlite")
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))

    async def failed() -> float:
        return await _counter(gw.health.port, "kwwk_gateway_broker_connects_total", result="failed")

    async def published() -> float:
        return await _counter(gw.health.port, "kwwk_gateway_published_batches_total")

    try:
        await wait_for(lambda: gw.uplink.connected, 20, "the gateway to connect", interval=0.02)
        await wait_for(lambda: gw.uplink.last_puback is not None, 20, "the gateway publishing", interval=0.02)
        await asyncio.to_thread(mosquitto.stop)  # in a thread: the gateway's loop runs on meanwhile
        await wait_for(lambda: not gw.uplink.connected, 10, "the gateway to notice the broker is gone", interval=0.02)
        failed_before = await failed()
        await asyncio.sleep(OUTAGE_S)  # the outage itself: time has to pass
        failed_during = await failed() - failed_before
        published_before = await published()
        await asyncio.to_thread(mosquitto.start)
        back, back_wall = time.monotonic(), time.time()
        await wait_for(lambda: gw.uplink.connected, 30, "the gateway to reconnect", interval=0.01)
        connected_after = time.monotonic() - back
        await wait_for(lambda: (gw.uplink.last_puback or 0) > back_wall, 30, "a PUBACK after the reconnect",
                       interval=0.01)
        puback_after = time.monotonic() - back
        await wait_for(lambda: _more(published(), published_before), 30, "/metrics to count a publish after it")
    finally:
        stop.set()
        await task
        await sim.stop()
    print(f"\nbroker back after {OUTAGE_S}s: connected {connected_after:.2f}s later, first PUBACK "
          f"{puback_after:.2f}s later; {failed_during:.0f} failed attempts during the outage")
    # a cap of 2 s with equal jitter means an attempt every 1-2 s: at least OUTAGE_S / 2 / 2 of them
    assert failed_during >= OUTAGE_S / 2 / 2, f"only {failed_during:.0f} attempts in {OUTAGE_S}s: the cap is above 2 s"
