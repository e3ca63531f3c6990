"""Broker security generated from the cell registry: Mosquitto's dynamic-security file, its password file and ACL,
and per-client secrets.

    summary = write_broker_files(load_cells("firmware_configs/cells"), out=Path("var/broker"),
                                 secrets=Path("var/secrets"))

Who may do what (everything else is denied, anonymous clients are refused by mosquitto.conf):

| account | write | read |
|---|---|---|
| each gateway | its own `kwwk/v1/<cell>/<gateway>/telemetry` and `/status` | its own `/resend`, the time beacon |
| each collector | every `kwwk/v1/+/+/resend`, `kwwk/v1/_deadletter/#`, the time beacon | the shared group, everything |
| the API (`api`) | nothing | every gateway's `kwwk/v1/+/+/status` (online/offline, outbox depth) |
| the time beacon (`beacon`, when asked for) | the time beacon | nothing |

What the broker enforces depends on the file it loads; both are written. `dynamic-security.json` (loaded by
firmware_configs/mosquitto/security.conf, the shipped deployment) is checked at SUBSCRIBE as well: a
gateway may subscribe to its own resend topic and the time beacon only, and only collectors may join the
collectors' shared group (`$share/kwwk-collectors/kwwk/v1/+/+/telemetry`). The `acl` file is checked at
PUBLISH and at delivery only: Mosquitto 2.0.11 grants every subscription with it (tested in
tests/test_broker_acl.py), so under it a gateway's credentials can join that group and be dealt a share of
everyone's telemetry, which the broker then discards. Keep `acl` for brokers without the plugin, knowing that.
With `use_username_as_clientid` (security.conf) each account is exactly one client: one collector account
per replica.

Passwords are random, one per account, kept in `<secrets>/<username>.password` (mode 0600) and
hashed into the password file in the format of `mosquitto_passwd` 2.0 (`$7$`: PBKDF2-HMAC-SHA512,
12-byte salt, 64-byte hash, base64). A re-run keeps every existing password and every existing hash
line byte for byte; new gateways get new passwords; `rotate` makes new ones on purpose.

Gateways may read the time beacon (`kwwk/v1/_time`, edge/messages.py) and collectors write it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from collector.ingest import SHARE_GROUP
from edge.cell import CellConfig
from edge.messages import TIME_TOPIC
from edge.telemetry import TOPIC_ROOT, resend_topic, status_topic, telemetry_topic

__all__ = [
    "DEFAULT_ITERATIONS",
    "Account",
    "BrokerFilesSummary",
    "accounts",
    "hash_password",
    "parse_password_file",
    "render_acl",
    "render_dynsec",
    "verify_password",
    "write_broker_files",
]

#: mosquitto_passwd 2.0's default (PW_DEFAULT_ITERATIONS); the random passwords carry the strength
DEFAULT_ITERATIONS = 101
SALT_BYTES = 12  # mosquitto's SALT_LEN
HASH_BYTES = 64  # SHA-512 output


# ---------------------------------------------------------------------------------------------- hashes

def hash_password(password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None) -> str:
    """The `$7$iterations$salt$hash` string mosquitto_passwd 2.0 writes (PBKDF2-HMAC-SHA512)."""
    if iterations < 1:
        msg = f"iterations must be >= 1, got {iterations}"
        raise ValueError(msg)
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, HASH_BYTES)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """True when password matches a `$7$` (PBKDF2-SHA512) or `$6$` (salted SHA-512, Mosquitto 1.x) hash."""
    parts = encoded.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            iterations, salt, want = int(parts[2]), base64.b64decode(parts[3]), base64.b64decode(parts[4])
            got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(want))
            return hmac.compare_digest(got, want)
        if len(parts) == 4 and parts[1] == "6":
            salt, want = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            got = hashlib.sha512(password.encode() + salt).digest()
            return hmac.compare_digest(got, want)
    except (ValueError, binascii.Error):
        return False
    return False


def parse_password_file(text: str) -> dict[str, str]:
    """{username: the whole line} of a Mosquitto password file (comments and blank lines skipped)."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        user = line.split(":", 1)[0]
        out[user] = line
    return out


# ---------------------------------------------------------------------------------------------- accounts

@dataclass(frozen=True)
class Account:
    username: str
    role: str  # "gateway", "collector", "api" or "beacon"
    cell: str | None = None
    gateway: str | None = None

    @property
    def label(self) -> str:
        if self.role == "gateway":
            return f"gateway {self.gateway} of cell {self.cell}"
        return f"{self.role} {self.username}"


def accounts(cells: Mapping[str, CellConfig], collectors: Iterable[str] = ("collector",),
             api: str | None = "api", beacon: str | None = None) -> list[Account]:
    """One account per gateway (its mqtt.username, else its id), per collector, one for the API (which only
    reads gateway status) and, when named, one for the time beacon; names must be unique."""
    out: list[Account] = []
    owner: dict[str, str] = {}

    def add(acct: Account) -> None:
        if ":" in acct.username or not acct.username.strip() or acct.username != acct.username.strip():
            msg = f"{acct.label}: {acct.username!r} cannot be a Mosquitto username (no ':' or surrounding blanks)"
            raise ValueError(msg)
        if acct.username in owner:
            msg = (f"MQTT username {acct.username!r} is used by {owner[acct.username]} and by {acct.label}: "
                   "give one of them its own gateways[].mqtt.username")
            raise ValueError(msg)
        owner[acct.username] = acct.label
        out.append(acct)

    for cell_id in sorted(cells):
        for gw in cells[cell_id].gateways:
            add(Account(gw.mqtt.username or gw.id, "gateway", cell_id, gw.id))
    for name in collectors:
        add(Account(name, "collector"))
    if api:
        add(Account(api, "api"))
    if beacon:
        add(Account(beacon, "beacon"))
    return out


def render_acl(accts: Iterable[Account]) -> str:
    """The Mosquitto ACL file: per-user grants only, so anything not listed is denied."""
    lines = [
        "# Mosquitto ACL for KWWK Telemetry, written by `kwwk broker acl` from the cell registry.",
        "# Do not edit by hand: change the cell files and run the command again. Anything not granted",
        "# here is denied. Reload Mosquitto after a change (SIGHUP: docker compose kill -s HUP mosquitto).",
        "",
    ]
    for a in accts:
        if a.role == "gateway":
            assert a.cell is not None and a.gateway is not None
            lines += [
                f"# {a.label}: writes only its own telemetry and status, reads only its own resend requests",
                f"user {a.username}",
                f"topic write {telemetry_topic(a.cell, a.gateway)}",
                f"topic write {status_topic(a.cell, a.gateway)}",
                f"topic read {resend_topic(a.cell, a.gateway)}",
                f"topic read {TIME_TOPIC}",
                "",
            ]
        elif a.role == "api":
            lines += [
                f"# {a.label}: reads gateway status only (online/offline, outbox depth); writes nothing",
                f"user {a.username}",
                f"topic read {TOPIC_ROOT}/+/+/status",
                "",
            ]
        elif a.role == "beacon":
            lines += [f"# {a.label}: keeps the time beacon", f"user {a.username}", f"topic write {TIME_TOPIC}", ""]
        else:
            lines += [
                f"# {a.label}: reads everything, asks gateways for resends, files dead letters, keeps the time beacon",
                f"user {a.username}",
                "topic read #",
                f"topic write {TOPIC_ROOT}/+/+/resend",
                f"topic write {TOPIC_ROOT}/_deadletter/#",
                f"topic write {TIME_TOPIC}",
                "",
            ]
    return "\n".join(lines)


def _grants(a: Account) -> list[tuple[str, str]]:
    """(dynamic-security ACL type, topic) granted to an account; everything else is denied."""
    if a.role == "gateway":
        assert a.cell is not None and a.gateway is not None
        own = [resend_topic(a.cell, a.gateway), TIME_TOPIC]
        return ([("publishClientSend", telemetry_topic(a.cell, a.gateway)),
                 ("publishClientSend", status_topic(a.cell, a.gateway))]
                + [("subscribeLiteral", t) for t in own] + [("publishClientReceive", t) for t in own])
    if a.role == "api":
        status = f"{TOPIC_ROOT}/+/+/status"
        return [("subscribePattern", status), ("publishClientReceive", status)]
    if a.role == "beacon":
        return [("publishClientSend", TIME_TOPIC)]
    return [  # a collector: joins the collectors' shared group (a literal: no other group), reads under kwwk/v1/
        ("subscribeLiteral", f"$share/{SHARE_GROUP}/{TOPIC_ROOT}/+/+/telemetry"),
        ("subscribePattern", f"{TOPIC_ROOT}/#"), ("publishClientReceive", f"{TOPIC_ROOT}/#"),
        ("publishClientSend", f"{TOPIC_ROOT}/+/+/resend"), ("publishClientSend", f"{TOPIC_ROOT}/_deadletter/#"),
        ("publishClientSend", TIME_TOPIC)]


def render_dynsec(accts: Iterable[Account], hashes: Mapping[str, str]) -> str:
    """Mosquitto's dynamic-security plugin configuration: one client and one role per account, each client with
    its `$7$` hash from `hashes` (username -> hash, as in the password file); nothing is allowed by default,
    not even subscribing. The plugin has no admin account here: the file is regenerated, not edited live."""
    clients, roles = [], []
    for a in accts:
        parts = hashes[a.username].split("$")
        if len(parts) != 5 or parts[1] != "7":
            msg = (f"{a.label}: its password hash is not mosquitto_passwd 2.0's $7$ format, which the "
                   f"dynamic-security plugin needs: run again with --rotate {a.username}")
            raise ValueError(msg)
        role = f"{a.role}:{a.username}"
        clients.append({"username": a.username, "textName": a.label, "password": parts[4], "salt": parts[3],
                        "iterations": int(parts[2]), "roles": [{"rolename": role}]})
        roles.append({"rolename": role, "acls": [{"acltype": kind, "topic": topic, "priority": 0, "allow": True}
                                                 for kind, topic in _grants(a)]})
    return json.dumps({"defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                                            "subscribe": False, "unsubscribe": True},
                       "clients": clients, "groups": [], "roles": roles}, indent=1) + "\n"


# ---------------------------------------------------------------------------------------------- files

@dataclass
class BrokerFilesSummary:
    password_file: Path
    acl_file: Path
    dynsec_file: Path
    created: list[str] = field(default_factory=list)  # new account, new password
    kept: list[str] = field(default_factory=list)  # existing password and hash line unchanged
    rehashed: list[str] = field(default_factory=list)  # secret file present, hash missing or stale
    rotated: list[str] = field(default_factory=list)  # new password on request
    kept_without_secret: list[str] = field(default_factory=list)  # hash kept, but no secret file to hand out
    removed: list[str] = field(default_factory=list)  # in the old password file, no longer in the registry
    secret_files: dict[str, Path] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.rehashed or self.rotated or self.removed)


def _write_private(path: Path, text: str, mode: int) -> None:
    """Write atomically; the file never exists with wider permissions than mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def new_password() -> str:
    """A random password: 32 URL-safe characters, 192 bits."""
    return secrets.token_urlsafe(24)


def write_broker_files(cells: Mapping[str, CellConfig], out: Path, secrets_dir: Path, *,
                       collectors: Iterable[str] = ("collector",), rotate: Iterable[str] = (),
                       iterations: int = DEFAULT_ITERATIONS, beacon: str | None = None) -> BrokerFilesSummary:
    """Write <out>/dynamic-security.json (0600), <out>/passwd (0600), <out>/acl (0644) and
    <secrets_dir>/<username>.password (0600). Both broker files carry the same hashes.

    Idempotent: an account whose secret file exists keeps that password, and its hash line is kept
    byte for byte when it still matches; an account without a secret file gets a new password,
    unless the old password file has a hash for it (then the hash is kept so the device keeps
    working, and the account is listed in kept_without_secret: rotate it to hand out a password).
    """
    out, secrets_dir = Path(out), Path(secrets_dir)
    accts = accounts(cells, collectors, beacon=beacon)
    rotate = set(rotate)
    unknown = rotate - {a.username for a in accts}
    if unknown:
        msg = f"cannot rotate {', '.join(sorted(unknown))}: no such account in the registry"
        raise ValueError(msg)
    passwd_path, acl_path, dynsec_path = out / "passwd", out / "acl", out / "dynamic-security.json"
    old = parse_password_file(passwd_path.read_text()) if passwd_path.exists() else {}
    summary = BrokerFilesSummary(passwd_path, acl_path, dynsec_path)
    lines: list[str] = []
    for a in accts:
        secret_path = secrets_dir / f"{a.username}.password"
        summary.secret_files[a.username] = secret_path
        old_line = old.get(a.username)
        old_hash = old_line.split(":", 1)[1] if old_line else None
        if a.username in rotate:
            password = new_password()
            _write_private(secret_path, password + "\n", 0o600)
            lines.append(f"{a.username}:{hash_password(password, iterations=iterations)}")
            summary.rotated.append(a.username)
        elif secret_path.exists():
            password = secret_path.read_text().strip()
            if not password:
                msg = f"{secret_path} is empty: delete it for a new password, or put the password in it"
                raise ValueError(msg)
            if old_line is not None and old_hash is not None and verify_password(password, old_hash):
                lines.append(old_line)
                summary.kept.append(a.username)
            else:
                lines.append(f"{a.username}:{hash_password(password, iterations=iterations)}")
                summary.rehashed.append(a.username)
        elif old_line is not None:
            lines.append(old_line)
            summary.kept_without_secret.append(a.username)
        else:
            password = new_password()
            _write_private(secret_path, password + "\n", 0o600)
            lines.append(f"{a.username}:{hash_password(password, iterations=iterations)}")
            summary.created.append(a.username)
    summary.removed = sorted(set(old) - {a.username for a in accts})
    hashes = {line.split(":", 1)[0]: line.split(":", 1)[1] for line in lines}
    dynsec = render_dynsec(accts, hashes)  # before anything is written: a stale hash format fails cleanly
    _write_private(passwd_path, "\n".join(lines) + "\n", 0o600)
    _write_private(acl_path, render_acl(accts), 0o644)
    _write_private(dynsec_path, dynsec, 0o600)
    return summary
