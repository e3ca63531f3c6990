"""The gateway-side checks of `kwwk commission verify`: broker (TLS, credentials, ACL), clock, outbox.

Broker: one MQTT v5 session with the gateway's own settings (gateway/settings.py resolves them as `gateway
run` does), under a client id of its own and without a persistent session, so a running gateway keeps its. A QoS 1 publish to the gateway's status topic must be
acknowledged with a success reason code: Mosquitto answers an ACL denial with PUBACK 0x87 (Not
authorized), which is exactly what the gateway's uplink would meet. A publish outside the gateway's
tree must be refused, or the broker runs without the ACL.

Clock: no NTP needed on site. The central side keeps a retained beacon with its clock on
kwwk/v1/_time (`kwwk broker beacon`), sent with a Message Expiry Interval; Mosquitto forwards the
*remaining* interval, so the beacon's age is known and the gateway's clock offset follows:
offset = now - (beacon ts + (expiry - remaining)), good to about a second. `timedatectl` and
`chronyc` state is added when the Pi has them.
"""

from __future__ import annotations

import contextlib
import math
import os
import pwd
import shutil
import sqlite3
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge.messages import TIME_TOPIC, MessageError, StatusMessage, TimeBeacon
from edge.mqtt import MqttSettings, connect_kwargs, paho_client
from edge.telemetry import TOPIC_ROOT, status_topic
from gateway.commission.common import Status

__all__ = [
    "Check", "MqttOutcome", "broker_checks", "clock_check", "mqtt_session", "outbox_check",
    "secrets_check", "system_time_state",
]

#: a clock before this cannot be right (a Pi without RTC starts at its last shutdown, or 1970)
EARLIEST_PLAUSIBLE = datetime(2024, 1, 1, tzinfo=UTC).timestamp()


@dataclass
class Check:
    name: str
    status: Status
    summary: str
    fix: str = ""
    details: list[str] = field(default_factory=list)


@dataclass
class MqttOutcome:
    connected: bool = False
    error: str | None = None  # why there is no session (network, TLS)
    error_kind: str | None = None  # unreachable, tls, refused, timeout
    connack: str | None = None  # reason of a refused CONNACK
    connack_code: int | None = None
    published: dict[str, tuple[int | None, str]] = field(default_factory=dict)  # topic -> (reason code, text)
    beacon: dict[str, Any] | None = None  # payload + remaining expiry + local receive time
    beacon_error: str | None = None


def mqtt_session(target: MqttSettings, cell: str, gateway: str, *, timeout: float = 5.0, beacon_wait: float = 3.0,
                 now: Callable[[], float] = time.time) -> MqttOutcome:
    """Connect as the gateway, read the time beacon, publish to the status topic and outside the tree.

    Blocking (paho's network thread); run it with asyncio.to_thread.
    """
    out = MqttOutcome()
    probe = target.replace(client_id="", session_expiry_s=0)  # the gateway's own session is left alone
    try:
        client = paho_client(probe, client_id_prefix=f"kwwk-verify-{gateway}")
    except (OSError, ssl.SSLError) as err:
        out.error, out.error_kind = f"cannot load the TLS files: {err}", "tls"
        return out
    client.connect_timeout = timeout
    connack = threading.Event()
    beacon = threading.Event()
    acks: dict[int, tuple[int | None, str]] = {}
    acked = threading.Condition()

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            out.connack, out.connack_code = str(reason), int(reason.value)
        else:
            out.connected = True
        connack.set()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        if msg.topic != TIME_TOPIC:
            return
        received = now()
        try:
            payload = TimeBeacon.parse(msg.payload).model_dump(by_alias=True)
            remaining = getattr(msg.properties, "MessageExpiryInterval", None) if msg.properties else None
            out.beacon = {**payload, "remaining": remaining, "received": received}
        except MessageError:
            out.beacon_error = f"unreadable time beacon: {msg.payload[:80]!r}"
        beacon.set()

    def on_publish(_c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with acked:
            acks[mid] = (int(reason.value) if reason is not None else None, str(reason))
            acked.notify_all()

    def on_disconnect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        connack.set()
        beacon.set()
        with acked:
            acked.notify_all()

    client.on_connect = on_connect
    client.on_message = on_message
    client.on_publish = on_publish
    client.on_disconnect = on_disconnect
    try:
        client.connect(**connect_kwargs(probe))
    except ssl.SSLError as err:
        out.error, out.error_kind = f"TLS handshake with {target.host}:{target.port} failed: {err.reason or err}", "tls"
        return out
    except TimeoutError:
        out.error, out.error_kind = f"no answer from {target.host}:{target.port} within {timeout:g} s", "timeout"
        return out
    except OSError as err:
        out.error, out.error_kind = f"cannot reach {target.host}:{target.port}: {err.strerror or err}", "unreachable"
        return out
    client.loop_start()
    try:
        if not connack.wait(timeout):
            out.error, out.error_kind = "the broker did not answer the MQTT CONNECT", "timeout"
            return out
        if not out.connected:
            if out.connack is None:
                out.error, out.error_kind = "the broker closed the connection during CONNECT", "refused"
            return out
        client.subscribe(TIME_TOPIC, qos=1)
        if not beacon.wait(beacon_wait) and out.beacon is None and out.beacon_error is None:
            out.beacon_error = f"no retained time beacon on {TIME_TOPIC} within {beacon_wait:g} s"
        payload = StatusMessage.now(cell, gateway, "commissioning", by="kwwk commission verify", now=now()).to_bytes()
        for topic, body in ((status_topic(cell, gateway), payload),
                            (f"{TOPIC_ROOT}/_commission/{gateway}/denied", b"acl probe: must be refused")):
            info = client.publish(topic, body, qos=1)
            deadline = time.monotonic() + timeout
            with acked:
                while info.mid not in acks and out.connected and time.monotonic() < deadline:
                    acked.wait(0.1)
            out.published[topic] = acks.get(info.mid, (None, "no PUBACK"))
        return out
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
        client.loop_stop()


def broker_checks(out: MqttOutcome, target: MqttSettings, cell: str, gateway: str, *,
                  require_tls: bool = True, password_file: str | None = None) -> list[Check]:
    """The 'broker' and 'acl' checks from one MQTT session."""
    where = f"{target.host}:{target.port}"
    checks: list[Check] = []
    if out.error_kind == "tls":
        checks.append(Check("broker", "fail", out.error or "TLS failed",
                            "check the CA file (KWWK_MQTT_CA: the CA that signed the broker's certificate), that the "
                            "host name matches the certificate, that this is the TLS port, and the clock (a clock in "
                            "the past makes a valid certificate 'not yet valid')"))
    elif out.error_kind in ("unreachable", "timeout"):
        checks.append(Check("broker", "fail", out.error or "broker unreachable",
                            f"check the address and port (KWWK_MQTT_HOST/KWWK_MQTT_PORT), the uplink (ping {target.host}), "
                            f"the firewall (TCP {target.port} outbound) and that the broker runs"))
    elif out.connack is not None:
        checks.append(Check("broker", "fail", f"the broker refused the login of {target.username!r}: {out.connack}",
                            f"the password in {password_file or 'the password file'} does not match the broker's "
                            f"password file, or the account is missing there: copy {target.username}.password from "
                            f"the central secrets again (written by kwwk broker acl), and ask the operator to reload "
                            f"Mosquitto after adding a gateway"))
    elif out.error_kind is not None or not out.connected:
        checks.append(Check("broker", "fail", out.error or "no session",
                            "check the broker's log for this connection (a listener may require a client certificate)"))
    elif not target.tls and require_tls:
        checks.append(Check("broker", "fail", f"logged in to {where}, but over plain MQTT: the password travels in "
                                              "clear text",
                            "use the broker's TLS port (8883) with --mqtt-tls and the broker's CA (--mqtt-ca), as in "
                            "/etc/kwwk/gateway.env (KWWK_MQTT_TLS=true, KWWK_MQTT_CA=/etc/kwwk/ca.crt)"))
    else:
        mode = "TLS" if target.tls else "plain MQTT (allowed by --allow-plain)"
        checks.append(Check("broker", "pass", f"logged in to {where} over {mode} as {target.username!r}"))
    if not out.connected:
        checks.append(Check("acl", "skip", "not checked: no session with the broker"))
        return checks
    own = status_topic(cell, gateway)
    code, text = out.published.get(own, (None, "not sent"))
    foreign = [t for t in out.published if t != own]
    f_code, f_text = out.published[foreign[0]] if foreign else (None, "not sent")
    if code is None:
        checks.append(Check("acl", "fail", f"no acknowledgement for a QoS 1 publish to {own} ({text})",
                            "the broker dropped the session during the publish: check its log"))
    elif code >= 0x80:
        checks.append(Check("acl", "fail", f"the broker refused publishing to {own}: PUBACK {code:#04x} {text}",
                            f"the ACL does not let {target.username!r} write its own topics (the uplink would lose "
                            f"every batch): regenerate with kwwk broker acl from the cell registry that has cell "
                            f"{cell!r} and gateway {gateway!r}, copy passwd and acl to the broker, reload Mosquitto"))
    elif f_code is not None and f_code < 0x80:
        checks.append(Check("acl", "fail", f"the broker accepted a publish outside the gateway's topics "
                                           f"({foreign[0]}): it runs without the ACL",
                            "set acl_file (and password_file) in mosquitto.conf to the files kwwk broker acl writes, "
                            "allow_anonymous false, and reload Mosquitto"))
    else:
        checks.append(Check("acl", "pass", f"may publish to its status topic ({text}); refused outside its "
                                           f"topics ({f_text})",
                            details=[f"{own}: PUBACK {code:#04x} {text}", f"{foreign[0] if foreign else '-'}: "
                                     f"{'PUBACK ' + format(f_code, '#04x') if f_code is not None else ''} {f_text}",
                                     "reading its resend topic is granted by the same ACL; Mosquitto 2.0 grants "
                                     "every subscription and filters delivery, so it is not observable from here"]))
    return checks


# ---------------------------------------------------------------------------------------------- clock

def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=3, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


def system_time_state() -> dict[str, Any]:
    """What the Pi itself knows: timedatectl's NTPSynchronized, chrony's offset (empty when neither runs)."""
    state: dict[str, Any] = {}
    out = _run(["timedatectl", "show", "--property=NTPSynchronized", "--property=NTP"])
    if out:
        for line in out.splitlines():
            key, _, value = line.partition("=")
            if key == "NTPSynchronized":
                state["synchronized"] = value.strip() == "yes"
            elif key == "NTP":
                state["ntp_enabled"] = value.strip() == "yes"
        state["source"] = "timedatectl"
    out = _run(["chronyc", "tracking"])
    if out:
        for line in out.splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "System time" and value:
                parts = value.split()
                with contextlib.suppress(ValueError, IndexError):
                    seconds = float(parts[0])
                    state["chrony_offset"] = seconds if "fast" in value else -seconds
            elif key == "Leap status":
                state["chrony_synchronized"] = value != "Not synchronised"
        state["source"] = "chronyc" if "source" not in state else f"{state['source']}, chronyc"
    return state


def beacon_offset(beacon: dict[str, Any]) -> tuple[float | None, str]:
    """Offset of the local clock against the beacon (positive: the gateway is ahead), and how it was got."""
    try:
        ts = float(beacon["ts"]) / 1000
        received = float(beacon["received"])
    except (KeyError, TypeError, ValueError):
        return None, "the beacon has no timestamp"
    expiry, remaining = beacon.get("expiry"), beacon.get("remaining")
    if expiry is None or remaining is None:
        return None, "the beacon carries no Message Expiry Interval, so its age is unknown"
    age = max(0.0, float(expiry) - float(remaining))
    return received - (ts + age), f"beacon from {beacon.get('source', '?')}, {age:.0f} s old"


def clock_check(out: MqttOutcome | None, *, max_offset: float, now: Callable[[], float] = time.time,
                state: dict[str, Any] | None = None) -> Check:
    state = system_time_state() if state is None else state
    t = now()
    local = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    fix_ntp = ("enable network time (sudo timedatectl set-ntp true) and make sure NTP (UDP 123) reaches a server, "
               "or set FallbackNTP/NTP= to the site router in /etc/systemd/timesyncd.conf; set it once by hand with "
               "sudo date -u -s '<UTC time>' if there is no NTP at all. The Pi has no battery clock: after a power "
               "cut it starts at the time it was shut down")
    if t < EARLIEST_PLAUSIBLE:
        return Check("clock", "fail", f"the clock says {local}: it was never set", fix_ntp)
    details = [f"local time {local}"]
    synced = state.get("synchronized", state.get("chrony_synchronized"))
    if state:
        details.append(f"{state.get('source')}: " + ", ".join(f"{k}={v}" for k, v in state.items() if k != "source"))
    beacon = out.beacon if out is not None else None
    if beacon is not None:
        offset, how = beacon_offset(beacon)
        if offset is not None:
            details.append(f"offset {offset:+.1f} s against the central clock ({how})")
            if abs(offset) > max_offset:
                ahead = "ahead of" if offset > 0 else "behind"
                return Check("clock", "fail", f"the clock is {_duration(abs(offset))} {ahead} the central server "
                                              f"(allowed: {max_offset:g} s)", fix_ntp, details)
            if synced is False:
                return Check("clock", "warn", f"in step with the central server ({offset:+.1f} s), but the Pi "
                                              "reports it is not NTP-synchronised: it will drift", fix_ntp, details)
            return Check("clock", "pass", f"{offset:+.1f} s from the central server (allowed: {max_offset:g} s)",
                         details=details)
        details.append(how)
    elif out is not None and out.beacon_error:
        details.append(out.beacon_error)
    chrony = state.get("chrony_offset")
    if isinstance(chrony, float) and math.isfinite(chrony) and abs(chrony) > max_offset:
        return Check("clock", "fail", f"chrony reports the clock {chrony:+.1f} s off NTP time", fix_ntp, details)
    if synced is True:
        return Check("clock", "pass", f"NTP-synchronised ({state.get('source')}); no central time beacon to "
                                      "compare with", details=details)
    if synced is False:
        return Check("clock", "fail", "not NTP-synchronised, and no central time beacon to compare with", fix_ntp,
                     details)
    return Check("clock", "warn", "no time reference: no central time beacon and no timedatectl/chrony state",
                 f"ask the operator to run kwwk broker beacon on the central server (it publishes {TIME_TOPIC}), "
                 "or check the time by hand against a phone", details)


def _duration(seconds: float) -> str:
    if seconds >= 120:
        return f"{seconds / 60:.1f} minutes"
    return f"{seconds:.0f} s"


# ---------------------------------------------------------------------------------------------- outbox

def outbox_check(path: Path, *, max_mb: float, min_free_mb: float | None = None,
                 service_user: str | None = "kwwk") -> Check:
    """The outbox folder exists (or can be made), is writable, its database is sound, the disk has room."""
    path = Path(path)
    folder = path.parent
    details = [f"outbox {path}"]
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if probe_dir.exists() and not probe_dir.is_dir():
        return Check("outbox", "fail", f"{probe_dir} is a file, so the outbox folder {folder} cannot exist",
                     f"choose another outbox path (--outbox / KWWK_OUTBOX), or move {probe_dir} away", details)
    if probe_dir != folder:
        details.append(f"{folder} does not exist yet; the gateway creates it in {probe_dir}")
    try:
        fd, tmp = _tempfile(probe_dir)
        try:
            os.write(fd, os.urandom(64 * 1024))
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as err:
        return Check("outbox", "fail", f"cannot write in {probe_dir}: {err.strerror or err}",
                     f"make the folder writable for the gateway's user (sudo install -d -o kwwk -g kwwk -m 0750 {folder}) "
                     "and check the SD card is not mounted read-only (a failing card turns read-only)", details)
    owner_problem = _owner_problem(probe_dir, service_user)
    if owner_problem:
        return Check("outbox", "fail", owner_problem,
                     f"sudo chown -R {service_user}:{service_user} {probe_dir}", details)
    used = sum(p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}.seq")) if p.exists())
    if path.exists():
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            try:
                result = con.execute("PRAGMA quick_check").fetchone()[0]
            finally:
                con.close()
        except sqlite3.Error as err:
            result = str(err)
        if "locked" in result:  # a running gateway holds its outbox exclusively (gateway/store.py)
            return Check("outbox", "fail", "the outbox is in use: a gateway is running on it",
                         "stop it first (sudo systemctl stop kwwk-gateway), then verify again", details)
        if result != "ok":
            return Check("outbox", "fail", f"the outbox database is damaged: {result}",
                         f"stop the gateway, move {path} aside (keep it for the operator: it may hold unsent "
                         "readings), start the gateway again", details)
        details.append(f"existing outbox, {used / 2**20:.1f} MB, integrity ok")
    free = shutil.disk_usage(probe_dir).free
    need_mb = min_free_mb if min_free_mb is not None else max(0.0, max_mb - used / 2**20) + 64
    details.append(f"{free / 2**20:.0f} MB free; the outbox may grow to {max_mb:g} MB")
    if free < need_mb * 2**20:
        return Check("outbox", "fail", f"only {free / 2**20:.0f} MB free on the outbox's disk; {need_mb:.0f} MB needed",
                     "free space (sudo journalctl --vacuum-size=50M, remove old files), use a larger SD card, or "
                     "lower outbox.max_mb for this gateway in the cell config", details)
    return Check("outbox", "pass", f"writable, {free / 2**20:.0f} MB free (needs {need_mb:.0f} MB)", details=details)


def _tempfile(folder: Path) -> tuple[int, str]:
    name = str(folder / f".kwwk-verify-{uuid.uuid4().hex}")
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), name


def _owner_problem(folder: Path, user: str | None) -> str | None:
    """When run as root on the Pi: can the service user write the folder? (None when fine or unknowable)."""
    if not user or os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None
    st = folder.stat()
    if st.st_uid == pw.pw_uid and st.st_mode & 0o200:
        return None
    if st.st_gid == pw.pw_gid and st.st_mode & 0o020:
        return None
    if st.st_mode & 0o002:
        return None
    return f"{folder} is not writable by the gateway's user {user!r} (owner uid {st.st_uid}, mode {st.st_mode & 0o777:o})"


# ---------------------------------------------------------------------------------------------- secrets

def secrets_check(password_file: str | None, ca_file: str | None, tls: bool) -> Check:
    details = []
    if not password_file:
        return Check("secrets", "fail", "no MQTT password file configured",
                     "set gateways[].mqtt.password_file in the cell config or KWWK_MQTT_PASSWORD_FILE")
    p = Path(password_file)
    if not p.is_file():
        return Check("secrets", "fail", f"the MQTT password file {p} does not exist",
                     f"copy this gateway's password (written by kwwk broker acl on the central side) to {p}: "
                     f"sudo install -m 0640 -o root -g kwwk /dev/stdin {p}   (paste, then Ctrl-D)")
    mode = p.stat().st_mode & 0o777
    details.append(f"{p}: mode {mode:o}")
    try:
        text = p.read_text()
    except OSError as err:
        return Check("secrets", "fail", f"cannot read the MQTT password file {p}: {err.strerror or err}",
                     "run verify with sudo (the file is 0640 root:kwwk, as it should be)", details)
    if not text.strip():
        return Check("secrets", "fail", f"the MQTT password file {p} is empty", "put the gateway's password in it",
                     details)
    if tls and ca_file and not Path(ca_file).is_file():
        return Check("secrets", "fail", f"the broker's CA file {ca_file} does not exist",
                     f"copy the CA certificate of the broker to {ca_file}", details)
    if mode & 0o004:
        return Check("secrets", "warn", f"the MQTT password file {p} is readable by every user (mode {mode:o})",
                     f"sudo chown root:kwwk {p} && sudo chmod 0640 {p}", details)
    return Check("secrets", "pass", "password file present and private" + (", CA present" if tls and ca_file else ""),
                 details=details)
