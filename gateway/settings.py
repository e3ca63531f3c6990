"""The gateway's broker, outbox and service settings, resolved once for `kwwk gateway run` and `commission verify`.

Each setting is taken from the first of these that has it:

1. the command line (`--mqtt-host`, ...; typer passes only what was given),
2. the environment (`KWWK_MQTT_HOST`, ...; what systemd sets from `EnvironmentFile=`),
3. the env file (`--env-file`, default /etc/kwwk/gateway.env when it exists: see firmware_configs/pi/),
4. the gateway's entry in the cell config (`mqtt: {username, password_file}`),
5. the default.

So `commission verify` checks exactly the broker, account, TLS and outbox the gateway will use, and
`--print-settings` on either command shows them with where each came from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edge.errors import SettingsError
from edge.mqtt import MqttSettings, read_password_file

if TYPE_CHECKING:
    from edge.cell import CellConfig

__all__ = [
    "DEFAULT_ENV_FILE", "ENV", "PI_OUTBOX", "GatewayFlags", "GatewaySettings", "gateway_client_id", "gateway_mqtt",
    "read_env_file", "resolve",
]

DEFAULT_ENV_FILE = Path("/etc/kwwk/gateway.env")
#: on an installed Pi (systemd's StateDirectory=kwwk makes /var/lib/kwwk) the outbox lives here
PI_OUTBOX = Path("/var/lib/kwwk/outbox.sqlite")
#: a gateway's session survives a week of uplink outage, so resend requests queued meanwhile still arrive
GATEWAY_SESSION_EXPIRY_S = 7 * 86400

#: setting -> its environment variable (also its name in the env file)
ENV = {
    "gateway": "KWWK_GATEWAY",
    "host": "KWWK_MQTT_HOST",
    "port": "KWWK_MQTT_PORT",
    "tls": "KWWK_MQTT_TLS",
    "ca_file": "KWWK_MQTT_CA",
    "username": "KWWK_MQTT_USERNAME",
    "password_file": "KWWK_MQTT_PASSWORD_FILE",
    "outbox": "KWWK_OUTBOX",
    "health_port": "KWWK_HEALTH_PORT",
    "log_level": "KWWK_LOG_LEVEL",
}


def gateway_client_id(gateway: str) -> str:
    """Fixed per gateway: it names the gateway's persistent session on the broker."""
    return f"kwwk-gw-{gateway}"


def gateway_mqtt(gateway: str | None = None, **fields: Any) -> MqttSettings:
    """MqttSettings with the gateway's session and reconnect defaults (fields override them).

    Reconnect delays are capped by MqttSettings' reconnect_max_s (2 s), not raised for the gateway: a cap of
    30 s kept gateways off a returned broker for up to 20 s (issue 15); edge/backoff.py says why 2 s with
    jitter does not storm the broker."""
    base: dict[str, Any] = {"session_expiry_s": GATEWAY_SESSION_EXPIRY_S, "reconnect_min_s": 1.0}
    if gateway is not None:
        base["client_id"] = gateway_client_id(gateway)
    return MqttSettings(**{**base, **fields})


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a systemd EnvironmentFile (comments, blanks, `export` and quotes handled)."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        msg = f"cannot read the environment file {path}: {err.strerror or err}"
        raise SettingsError(msg) from None
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        values[key.strip()] = value.strip().strip("'\"")
    return values


# ---------------------------------------------------------------------------------------------- command line

@dataclass(frozen=True)
class GatewayFlags:
    """What the command line said; None: not given (then the environment, env file, cell config or default)."""

    gateway: str | None = None
    env_file: Path | None = None
    mqtt_host: str | None = None
    mqtt_port: int | None = None
    mqtt_username: str | None = None
    mqtt_password_file: str | None = None
    mqtt_tls: bool | None = None
    mqtt_ca: str | None = None
    outbox: Path | None = None
    health_port: int | None = None
    log_level: str | None = None


def _opt(*names: str, env: str | None, help: str) -> Any:  # noqa: A002 - typer's word
    """A typer option without envvar=: resolve() reads the environment, after the command line and before the
    env file. The variable is named in the help instead."""
    return typer.Option(*names, help=f"{help}; env {env}" if env else help, show_default=False)


GatewayOpt = Annotated[str | None, _opt("--gateway", env=ENV["gateway"],
                                        help="gateway id in the cell config (default: its only gateway)")]
EnvFileOpt = Annotated[Path | None, _opt("--env-file", env=None,
                                         help=f"the gateway's environment file (default {DEFAULT_ENV_FILE} when "
                                              "it exists)")]
MqttHostOpt = Annotated[str | None, _opt("--mqtt-host", env=ENV["host"], help="broker host (default 127.0.0.1)")]
MqttPortOpt = Annotated[int | None, _opt("--mqtt-port", env=ENV["port"],
                                         help="broker port (default 8883 with TLS, else 1883)")]
MqttUserOpt = Annotated[str | None, _opt("--mqtt-username", env=ENV["username"],
                                         help="MQTT account (default: the cell config's mqtt.username, else the "
                                              "gateway id)")]
MqttPassOpt = Annotated[str | None, _opt("--mqtt-password-file", env=ENV["password_file"],
                                         help="file holding the password, never the password itself (default: the "
                                              "cell config's mqtt.password_file)")]
MqttTlsOpt = Annotated[bool | None, _opt("--mqtt-tls/--no-mqtt-tls", env=ENV["tls"], help="TLS (default off)")]
MqttCaOpt = Annotated[str | None, _opt("--mqtt-ca", env=ENV["ca_file"],
                                       help="CA certificate (PEM) of the broker (default: the system's CAs)")]
OutboxOpt = Annotated[Path | None, _opt("--outbox", env=ENV["outbox"],
                                        help=f"outbox file (default {PI_OUTBOX} on an installed Pi, else "
                                             "var/gateway/<id>.sqlite)")]
PrintSettingsOpt = Annotated[bool, typer.Option("--print-settings",
                                                help="print the resolved settings and where each came from, as "
                                                     "JSON, and exit")]


# ---------------------------------------------------------------------------------------------- resolution

@dataclass(frozen=True)
class GatewaySettings:
    gateway: str
    mqtt: MqttSettings  # password included when its file could be read
    password_file: str | None
    outbox: Path
    health_port: int
    log_level: str
    password_error: str | None = None  # why the password file could not be read (verify reports it as a check)
    sources: dict[str, str] = field(default_factory=dict)  # setting -> where it came from

    @property
    def username(self) -> str | None:
        return self.mqtt.username

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id

    def as_dict(self) -> dict[str, Any]:
        """Everything but the password, for --print-settings."""
        m = self.mqtt
        return {"gateway": self.gateway, "host": m.host, "port": m.port, "tls": m.tls, "ca_file": m.ca_file,
                "username": m.username, "password_file": self.password_file, "password_read": m.password is not None,
                "client_id": m.client_id, "session_expiry_s": m.session_expiry_s, "outbox": str(self.outbox),
                "health_port": self.health_port, "log_level": self.log_level, "sources": dict(self.sources)}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


def _truthy(value: str, where: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    msg = f"{where}: {value!r} is not a yes/no value (true, false, 1, 0, yes, no, on, off)"
    raise SettingsError(msg)


def _integer(value: str, where: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        msg = f"{where}: {value!r} is not a number"
        raise SettingsError(msg) from None


def resolve(cfg: CellConfig, flags: GatewayFlags = GatewayFlags(), *, environ: Mapping[str, str] | None = None,
            default_env_file: Path = DEFAULT_ENV_FILE, pi_outbox: Path = PI_OUTBOX) -> GatewaySettings:
    """The settings the gateway of `cfg` runs with: flag > environment > env file > cell config > default.

    Raises SettingsError for a missing env file, a value that cannot be used, or no way to tell the gateway.
    """
    environ = os.environ if environ is None else environ
    if flags.env_file is not None:
        if not flags.env_file.is_file():
            msg = f"environment file {flags.env_file} does not exist"
            raise SettingsError(msg)
        env_file: Path | None = flags.env_file
    else:
        env_file = default_env_file if default_env_file.is_file() else None
    file_values = read_env_file(env_file) if env_file is not None else {}
    sources: dict[str, str] = {}

    def pick(name: str, flag: Any, cell: Any = None, default: Any = None,
             convert: Callable[[str, str], Any] = lambda v, _w: v) -> Any:
        var = ENV[name]
        if flag is not None:
            sources[name] = "command line"
            return flag
        for value, where in ((environ.get(var), "environment"), (file_values.get(var), f"env file {env_file}")):
            if value is not None and value.strip():
                sources[name] = where
                return convert(value.strip(), f"{var} in the {where}")
        if cell is not None:
            sources[name] = f"cell config {cfg.source or cfg.cell.id}"
            return cell
        sources[name] = "default"
        return default

    gateway_id = pick("gateway", flags.gateway)
    if gateway_id is None:
        if len(cfg.gateways) != 1:
            msg = f"give --gateway (or {ENV['gateway']}): the cell has {', '.join(g.id for g in cfg.gateways)}"
            raise SettingsError(msg)
        gateway_id = cfg.gateways[0].id
        sources["gateway"] = "the cell's only gateway"
    try:
        gw = cfg.gateway(gateway_id)
    except LookupError as err:
        raise SettingsError(str(err)) from None
    host = pick("host", flags.mqtt_host, default="127.0.0.1")
    tls = pick("tls", flags.mqtt_tls, default=False, convert=_truthy)
    port = pick("port", flags.mqtt_port, default=8883 if tls else 1883, convert=_integer)
    if sources["port"] == "default":
        sources["port"] = f"default ({'TLS' if tls else 'plain MQTT'})"
    ca_file = pick("ca_file", flags.mqtt_ca)
    username = pick("username", flags.mqtt_username, cell=gw.mqtt.username, default=gw.id)
    password_file = pick("password_file", flags.mqtt_password_file, cell=gw.mqtt.password_file)
    pi_default = pi_outbox if pi_outbox.parent.is_dir() else Path("var/gateway") / f"{gw.id}.sqlite"
    outbox = Path(pick("outbox", flags.outbox, default=pi_default))
    health_port = pick("health_port", flags.health_port, default=9102, convert=_integer)
    log_level = pick("log_level", flags.log_level, default="INFO")
    password, password_error = None, None
    if password_file:
        try:
            password = read_password_file(password_file)
        except SettingsError as err:
            password_error = str(err)
    mqtt = gateway_mqtt(gw.id, host=host, port=port, username=username, password=password, tls=tls, ca_file=ca_file)
    sources["client_id"] = "the gateway id"
    return GatewaySettings(gw.id, mqtt, password_file, outbox, health_port, log_level, password_error, sources)
