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
