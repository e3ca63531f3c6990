"""`kwwk broker acl`: Mosquitto's password file and ACL from the cell registry, checked against the real
mosquitto_passwd and a real Mosquitto, and end to end through the real collector into InfluxDB."""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edge.cell import load_cells
from edge.messages import TIME_TOPIC
from edge.mqtt import MqttSettings, connect_kwargs, paho_client
from edge.telemetry import (
    Reading,
    TelemetryBatch,
    deadletter_topic,
    polls,
    resend_topic,
    status_topic,
    telemetry_topic,
)
from kwwk.deploy.broker import (
    accounts,
    hash_password,
    parse_password_file,
    render_acl,
    verify_password,
    write_broker_files,
)
from kwwk.cli import app
from kwwk.dev.localservers import InfluxDB1, Mosquitto

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")


def write_cells(folder: Path, gateways: dict[str, list[str]]) -> Path:
    """One cell file per cell: {cell: [gateway ids]}, each gateway with one meter 'grid-<gateway>'."""
    folder.mkdir(parents=True, exist_ok=True)
    for cell, gws in gateways.items():
        lines = [f"cell: {{id: {cell}, name: {cell.title()}}}", "gateways:"]
        for gw in gws:
            lines += [f"  - id: {gw}", "    devices:",
                      f"      - {{id: grid-{gw}, profile: eastron_sdm630, connection: {{host: 127.0.0.1, port: 502}}}}"]
        (folder / f"{cell}.yaml").write_text("\n".join(lines) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------- hashes

def test_hash_is_mosquitto_format_and_verifies() -> None:
    h = hash_password("s3cret", salt=b"\x01" * 12, iterations=101)
    assert re.fullmatch(r"\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==", h)
    assert base64.b64decode(h.split("$")[3]) == b"\x01" * 12
    assert verify_password("s3cret", h)
    assert not verify_password("s3cret ", h)
    assert not verify_password("s3cret", "$7$101$notbase64!$xx")
    assert hash_password("s3cret") != hash_password("s3cret")  # a fresh salt each time


def test_hashes_written_by_mosquitto_passwd_verify(tmp_path: Path) -> None:
    """Our reading of the $7$ format agrees with the real tool: -b writes one, -U converts a plain file."""
    pw = tmp_path / "passwd"
    subprocess.run([MOSQUITTO_PASSWD, "-c", "-b", str(pw), "alice", "wonder-land"], check=True)
    plain = tmp_path / "plain"
    plain.write_text("bob:can-we-fix-it\n")  # -U stops at a second ":"; ours never contain one
    subprocess.run([MOSQUITTO_PASSWD, "-U", str(plain)], check=True)
    alice = parse_password_file(pw.read_text())["alice"].split(":", 1)[1]
    bob = parse_password_file(plain.read_text())["bob"].split(":", 1)[1]
    assert alice.startswith("$7$") and bob.startswith("$7$")
    assert verify_password("wonder-land", alice) and not verify_password("wonder-lan", alice)
    assert verify_password("can-we-fix-it", bob)


# ---------------------------------------------------------------------------------------------- files

def test_acl_grants_each_gateway_only_its_own_tree(tmp_path: Path) -> None:
    cells = load_cells(write_cells(tmp_path / "cells", {"alpha": ["gw-a"], "beta": ["gw-b"]}))
    text = render_acl(accounts(cells))
    blocks = {b.split("\n")[1].removeprefix("user "): b for b in text.split("\n\n") if "\nuser " in b}
    gw_a = [ln for ln in blocks["gw-a"].splitlines() if ln.startswith("topic")]
    assert gw_a == [f"topic write {telemetry_topic('alpha', 'gw-a')}", f"topic write {status_topic('alpha', 'gw-a')}",
                    f"topic read {resend_topic('alpha', 'gw-a')}", f"topic read {TIME_TOPIC}"]
    collector = [ln for ln in blocks["collector"].splitlines() if ln.startswith("topic")]
    assert "topic read #" in collector
    assert "topic write kwwk/v1/+/+/resend" in collector and "topic write kwwk/v1/_deadletter/#" in collector
    # nothing is granted before the first user line (that would apply to anonymous clients)
    first_user = text.index("\nuser ")
    assert "topic" not in text[:first_user]


def test_usernames_must_be_unique(tmp_path: Path) -> None:
    cells = load_cells(write_cells(tmp_path / "cells", {"alpha": ["gw-1"], "beta": ["gw-1"]}))
    with pytest.raises(ValueError, match="MQTT username 'gw-1' is used by gateway gw-1 of cell alpha"):
        accounts(cells)


def test_rerun_keeps_passwords_and_new_gateways_get_new_ones(tmp_path: Path) -> None:
    cells_dir = write_cells(tmp_path / "cells", {"alpha": ["gw-a"], "beta": ["gw-b"]})
    out, secrets = tmp_path / "broker", tmp_path / "secrets"
    first = write_broker_files(load_cells(cells_dir), out, secrets)
    assert sorted(first.created) == ["api", "collector", "gw-a", "gw-b"]
    passwd_1, acl_1 = (out / "passwd").read_text(), (out / "acl").read_text()
    secret_a = (secrets / "gw-a.password").read_text()
    for path in (out / "passwd", secrets / "gw-a.password", secrets / "collector.password"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert len(secret_a.strip()) == 32
    assert verify_password(secret_a.strip(), parse_password_file(passwd_1)["gw-a"].split(":", 1)[1])

    again = write_broker_files(load_cells(cells_dir), out, secrets)  # idempotent: nothing changes at all
    assert sorted(again.kept) == ["api", "collector", "gw-a", "gw-b"] and not again.changed
    assert (out / "passwd").read_text() == passwd_1 and (out / "acl").read_text() == acl_1
    assert (secrets / "gw-a.password").read_text() == secret_a

    write_cells(cells_dir, {"beta": ["gw-b", "gw-c"]})  # a new gateway in cell beta
    grown = write_broker_files(load_cells(cells_dir), out, secrets)
    assert grown.created == ["gw-c"] and sorted(grown.kept) == ["api", "collector", "gw-a", "gw-b"]
    old, new = parse_password_file(passwd_1), parse_password_file((out / "passwd").read_text())
    assert all(new[u] == old[u] for u in ("gw-a", "gw-b", "collector"))  # byte for byte
    assert "user gw-c" in (out / "acl").read_text()

    (cells_dir / "alpha.yaml").unlink()  # gw-a decommissioned: it can no longer log in
    (secrets / "gw-b.password").unlink()  # a lost secret file: the device keeps working, the tool says so
    shrunk = write_broker_files(load_cells(cells_dir), out, secrets, rotate=["gw-c"])
    assert shrunk.removed == ["gw-a"] and "gw-a" not in parse_password_file((out / "passwd").read_text())
    assert shrunk.kept_without_secret == ["gw-b"]
    assert parse_password_file((out / "passwd").read_text())["gw-b"] == old["gw-b"]
    assert shrunk.rotated == ["gw-c"] and parse_password_file((out / "passwd").read_text())["gw-c"] != new["gw-c"]


def test_cli_writes_the_files_and_reports(tmp_path: Path) -> None:
    cells_dir = write_cells(tmp_path / "cells", {"alpha": ["gw-a"]})
    args = ["broker", "acl", "--cells", str(cells_dir), "--out", str(tmp_path / "b"), "--secrets", str(tmp_path / "s"),
            "--collector", "collector", "--collector", "collector-2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "gw-a: new password" in result.output and "collector-2: new password" in result.output
    assert "reload Mosquitto" in result.output
    result = CliRunner().invoke(app, args)
    assert "gw-a: kept" in result.output and "reload" not in result.output
    bad = CliRunner().invoke(app, [*args, "--rotate", "nobody"])
    assert bad.exit_code == 2 and "no such account" in bad.output


# ---------------------------------------------------------------------------------------------- real Mosquitto

class Client:
    """A paho MQTT v5 client (edge.mqtt's factory) that records CONNACK, PUBACK reason codes and received messages."""

    def __init__(self, port: int, username: str | None, password: str | None, client_id: str) -> None:
        self.connack: Any = None
        self.acks: dict[int, int] = {}
        self.messages: list[tuple[str, bytes]] = []
        self._connected = threading.Event()
        self._lock = threading.Condition()
        settings = MqttSettings(port=port, username=username, password=password, client_id=client_id)
        self.c = paho_client(settings)
        self.c.on_connect = self._on_connect
        self.c.on_publish = self._on_publish
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.c.connect(**connect_kwargs(settings))
        self.c.loop_start()
        assert self._connected.wait(5), "no CONNACK"

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connack = reason
        self._connected.set()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self._lock:
            self.acks[mid] = int(reason.value)
            self._lock.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, _reasons: Any, _p: Any) -> None:
        with self._lock:
            self.acks[mid] = 0
            self._lock.notify_all()

    def _on_message(self, _c: Any, _u: Any, m: Any) -> None:
        with self._lock:
            self.messages.append((m.topic, bytes(m.payload)))
            self._lock.notify_all()

    def publish(self, topic: str, payload: bytes = b"x") -> int:
        """Publish QoS 1; return the PUBACK reason code."""
        info = self.c.publish(topic, payload, qos=1)
        with self._lock:
            assert self._lock.wait_for(lambda: info.mid in self.acks, 5), f"no PUBACK for {topic}"
            return self.acks[info.mid]

    def subscribe(self, topic: str) -> None:
        """Subscribe QoS 1 and return on SUBACK."""
        _, mid = self.c.subscribe(topic, qos=1)
        with self._lock:
            assert self._lock.wait_for(lambda: mid in self.acks, 5), f"no SUBACK for {topic}"

    def received(self, message: tuple[str, bytes], timeout: float = 5) -> None:
        """Wait until `message` arrived: what one publisher sends, the broker forwards in order."""
        with self._lock:
            assert self._lock.wait_for(lambda: message in self.messages, timeout), f"{message} did not arrive"

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[Mosquitto, Path, dict[str, Any]]]:
    """Mosquitto with the generated passwd and ACL, anonymous clients refused."""
    cells_dir = write_cells(tmp_path / "cells", {"alpha": ["gw-a"], "beta": ["gw-b"]})
    cells = load_cells(cells_dir)
    summary = write_broker_files(cells, tmp_path / "broker", tmp_path / "secrets")
    server = Mosquitto(tmp_path / "mosquitto", anonymous=False,
                       extra=f"password_file {summary.password_file}\nacl_file {summary.acl_file}")
    server.start()
    yield server, tmp_path / "secrets", cells
    server.stop()


def _secret(secrets: Path, user: str) -> str:
    return (secrets / f"{user}.password").read_text().strip()


@pytest.mark.integration
def test_real_mosquitto_enforces_the_generated_acl(secured: tuple[Mosquitto, Path, dict[str, Any]]) -> None:
    server, secrets, _ = secured
    ok, denied = 0x00, 0x87
    a = Client(server.port, "gw-a", _secret(secrets, "gw-a"), "a")
    b = Client(server.port, "gw-b", _secret(secrets, "gw-b"), "b")
    col = Client(server.port, "collector", _secret(secrets, "collector"), "col")
    try:
        assert not a.connack.is_failure and not col.connack.is_failure
        a.subscribe(resend_topic("alpha", "gw-a"))
        a.subscribe(resend_topic("beta", "gw-b"))  # granted by Mosquitto 2.0, but nothing may be delivered
        col.subscribe("$share/kwwk-collectors/kwwk/v1/+/+/telemetry")
        col.subscribe("kwwk/v1/+/+/status")
        # a gateway writes its own telemetry and status, nothing else
        assert a.publish(telemetry_topic("alpha", "gw-a")) in (ok, 0x10)
        assert a.publish(status_topic("alpha", "gw-a")) in (ok, 0x10)
        for topic in (telemetry_topic("beta", "gw-b"), status_topic("beta", "gw-b"), telemetry_topic("alpha", "gw-x"),
                      resend_topic("alpha", "gw-a"), deadletter_topic("alpha", "gw-a"), TIME_TOPIC, "anything/else"):
            assert a.publish(topic) == denied, topic
        # collectors ask for resends, file dead letters, keep the time beacon; they do not forge telemetry
        assert col.publish(resend_topic("alpha", "gw-a"), b"resend-a") in (ok, 0x10)
        assert col.publish(resend_topic("beta", "gw-b"), b"resend-b") in (ok, 0x10)
        assert col.publish(deadletter_topic("alpha", "gw-a")) in (ok, 0x10)
        assert col.publish(TIME_TOPIC) in (ok, 0x10)
        assert col.publish(telemetry_topic("alpha", "gw-a")) == denied
        # a last message from each publisher: once it arrived, everything it sent before had its chance
        assert col.publish(resend_topic("alpha", "gw-a"), b"resend-a-last") in (ok, 0x10)
        a.received((resend_topic("alpha", "gw-a"), b"resend-a-last"))
        assert a.publish(status_topic("alpha", "gw-a"), b"last") in (ok, 0x10)
        col.received((status_topic("alpha", "gw-a"), b"last"))
        # the collector read what the gateway wrote; the gateway got its own resend requests only
        assert {t for t, _ in col.messages} == {telemetry_topic("alpha", "gw-a"), status_topic("alpha", "gw-a")}
        assert a.messages == [(resend_topic("alpha", "gw-a"), b"resend-a"), (resend_topic("alpha", "gw-a"), b"resend-a-last")]
        # wrong password, unknown user and anonymous are refused at CONNECT
        for user, password in (("gw-a", "wrong"), ("nobody", "x"), (None, None)):
            intruder = Client(server.port, user, password, f"intruder-{user}")
            assert intruder.connack.is_failure, user
            intruder.close()
    finally:
        for c in (a, b, col):
            c.close()


async def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        await asyncio.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _rows(influx: InfluxDB1, query: str) -> list[list[Any]]:
    series = influx.query(query)["results"][0].get("series", [])
    return [v for s in series for v in s["values"]]


def _batch(cell: str, gateway: str, device: str, value: float, seq: int) -> bytes:
    now = int(time.time() * 1000)
    fields: dict[str, Any] = {"cell": cell, "gateway": gateway, "seq": seq, "sent": now,
                              "polls": polls([Reading(device, "power", now, value)])}
    if "stream" in TelemetryBatch.model_fields:
        fields["stream"] = "acltest"
    return TelemetryBatch(**fields).to_json()


@pytest.mark.integration
async def test_gateway_a_cannot_publish_into_gateway_b_and_nothing_is_stored(
        secured: tuple[Mosquitto, Path, dict[str, Any]], influxdb: InfluxDB1) -> None:
    """Acceptance: gateway A forges a batch of gateway B on B's topic; the broker refuses it (PUBACK 0x87)
    and the real collector, logged in as collector, stores nothing from it while it stores A's own."""
    from collector.ingest import COLLECTOR_MQTT, CollectorSettings
    from collector.registry import Registry
    from collector.service import run_collector
    from collector.storage import InfluxSettings

    server, secrets, cells = secured
    settings = CollectorSettings(mqtt=COLLECTOR_MQTT.replace(port=server.port, username="collector",
                                                             password=_secret(secrets, "collector"),
                                                             client_id="acl-test-collector"), flush_interval_s=0.2)
    stop = asyncio.Event()
    task = asyncio.create_task(run_collector(settings, InfluxSettings(url=influxdb.url, database=influxdb.database),
                                             Registry(cells), stop=stop))
    a = await asyncio.to_thread(Client, server.port, "gw-a", _secret(secrets, "gw-a"), "gw-a-forger")
    try:
        first = _batch("alpha", "gw-a", "grid-gw-a", 1.0, 0)

        def first_stored() -> list[list[Any]]:  # sent again until the collector has subscribed and stored it
            a.publish(telemetry_topic("alpha", "gw-a"), first)
            return _rows(influxdb, 'SELECT "power" FROM "electricity_meter" WHERE "gateway" = \'gw-a\' AND "power" = 1')

        await _wait(first_stored, 15, "the collector subscribed: gateway A's first reading stored")
        forged = _batch("beta", "gw-b", "grid-gw-b", -777.25, 1)
        assert await asyncio.to_thread(a.publish, telemetry_topic("beta", "gw-b"), forged) == 0x87
        # and into its own topic, claiming to be B (the collector's topic check dead-letters that)
        await asyncio.to_thread(a.publish, telemetry_topic("alpha", "gw-a"), forged)
        own = _batch("alpha", "gw-a", "grid-gw-a", 1234.5, 1)
        assert await asyncio.to_thread(a.publish, telemetry_topic("alpha", "gw-a"), own) in (0x00, 0x10)
        # the collector takes one publisher's messages in order: once A's later batch is stored, the forged one
        # before it was handled too
        await _wait(lambda: _rows(influxdb, 'SELECT "power" FROM "electricity_meter" WHERE "power" = 1234.5'),
                    15, "gateway A's own reading in InfluxDB")
        assert _rows(influxdb, 'SELECT * FROM "electricity_meter" WHERE "gateway" = \'gw-b\'') == []
        assert _rows(influxdb, 'SELECT * FROM "electricity_meter" WHERE "power" = -777.25') == []
        assert _rows(influxdb, 'SELECT * FROM /.*/ WHERE "gateway" = \'gw-b\'') == []
    finally:
        a.close()
        stop.set()
        await asyncio.wait_for(task, 15)


def test_the_api_account_may_read_gateway_status_and_nothing_else() -> None:
    from kwwk.deploy.broker import Account, render_acl

    acl = render_acl([Account("api", "api")]).splitlines()
    grants = [line for line in acl if line.startswith("topic")]
    assert grants == ["topic read kwwk/v1/+/+/status"]


# ---------------------------------------------------------------------------------------------- against a gateway's
# own credentials: the shipped security.conf (dynamic-security plugin, client id = username), real Mosquitto 2.0.11

SECURITY_CONF = Path(__file__).resolve().parents[1] / "firmware_configs" / "mosquitto" / "security.conf"
DYNSEC_PLUGIN = next(iter(sorted(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so"))),
                     Path("/usr/lib/mosquitto_dynamic_security.so"))
SHARED = "$share/kwwk-collectors/kwwk/v1/+/+/telemetry"
GRANTED, NOT_AUTHORIZED = 0x01, 0x87


def shipped_security(dynsec_file: Path) -> str:
    """The access-control lines of the shipped security.conf with this machine's paths, for the test broker's
    loopback listener (its listeners and TLS files are the deployment's)."""
    out: list[str] = []
    for line in SECURITY_CONF.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#") or words[0] in ("listener", "cafile", "certfile", "keyfile"):
            continue
        if words[0] == "plugin":
            out.append(f"plugin {DYNSEC_PLUGIN}")
        elif words[0] == "plugin_opt_config_file":
            out.append(f"plugin_opt_config_file {dynsec_file}")
        elif words[0] == "use_username_as_clientid":
            if line.strip() not in out:
                out.append(line.strip())
        else:
            pytest.fail(f"security.conf has a line this test does not know how to run: {line}")
    return "\n".join(out)


class SubClient(Client):
    """Client that also returns each SUBACK's reason code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.sub_reasons: dict[int, int] = {}
        self.disconnects = 0
        super().__init__(*args, **kwargs)
        self.c.on_disconnect = self._on_disconnect

    def _on_disconnect(self, *_: Any) -> None:
        self.disconnects += 1

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: Any, _p: Any) -> None:
        with self._lock:
            self.sub_reasons[mid] = int(reasons[0].value)
            self.acks[mid] = 0
            self._lock.notify_all()

    def subscribe_reason(self, topic: str) -> int:
        _, mid = self.c.subscribe(topic, qos=1)
        with self._lock:
            assert self._lock.wait_for(lambda: mid in self.sub_reasons, 5), f"no SUBACK for {topic}"
            return self.sub_reasons[mid]


@pytest.fixture
def hardened(tmp_path: Path) -> Iterator[tuple[Mosquitto, Path, dict[str, Any]]]:
    """Mosquitto with the shipped security.conf: the generated dynamic-security file, client id = username; two
    collector replicas with an account each, and the time beacon's."""
    cells = load_cells(write_cells(tmp_path / "cells", {"alpha": ["gw-a"], "beta": ["gw-b"]}))
    summary = write_broker_files(cells, tmp_path / "broker", tmp_path / "secrets",
                                 collectors=("collector-1", "collector-2"), beacon="beacon")
    assert stat.S_IMODE(summary.dynsec_file.stat().st_mode) == 0o600
    server = Mosquitto(tmp_path / "mosquitto", anonymous=False, extra=shipped_security(summary.dynsec_file))
    server.start()
    yield server, tmp_path / "secrets", cells
    server.stop()


@pytest.mark.integration
def test_with_acl_file_alone_mosquitto_2_0_grants_a_gateway_the_collectors_shared_group(
        secured: tuple[Mosquitto, Path, dict[str, Any]]) -> None:
    """Why the shipped config does not rely on acl_file: Mosquitto 2.0.11 grants every SUBSCRIBE under it and
    filters only delivery, so a gateway joins the collectors' group and the collector misses its turn."""
    server, secrets, _ = secured
    col = SubClient(server.port, "collector", _secret(secrets, "collector"), "col")
    a = SubClient(server.port, "gw-a", _secret(secrets, "gw-a"), "a")
    b = Client(server.port, "gw-b", _secret(secrets, "gw-b"), "b")
    try:
        assert col.subscribe_reason(SHARED) == GRANTED
        assert col.subscribe_reason(status_topic("beta", "gw-b")) == GRANTED
        assert a.subscribe_reason(SHARED) == GRANTED  # the hole
        for i in range(10):
            b.publish(telemetry_topic("beta", "gw-b"), f"m{i}".encode())
        # one publisher's messages are forwarded in order: once its status arrived, the telemetry was dealt
        b.publish(status_topic("beta", "gw-b"), b"last")
        col.received((status_topic("beta", "gw-b"), b"last"))
        telemetry = [m for m in col.messages if m[0] == telemetry_topic("beta", "gw-b")]
        assert a.messages == []  # delivery is filtered: the gateway's turns are discarded, not delivered
        assert 0 < len(telemetry) < 10, f"the gateway took no turn of the shared subscription: {telemetry}"
    finally:
        for c in (a, b, col):
            c.close()


@pytest.mark.integration
def test_shipped_security_grants_each_account_only_its_own_subscriptions_and_topics(
        hardened: tuple[Mosquitto, Path, dict[str, Any]]) -> None:
    server, secrets, _ = hardened
    ok = (0x00, 0x10)
    a = SubClient(server.port, "gw-a", _secret(secrets, "gw-a"), "gw-a")
    col = SubClient(server.port, "collector-1", _secret(secrets, "collector-1"), "collector-1")
    api = SubClient(server.port, "api", _secret(secrets, "api"), "api")
    beacon = SubClient(server.port, "beacon", _secret(secrets, "beacon"), "beacon")
    try:
        # a gateway subscribes to its own resend requests and the time beacon, to nothing else
        assert a.subscribe_reason(resend_topic("alpha", "gw-a")) == GRANTED
        assert a.subscribe_reason(TIME_TOPIC) == GRANTED
        for topic in (SHARED, "$share/other/kwwk/v1/+/+/telemetry", "$share/kwwk-collectors/#", "#", "+/#",
                      "kwwk/v1/#", telemetry_topic("beta", "gw-b"), resend_topic("beta", "gw-b"),
                      status_topic("beta", "gw-b"), "kwwk/v1/_deadletter/#", "$SYS/#"):
            assert a.subscribe_reason(topic) == NOT_AUTHORIZED, topic
        assert a.publish(telemetry_topic("alpha", "gw-a")) in ok and a.publish(status_topic("alpha", "gw-a")) in ok
        for topic in (telemetry_topic("beta", "gw-b"), resend_topic("alpha", "gw-a"), TIME_TOPIC, "anything/else"):
            assert a.publish(topic) == NOT_AUTHORIZED, topic
        # a collector joins its group (no other), asks for resends, files dead letters; it forges no telemetry
        assert col.subscribe_reason(SHARED) == GRANTED
        assert col.subscribe_reason("$share/other/kwwk/v1/+/+/telemetry") == NOT_AUTHORIZED
        assert col.publish(resend_topic("alpha", "gw-a"), b"resend-a") in ok
        assert col.publish(deadletter_topic("alpha", "gw-a")) in ok
        assert col.publish(telemetry_topic("alpha", "gw-a")) == NOT_AUTHORIZED
        a.received((resend_topic("alpha", "gw-a"), b"resend-a"))
        # the API reads gateway status, the beacon writes the beacon; neither anything else
        assert api.subscribe_reason("kwwk/v1/+/+/status") == GRANTED
        assert api.subscribe_reason(SHARED) == NOT_AUTHORIZED and api.subscribe_reason("#") == NOT_AUTHORIZED
        assert api.publish(status_topic("alpha", "gw-a")) == NOT_AUTHORIZED
        assert beacon.publish(TIME_TOPIC, b"now") in ok
        assert beacon.publish(telemetry_topic("alpha", "gw-a")) == NOT_AUTHORIZED
        assert beacon.subscribe_reason(SHARED) == NOT_AUTHORIZED
        a.received((TIME_TOPIC, b"now"))
        assert {t for t, _ in a.messages} == {resend_topic("alpha", "gw-a"), TIME_TOPIC}
        for user, password in (("gw-a", "wrong"), ("nobody", "x"), (None, None)):
            intruder = Client(server.port, user, password, f"intruder-{user}")
            assert intruder.connack.is_failure, user
            intruder.close()
    finally:
        for c in (a, col, api, beacon):
            c.close()


def _stored_powers(influx: InfluxDB1) -> set[float]:
    return {v[1] for v in _rows(influx, 'SELECT "power" FROM "electricity_meter" WHERE "gateway" = \'gw-b\'')}


def _publish_and_time(b: Client, influx: InfluxDB1, values: list[float], first_seq: int) -> float:
    """Publish one batch of gateway B per value (20 a second), wait until each is stored; the worst time from
    its PUBACK to its appearance in InfluxDB (polled every 0.1 s), in seconds."""
    sent: dict[float, float] = {}
    seen: dict[float, float] = {}
    done = threading.Event()

    def watch() -> None:  # polls while publishing: a reading's time to InfluxDB, not the whole run's
        while not done.is_set() and not (sent and len(seen) == len(values)):
            now = time.monotonic()
            for v in _stored_powers(influx) & set(values):
                seen.setdefault(v, now)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for i, v in enumerate(values):
        b.publish(telemetry_topic("beta", "gw-b"), _batch("beta", "gw-b", "grid-gw-b", v, first_seq + i))
        sent[v] = time.monotonic()
        time.sleep(0.05)  # a gateway's pace: time passing is the point
    watcher.join(10)
    done.set()
    missing = sorted(set(values) - set(seen))
    assert not missing, f"{len(missing)} of gateway B's readings were not stored within 10 s: {missing[:10]}"
    return max(seen[v] - sent[v] for v in values)


@pytest.mark.integration
def test_a_gateways_credentials_take_nothing_from_the_collectors_and_cannot_knock_them_off(
        hardened: tuple[Mosquitto, Path, dict[str, Any]], influxdb: InfluxDB1) -> None:
    """Acceptance (issue 14): with gateway A's generated credentials, subscribing to the collectors' shared group,
    to gateway B's telemetry or to `#` is refused and delivers nothing, and takes nothing from the two real
    collector replicas: every reading of B is stored within 5 s; connecting with a collector's client id does
    not disconnect it (the broker makes the id the username)."""
    from collector.ingest import COLLECTOR_MQTT, CollectorSettings, Ingest
    from collector.registry import Registry
    from collector.storage import InfluxSettings, V1Writer

    server, secrets, cells = hardened
    replicas: list[Ingest] = []
    drops: dict[str, int] = {}
    for name in ("collector-1", "collector-2"):
        mqtt_settings = COLLECTOR_MQTT.replace(port=server.port, username=name, password=_secret(secrets, name),
                                               client_id=name)
        ingest = Ingest(CollectorSettings(mqtt=mqtt_settings, flush_interval_s=0.1), Registry(cells),
                        V1Writer(InfluxSettings(url=influxdb.url, database=influxdb.database)))
        on_disconnect = ingest._client.on_disconnect  # noqa: SLF001 - count what the attacker could cause

        def counted(*args: Any, _name: str = name, _orig: Any = on_disconnect) -> None:
            drops[_name] = drops.get(_name, 0) + 1
            _orig(*args)

        ingest._client.on_disconnect = counted  # noqa: SLF001
        ingest.start()
        replicas.append(ingest)
    b = Client(server.port, "gw-b", _secret(secrets, "gw-b"), "gw-b")
    attacker: SubClient | None = None
    try:
        assert all(r.subscribed.wait(10) for r in replicas), "both collectors subscribed"
        attacker = SubClient(server.port, "gw-a", _secret(secrets, "gw-a"), "gw-a")
        for topic in (SHARED, telemetry_topic("beta", "gw-b"), "#"):
            assert attacker.subscribe_reason(topic) == NOT_AUTHORIZED, topic
        worst_subscribed = _publish_and_time(b, influxdb, [1000.0 + i for i in range(40)], 0)
        assert attacker.messages == [], "the gateway's credentials received others' telemetry"
        attacker.close()
        attacker = None
        # the same credentials under each collector's client id: the broker makes it gw-a, the collectors stay
        for name in ("collector-1", "collector-2"):
            thief = SubClient(server.port, "gw-a", _secret(secrets, "gw-a"), name)
            assert not thief.connack.is_failure and thief.subscribe_reason(SHARED) == NOT_AUTHORIZED
            thief.close()
        worst_after = _publish_and_time(b, influxdb, [2000.0 + i for i in range(20)], 40)
        print(f"\ngateway B's readings stored at worst {worst_subscribed:.2f} s after publishing while gateway A's "
              f"credentials subscribed, {worst_after:.2f} s after they claimed the collectors' client ids")
        assert worst_subscribed < 5 and worst_after < 5
        assert drops == {}, f"a collector was disconnected: {drops}"
        assert all(r.connected for r in replicas)
        assert sum(r.stored_readings for r in replicas) >= 60 and all(r.stored_readings for r in replicas)
    finally:
        for c in (b, attacker):
            if c is not None:
                c.close()
        for r in replicas:
            r.stop()


def test_dynamic_security_file_carries_the_password_file_hashes_and_denies_by_default(tmp_path: Path) -> None:
    import json

    cells = load_cells(write_cells(tmp_path / "cells", {"alpha": ["gw-a"]}))
    summary = write_broker_files(cells, tmp_path / "broker", tmp_path / "secrets", collectors=("c-1", "c-2"),
                                 beacon="beacon")
    dynsec = json.loads(summary.dynsec_file.read_text())
    assert dynsec["defaultACLAccess"] == {"publishClientSend": False, "publishClientReceive": False,
                                          "subscribe": False, "unsubscribe": True}
    hashes = {u: line.split(":", 1)[1] for u, line in parse_password_file(summary.password_file.read_text()).items()}
    clients = {c["username"]: c for c in dynsec["clients"]}
    assert sorted(clients) == ["api", "beacon", "c-1", "c-2", "gw-a"]
    for user, client in clients.items():
        assert hashes[user] == f"$7${client['iterations']}${client['salt']}${client['password']}"
        assert verify_password(_secret(tmp_path / "secrets", user), hashes[user])
    roles = {r["rolename"]: {(a["acltype"], a["topic"]) for a in r["acls"]} for r in dynsec["roles"]}
    gw = roles[clients["gw-a"]["roles"][0]["rolename"]]
    assert {t for kind, t in gw if kind.startswith("subscribe")} == {resend_topic("alpha", "gw-a"), TIME_TOPIC}
    assert {t for kind, t in gw if kind == "publishClientSend"} == {telemetry_topic("alpha", "gw-a"),
                                                                    status_topic("alpha", "gw-a")}
    assert roles[clients["beacon"]["roles"][0]["rolename"]] == {("publishClientSend", TIME_TOPIC)}
    shared = [t for kind, t in roles[clients["c-1"]["roles"][0]["rolename"]] if kind == "subscribeLiteral"]
    assert shared == ["$share/kwwk-collectors/kwwk/v1/+/+/telemetry"]
    again = write_broker_files(cells, tmp_path / "broker", tmp_path / "secrets", collectors=("c-1", "c-2"),
                               beacon="beacon")
    assert not again.changed and json.loads(summary.dynsec_file.read_text()) == dynsec
