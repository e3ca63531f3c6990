"""`kwwk commission verify` against a real site: the simulator's Modbus devices, a real Mosquitto with a TLS
listener (CA and server certificate made here with `cryptography`), the password file and ACL written by
`kwwk broker acl`, and the central time beacon. Passes on a correct setup; fails clearly on a wrong unit
id, a wrong word order, an unreachable broker, a wrong password, an ACL denial, a clock off by minutes
and an outbox that cannot be written."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.cell import CellConfig, load_cell
from edge.messages import TIME_TOPIC, time_beacon_payload
from edge.mqtt import MqttSettings
from edge.profile import Profile, get_profile
from edge.sim import SimClock, SimulatorServer
from edge.sim.image import RegisterImage
from edge.sim.ports import reserve_port
from gateway.commission.checks import MqttOutcome, clock_check
from gateway.commission.report import write_reports
from gateway.commission.verify import VerifyReport, verify
from gateway.outbox import Outbox
from kwwk.deploy.broker import write_broker_files
from kwwk.dev.localservers import Mosquitto

pytestmark = pytest.mark.integration
KWWK = str(Path(sys.executable).parent / "kwwk")
CELL = "verifydorf"
GW = "gw-v"


# ---------------------------------------------------------------------------------------------- TLS

def make_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it: (ca.crt, server.crt, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "KWWK test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(hours=1))
          .not_valid_after(now + timedelta(days=7))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.crt", folder / "server.crt", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths


# ---------------------------------------------------------------------------------------------- the site

def cell_text(port: int, secrets: Path, *, cell: str = CELL, grid_unit: int = 1, pv_unit: int = 2) -> str:
    return f"""cell: {{id: {cell}, name: Verifydorf, location: {{latitude: 51.3, longitude: 9.5}}}}
gateways:
  - id: {GW}
    name: Heizzentrale Verifydorf
    mqtt: {{username: {GW}, password_file: {secrets / (GW + ".password")}}}
    devices:
      - {{id: grid, name: Netzübergabe, profile: carlo_gavazzi_em24_e1, sim: {{model: grid}},
         connection: {{host: 127.0.0.1, port: {port}, unit_id: {grid_unit}}}}}
      - {{id: pv, name: PV Dach, profile: sunspec_inverter_103, sim: {{model: pv}},
         connection: {{host: 127.0.0.1, port: {port}, unit_id: {pv_unit}}}}}
"""


def write_cell(folder: Path, name: str, text: str) -> CellConfig:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return load_cell(path)


@dataclass
class Site:
    tmp: Path
    port: int  # Modbus TCP of the simulated devices
    cfg: CellConfig  # the cell as it really is
    sim: SimulatorServer
    broker: Mosquitto
    tls_port: int
    ca: Path
    secrets: Path

    def target(self, **kw: Any) -> MqttSettings:
        password = (self.secrets / f"{GW}.password").read_text().strip()
        args: dict[str, Any] = {"host": "127.0.0.1", "port": self.tls_port, "username": GW, "password": password,
                                "tls": True, "ca_file": str(self.ca)}
        args.update(kw)
        return MqttSettings(**args)

    async def verify(self, cfg: CellConfig | None = None, **kw: Any) -> VerifyReport:
        args: dict[str, Any] = {"broker": self.target(), "outbox": self.tmp / "outbox" / "outbox.sqlite",
                                "password_file": str(self.secrets / f"{GW}.password"), "pause": 0.6,
                                "beacon_wait": 2.0, "time_state": {}, "check_service": False, "service_user": None}
        args.update(kw)
        return await verify(cfg or self.cfg, GW, **args)


def publish_beacon(port: int, username: str, password: str, expiry: int = 3600) -> None:
    """What `kwwk broker beacon` keeps on the central broker: the central clock, retained, with an expiry."""
    done = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-beacon", protocol=mqtt.MQTTv5)
    c.username_pw_set(username, password)
    c.on_publish = lambda *_: done.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = expiry
    c.publish(TIME_TOPIC, time_beacon_payload(expiry, source="central"), qos=1, retain=True, properties=props)
    assert done.wait(5)
    c.disconnect()
    c.loop_stop()


def secured_mosquitto(folder: Path, cfg: CellConfig, secrets: Path, tls: tuple[Path, Path, Path], *,
                      acl: bool = True) -> tuple[Mosquitto, int]:
    files = write_broker_files({cfg.cell.id: cfg}, folder / "broker", secrets)
    tls_port = reserve_port()
    ca, cert, key = tls
    extra = [f"password_file {files.password_file}"] + ([f"acl_file {files.acl_file}"] if acl else []) + [
        f"listener {tls_port} 127.0.0.1", f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
    server = Mosquitto(folder / "mosquitto", anonymous=False, extra="\n".join(extra))
    server.start()
    return server, tls_port


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    port = reserve_port()
    secrets = tmp_path / "secrets"
    cfg = write_cell(tmp_path / "real", CELL, cell_text(port, secrets))
    tls = make_tls(tmp_path / "tls")
    broker, tls_port = secured_mosquitto(tmp_path, cfg, secrets, tls)
    await asyncio.to_thread(publish_beacon, broker.port, "collector", (secrets / "collector.password").read_text().strip())
    sim = SimulatorServer([cfg], SimClock(speed=3600), step=0.1)  # an hour a second: the grid counter moves
    await sim.start()
    try:
        yield Site(tmp_path, port, cfg, sim, broker, tls_port, tls[0], secrets)
    finally:
        await sim.stop()
        broker.stop()


def by_name(report: VerifyReport) -> dict[str, Any]:
    return {c.name: c for c in report.checks}


def show(report: VerifyReport) -> str:
    return "\n".join(f"{c.status:5} {c.name}: {c.summary} | {c.fix}" for c in report.checks)


# ---------------------------------------------------------------------------------------------- tests

async def test_passes_on_a_correct_setup_and_writes_the_report(site: Site) -> None:
    report = await site.verify(technician="A. Weber")
    checks = by_name(report)
    assert report.passed, show(report)
    assert set(checks) == {"config", "device grid", "device pv", "secrets", "broker", "acl", "clock", "outbox"}
    for name in ("config", "secrets", "broker", "acl", "clock", "outbox"):
        assert checks[name].status == "pass", show(report)
    assert checks["device grid"].status in ("pass", "warn") and checks["device pv"].status in ("pass", "warn")
    assert "over TLS" in checks["broker"].summary
    assert "refused outside its topics (Not authorized)" in checks["acl"].summary
    assert "from the central server" in checks["clock"].summary
    grid = next(p for d, _, p in report.devices if d.id == "grid")
    assert grid.identity and "model_code = 1648" in grid.identity[0]

    md, page = write_reports(report, site.tmp / "reports")
    text, html = md.read_text(), page.read_text()
    for needle in ("Verifydorf", GW, "A. Weber", "device grid", "voltage_l1", "230.2", "PASS", "Netzübergabe",
                   "51.30000, 9.50000"):
        assert needle in text, needle
        assert needle in html, needle
    assert html.startswith("<!doctype html>") and "<script" not in html


async def test_fails_clearly_on_a_wrong_unit_id_and_a_wrong_word_order(site: Site) -> None:
    # the grid meter really sends its 32-bit values high word first (the profile says low word first)
    unit = site.sim.units[(CELL, "grid")]
    data = get_profile("carlo_gavazzi_em24_e1").model_dump(by_alias=True)
    unit.image = RegisterImage(Profile.model_validate({**data, "word_order": "big", "golden": []}))
    site.sim.refresh()
    # and the technician typed unit 9 for the inverter, which sits at unit 2
    typo = write_cell(site.tmp / "typo", CELL, cell_text(site.port, site.secrets, pv_unit=9))
    report = await site.verify(typo)
    checks = by_name(report)
    assert not report.passed
    grid, pv = checks["device grid"], checks["device pv"]
    assert grid.status == "fail" and "word order looks wrong" in grid.summary and "word_order: big" in grid.fix
    assert pv.status == "fail" and "unit 9" in pv.summary and "kwwk commission scan" in pv.fix
    for name in ("broker", "acl", "clock", "outbox"):  # the rest of the site is fine
        assert checks[name].status == "pass", show(report)


async def test_fails_clearly_on_an_unreachable_broker(site: Site) -> None:
    report = await site.verify(broker=site.target(port=reserve_port()))
    checks = by_name(report)
    assert checks["broker"].status == "fail" and "cannot reach" in checks["broker"].summary
    assert "firewall" in checks["broker"].fix
    assert checks["acl"].status == "skip"
    assert checks["clock"].status == "warn"  # no beacon, no NTP state: nothing to compare with
    assert not report.passed


async def test_fails_clearly_on_a_wrong_password_and_a_wrong_ca(site: Site) -> None:
    wrong = site.tmp / "wrong.password"
    wrong.write_text("not-the-password\n")
    wrong.chmod(0o640)
    report = await site.verify(broker=site.target(password="not-the-password"), password_file=str(wrong))
    checks = by_name(report)
    assert checks["broker"].status == "fail"
    assert f"refused the login of '{GW}': Not authorized" in checks["broker"].summary
    assert f"copy {GW}.password" in checks["broker"].fix and str(wrong) in checks["broker"].fix

    other_ca = make_tls(site.tmp / "other-tls")[0]
    report = await site.verify(broker=site.target(ca_file=str(other_ca)))
    checks = by_name(report)
    assert checks["broker"].status == "fail" and "TLS handshake" in checks["broker"].summary
    assert "CERTIFICATE_VERIFY_FAILED" in checks["broker"].summary.upper().replace(" ", "_")

    report = await site.verify(broker=site.target(port=site.broker.port, tls=False))  # plain MQTT
    assert by_name(report)["broker"].status == "fail" and "clear text" in by_name(report)["broker"].summary


async def test_fails_clearly_on_an_acl_denial(site: Site) -> None:
    # the cell was renamed on site, but the broker's ACL was generated for the old name
    renamed = write_cell(site.tmp / "renamed", "neudorf", cell_text(site.port, site.secrets, cell="neudorf"))
    report = await site.verify(renamed)
    acl = by_name(report)["acl"]
    assert by_name(report)["broker"].status == "pass"
    assert acl.status == "fail"
    assert "refused publishing to kwwk/v1/neudorf/gw-v/status: PUBACK 0x87 Not authorized" in acl.summary
    assert "kwwk broker acl" in acl.fix


async def test_fails_when_the_broker_runs_without_the_acl(site: Site) -> None:
    open_broker, tls_port = secured_mosquitto(site.tmp / "open", site.cfg, site.secrets,
                                              (site.ca, site.ca.parent / "server.crt", site.ca.parent / "server.key"),
                                              acl=False)
    try:
        report = await site.verify(broker=site.target(port=tls_port))
    finally:
        open_broker.stop()
    acl = by_name(report)["acl"]
    assert acl.status == "fail" and "runs without the ACL" in acl.summary and "acl_file" in acl.fix


async def test_fails_clearly_on_a_clock_off_by_minutes(site: Site) -> None:
    def skewed() -> float:  # five minutes fast
        return time.time() + 300

    report = await site.verify(now=skewed, pause=0)
    clock = by_name(report)["clock"]
    assert clock.status == "fail", show(report)
    assert "5.0 minutes ahead of the central server (allowed: 10 s)" in clock.summary
    assert "timedatectl set-ntp true" in clock.fix
    late = await site.verify(now=lambda: time.time() - 240, pause=0)
    assert "4.0 minutes behind" in by_name(late)["clock"].summary
    tolerant = await site.verify(now=skewed, pause=0, clock_max_offset=600)  # the threshold is configurable
    assert by_name(tolerant)["clock"].status == "pass"


def test_clock_without_a_beacon_uses_the_system_state() -> None:
    nothing = MqttOutcome(connected=True, beacon_error="no retained time beacon")
    assert clock_check(nothing, max_offset=10, state={"synchronized": True, "source": "timedatectl"}).status == "pass"
    unsynced = clock_check(nothing, max_offset=10, state={"synchronized": False, "source": "timedatectl"})
    assert unsynced.status == "fail" and "not NTP-synchronised" in unsynced.summary
    far = clock_check(nothing, max_offset=10, state={"chrony_offset": 42.0, "source": "chronyc"})
    assert far.status == "fail" and "+42.0 s" in far.summary
    assert clock_check(nothing, max_offset=10, now=lambda: 86400.0, state={}).summary.startswith("the clock says 1970")
    beacon = MqttOutcome(connected=True, beacon={"ts": 1_000_000_000_000, "expiry": 3600, "remaining": 3590,
                                                 "received": 1_000_000_012.0, "source": "central"})
    ok = clock_check(beacon, max_offset=10, now=lambda: 1_800_000_000.0, state={})
    assert ok.status == "pass" and "+2.0 s" in ok.summary  # 12 s after it was sent, 10 s of which on the broker


async def test_fails_on_an_outbox_that_cannot_be_written_or_has_no_room(site: Site) -> None:
    blocker = site.tmp / "not-a-folder"
    blocker.write_text("a file where the outbox folder should be")
    report = await site.verify(outbox=blocker / "outbox.sqlite", pause=0)
    assert by_name(report)["outbox"].status == "fail" and "is a file" in by_name(report)["outbox"].summary
    full = await site.verify(min_free_mb=1e12, pause=0)
    assert by_name(full)["outbox"].status == "fail" and "MB needed" in by_name(full)["outbox"].summary
    damaged = site.tmp / "damaged" / "outbox.sqlite"
    damaged.parent.mkdir()
    damaged.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4096)
    report = await site.verify(outbox=damaged, pause=0)
    assert by_name(report)["outbox"].status == "fail" and "damaged" in by_name(report)["outbox"].summary
    good = site.tmp / "good" / "outbox.sqlite"
    good.parent.mkdir()
    sqlite3.connect(good).executescript("CREATE TABLE readings (id INTEGER PRIMARY KEY); INSERT INTO readings DEFAULT VALUES;")
    report = await site.verify(outbox=good, pause=0)
    assert by_name(report)["outbox"].status == "pass" and "integrity ok" in " ".join(by_name(report)["outbox"].details)
    running = Outbox(site.tmp / "running" / "outbox.sqlite")  # a gateway's outbox, open: held exclusively
    try:
        report = await site.verify(outbox=running.path, pause=0)
    finally:
        await running.close()
    in_use = by_name(report)["outbox"]
    assert in_use.status == "fail" and "in use" in in_use.summary and "systemctl stop" in in_use.fix


async def _cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(KWWK, "commission", "verify", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT,
                                                env={"COLUMNS": "250", "PATH": "/usr/bin:/bin"})
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


async def test_cli_verify_with_the_gateway_env_file(site: Site) -> None:
    env = site.tmp / "gateway.env"
    env.write_text(f"""# as /etc/kwwk/gateway.env on the Pi
KWWK_GATEWAY={GW}
KWWK_MQTT_HOST=127.0.0.1
KWWK_MQTT_PORT={site.tls_port}
KWWK_MQTT_TLS=true
KWWK_MQTT_CA={site.ca}
KWWK_MQTT_USERNAME={GW}
KWWK_MQTT_PASSWORD_FILE={site.secrets / (GW + ".password")}
KWWK_OUTBOX={site.tmp / "cli-outbox" / "outbox.sqlite"}
""")
    reports = site.tmp / "cli-reports"
    common = ["--cell", site.cfg.source, "--env-file", str(env), "--pause", "0.5", "--report-dir", str(reports),
              "--service-user", "nobody-here"]
    code, out = await _cli(*common, "--technician", "B. Schulz")
    assert code == 0, out
    assert "PASS" in out and "device grid" in out and "report:" in out
    (page,) = reports.glob("*.html")
    (md,) = reports.glob("*.md")
    assert "B. Schulz" in page.read_text() and f"{CELL}_{GW}_" in md.name
    code, out = await _cli(*common, "--mqtt-port", str(reserve_port()))  # the command line beats the env file
    assert code == 1 and "cannot reach" in out and "FAIL" in out


def test_beacon_payload_round_trips() -> None:
    body = json.loads(time_beacon_payload(600, now=1_700_000_000.5, source="central"))
    assert body == {"schema": "kwwk.time/1", "ts": 1_700_000_000_500, "expiry": 600, "source": "central"}
