"""One way to reach the broker: the connection settings every MQTT client of the product uses, and the client factory.

The gateway's uplink (aiomqtt), the collector, the API's status watcher, the time beacon and `kwwk commission
verify` (paho-mqtt) all build their client here, so TLS, credentials, client ids, session expiry and reconnect
delays mean the same thing everywhere. Where settings come from (flags, environment, env file, cell config) is
the caller's business: see gateway/settings.py for the gateway's.

    settings = MqttSettings(host="broker.example", port=8883, tls=True, ca_file="/etc/kwwk/ca.crt")
    client = paho_client(settings, client_id_prefix="kwwk-api")   # callbacks are the caller's
    client.connect_async(**connect_kwargs(settings))
"""

from __future__ import annotations

import dataclasses
import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.backoff import Backoff
from edge.errors import SettingsError

if TYPE_CHECKING:  # paho-mqtt is in the gateway and the collector extras, imported when a client is made
    import paho.mqtt.client
    from paho.mqtt.properties import Properties

__all__ = [
    "MqttSettings", "aiomqtt_client_kwargs", "connect_kwargs", "connect_properties", "paho_client",
    "read_password_file",
]


@dataclass(frozen=True)
class MqttSettings:
    """Where the broker is, who we are, and how hard we try to get back to it."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None  # None: the system's CAs
    cert_file: str | None = None  # a client certificate, for listeners that require one
    key_file: str | None = None
    client_id: str = ""  # "" = the factory makes "<prefix>-<random>" (a client with nothing to resume)
    keepalive: int = 30
    #: 0: the session ends with the connection (and the client starts clean); > 0: it is resumed after a reconnect
    session_expiry_s: int = 0
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 2.0

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context for the connection, or None for plain MQTT. Raises OSError/SSLError for bad files."""
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def clean_start(self) -> bool:
        """A session that outlives its connection is resumed; any other starts clean."""
        return self.session_expiry_s <= 0

    def replace(self, **changes: Any) -> MqttSettings:
        return dataclasses.replace(self, **changes)

    def identifier(self, client_id_prefix: str = "kwwk") -> str:
        """The client id: the configured one, else a fresh random one under the prefix."""
        return self.client_id or f"{client_id_prefix}-{secrets.token_hex(4)}"

    def backoff(self) -> Backoff:
        """Reconnect delays for loops we drive ourselves (the aiomqtt uplink): the same bounds paho's loop gets."""
        return Backoff(self.reconnect_min_s, max(self.reconnect_min_s, self.reconnect_max_s))


def read_password_file(path: str | Path) -> str:
    """The password kept in a file (passwords never go on a command line); SettingsError when it cannot be read."""
    try:
        return Path(path).read_text().strip()
    except OSError as err:
        msg = f"cannot read the password file {path}: {err.strerror or err}"
        raise SettingsError(msg) from None


def connect_properties(settings: MqttSettings, **extra: int) -> Properties:
    """CONNECT properties: the Session Expiry Interval, plus extras such as ReceiveMaximum=500."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = settings.session_expiry_s
    for name, value in extra.items():
        setattr(props, name, value)
    return props


def paho_client(settings: MqttSettings, *, client_id_prefix: str = "kwwk",
                manual_ack: bool = False) -> paho.mqtt.client.Client:
    """A paho-mqtt client (MQTT v5, callback API 2) with credentials, TLS and reconnect delays set; not connected.

    Connect it with `client.connect(**connect_kwargs(settings))` (or connect_async). Raises OSError/SSLError
    when the TLS files cannot be loaded.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=settings.identifier(client_id_prefix),
                         protocol=mqtt.MQTTv5, manual_ack=manual_ack)
    if settings.username:
        client.username_pw_set(settings.username, settings.password)
    ctx = settings.tls_context()
    if ctx is not None:
        client.tls_set_context(ctx)
    client.reconnect_delay_set(settings.reconnect_min_s, max(settings.reconnect_min_s, settings.reconnect_max_s))  # type: ignore[arg-type]
    return client


def connect_kwargs(settings: MqttSettings, **extra_properties: int) -> dict[str, Any]:
    """Keyword arguments for paho's connect()/connect_async(): address, keepalive, clean start, properties."""
    return {"host": settings.host, "port": settings.port, "keepalive": settings.keepalive,
            "clean_start": settings.clean_start, "properties": connect_properties(settings, **extra_properties)}


def aiomqtt_client_kwargs(settings: MqttSettings, *, client_id_prefix: str = "kwwk") -> dict[str, Any]:
    """Keyword arguments for aiomqtt.Client(**kwargs): the same connection paho_client makes, for asyncio code.

    aiomqtt does not reconnect by itself: drive the loop with settings.backoff().
    """
    import aiomqtt

    return {"hostname": settings.host, "port": settings.port, "username": settings.username,
            "password": settings.password, "identifier": settings.identifier(client_id_prefix),
            "protocol": aiomqtt.ProtocolVersion.V5, "keepalive": settings.keepalive,
            "tls_context": settings.tls_context(), "clean_start": settings.clean_start,
            "properties": connect_properties(settings)}
