"""The gateway is back on the broker within seconds of its return (issue 15, item 5), on real Mosquitto.

A wait for the broker's answer (CONNACK, PUBACK, SUBACK) ends when the connection is lost, not at its timeout;
reconnect attempts during an outage stay a couple of seconds apart, so the first one after the broker's return
comes soon.
"""

from __future__ import annotations

import asyncio
import math
import signal
from collections.abc import Awaitable

import aiomqtt
import pytest

from edge.mqtt import MqttSettings, aiomqtt_client_kwargs
from gateway.client import CheckedClient
from kwwk.dev.localservers import Mosquitto

pytestmark = pytest.mark.integration

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


# The gateway's reconnect within 2 s of a returned broker (and its attempts every 1-2 s through a 60 s outage) is
# measured in tests/test_gateway_reliability.py::test_broker_outage_of_60s_loses_nothing, on the same outage.
