"""edge.mqtt: one settings type and one client factory for every MQTT client of the product."""

from __future__ import annotations

import asyncio
import ssl
import threading
from pathlib import Path

import aiomqtt
import pytest

from edge.backoff import Backoff
from edge.modbus import Backoff as ModbusBackoff
from edge.mqtt import MqttSettings, aiomqtt_client_kwargs, connect_kwargs, connect_properties, paho_client
from kwwk.dev.localservers import Mosquitto


def test_backoff_has_one_home() -> None:
    assert ModbusBackoff is Backoff


def test_password_never_in_repr() -> None:
    s = MqttSettings(username="gw-1", password="s3cret")
    assert "s3cret" not in repr(s) and "gw-1" in repr(s)


def test_tls_context_only_with_tls() -> None:
    assert MqttSettings().tls_context() is None
    ctx = MqttSettings(tls=True).tls_context()
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    with pytest.raises(OSError):
        MqttSettings(tls=True, ca_file="/nonexistent/ca.crt").tls_context()


def test_client_ids_fixed_or_random_under_a_prefix() -> None:
    assert MqttSettings(client_id="kwwk-collector-1").identifier("x") == "kwwk-collector-1"
    a, b = MqttSettings().identifier("kwwk-api"), MqttSettings().identifier("kwwk-api")
    assert a != b and a.startswith("kwwk-api-") and len(a) == len("kwwk-api-") + 8


def test_session_expiry_decides_clean_start_and_goes_into_connect() -> None:
    temporary, persistent = MqttSettings(), MqttSettings(session_expiry_s=900)
    assert temporary.clean_start and not persistent.clean_start
    props = connect_properties(persistent, ReceiveMaximum=500)
    assert props.SessionExpiryInterval == 900 and props.ReceiveMaximum == 500
    kw = connect_kwargs(persistent)
    assert (kw["host"], kw["port"], kw["keepalive"], kw["clean_start"]) == ("127.0.0.1", 1883, 30, False)
    assert kw["properties"].SessionExpiryInterval == 900


def test_paho_client_takes_every_setting() -> None:
    s = MqttSettings(username="gw-1", password="pw", tls=True, client_id="kwwk-gw-gw-1",
                     reconnect_min_s=0.5, reconnect_max_s=30)
    c = paho_client(s, manual_ack=True)
    assert c._client_id == b"kwwk-gw-gw-1" and c._username == b"gw-1" and c._password == b"pw"  # noqa: SLF001
    assert c._ssl_context is not None and c._manual_ack  # noqa: SLF001
    assert (c._reconnect_min_delay, c._reconnect_max_delay) == (0.5, 30)  # noqa: SLF001
    plain = paho_client(MqttSettings(), client_id_prefix="kwwk-api")
    assert plain._client_id.startswith(b"kwwk-api-") and plain._ssl_context is None  # noqa: SLF001


def test_aiomqtt_kwargs_and_our_backoff() -> None:
    s = MqttSettings(host="broker", port=8883, username="u", password="p", tls=True, session_expiry_s=3600,
                     reconnect_min_s=1.0, reconnect_max_s=30.0)
    kw = aiomqtt_client_kwargs(s, client_id_prefix="kwwk-gw")
    assert (kw["hostname"], kw["port"], kw["username"], kw["password"]) == ("broker", 8883, "u", "p")
    assert kw["protocol"] == aiomqtt.ProtocolVersion.V5 and kw["clean_start"] is False
    assert kw["identifier"].startswith("kwwk-gw-") and isinstance(kw["tls_context"], ssl.SSLContext)
    assert kw["properties"].SessionExpiryInterval == 3600
    b = s.backoff()
    assert (b.base, b.cap) == (1.0, 30.0)
    assert [b.nominal(n) for n in (1, 2, 3, 6, 7)] == [1.0, 2.0, 4.0, 30.0, 30.0]
    assert MqttSettings(reconnect_min_s=2.0, reconnect_max_s=1.0).backoff().cap == 2.0


@pytest.mark.integration
def test_a_persistent_session_is_resumed_on_a_real_broker(tmp_path: Path) -> None:
    """The factory's client, connected with connect_kwargs, gets its session back after a reconnect."""
    s = MqttSettings(client_id="kwwk-test-resume", session_expiry_s=60)
    with Mosquitto(tmp_path / "mosquitto") as broker:
        s = s.replace(port=broker.port)
        for expect_present in (False, True):
            client = paho_client(s)
            connected = threading.Event()
            flags: dict[str, bool] = {}

            def on_connect(_c: object, _u: object, f: object, reason: object, _p: object,
                           flags: dict[str, bool] = flags, connected: threading.Event = connected) -> None:
                flags["present"] = bool(getattr(f, "session_present", False))
                flags["ok"] = not getattr(reason, "is_failure", True)
                connected.set()

            client.on_connect = on_connect
            client.connect(**connect_kwargs(s))
            client.loop_start()
            try:
                assert connected.wait(10)
                assert flags == {"ok": True, "present": expect_present}
            finally:
                client.disconnect()
                client.loop_stop()


async def test_the_uplink_sees_a_cancellation_aiomqtt_swallowed() -> None:
    """aiomqtt 2.5 waits with asyncio.wait_for, which on 3.11 can swallow a cancellation racing its result; the
    uplink checks for one after connecting. 3.11's TaskGroup leaves the count raised after a failed child, so
    only a rise since the connect attempt counts."""
    from gateway.client import cancel_requests as _cancel_requests, raise_if_cancelled as _raise_if_cancelled

    async def fails() -> None:
        raise ValueError

    async def runs() -> None:
        await asyncio.sleep(10)

    async def uplink_like(swallowed: asyncio.Event, go: asyncio.Event) -> str:
        try:
            async with asyncio.TaskGroup() as tg:  # a lost connection: one child fails, the rest are cancelled
                tg.create_task(fails())
                tg.create_task(runs())
        except* ValueError:
            pass
        before = _cancel_requests()
        _raise_if_cancelled(before)  # a leaked count is not a stop
        swallowed.set()
        try:
            await go.wait()
        except asyncio.CancelledError:
            pass  # what wait_for does when the CONNACK and the cancellation arrive together
        _raise_if_cancelled(before)
        return "ran on"

    swallowed, go = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(uplink_like(swallowed, go))
    await swallowed.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
