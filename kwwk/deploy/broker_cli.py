"""`kwwk broker` subcommands: Mosquitto's access control from the cell registry, and the time beacon.

    kwwk broker acl --cells firmware_configs/cells --out var/broker --secrets var/secrets
    kwwk broker beacon --mqtt-host broker.example --mqtt-username beacon --mqtt-password-file var/secrets/beacon.password
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edge.errors import cli_errors, fail

app = typer.Typer(help="Broker security generated from the cell registry.", no_args_is_help=True,
                  epilog="Example: kwwk broker acl --cells firmware_configs/cells --out var/broker")


@app.command("acl", epilog="Example: kwwk broker acl --cells firmware_configs/cells --out var/broker "
                           "--secrets var/secrets")
def acl(
    cells: Annotated[Path, typer.Option("--cells", help="folder of cell config files", envvar="KWWK_CELLS")]
    = Path("firmware_configs/cells"),
    out: Annotated[Path, typer.Option("--out", help="where dynamic-security.json, passwd and acl are written (Mosquitto's secrets)")]
    = Path("var/broker"),
    secrets: Annotated[Path, typer.Option("--secrets", help="where each account's password is kept "
                                                            "(<username>.password, mode 0600)")] = Path("var/secrets"),
    collector: Annotated[list[str] | None, typer.Option(
        "--collector", help="collector account, one per replica (repeat for several); default: collector")] = None,
    beacon: Annotated[str, typer.Option("--beacon", help="the time beacon's account ('' for none)")] = "beacon",
    rotate: Annotated[list[str] | None, typer.Option(
        "--rotate", help="give this account a new password (repeat for several)")] = None,
    iterations: Annotated[int, typer.Option(help="PBKDF2 iterations (mosquitto_passwd 2.0 uses 101)")] = 101,
) -> None:
    """Write Mosquitto's dynamic-security file (plus passwd and acl) from the cell registry.

    Each gateway may write only its own telemetry and status topics and subscribe only to its own
    resend topic and the time beacon; collectors join the shared group, read everything and write
    resend requests, dead letters and the time beacon; the beacon account writes the beacon; nobody
    else may write. The broker makes each client id its username: one collector account per replica.
    Existing passwords are kept on every re-run; new accounts get new random passwords. Hand each
    gateway its secret file; restart Mosquitto after a change (the plugin reads its file at start only).
    """
    from edge.cell import load_cells
    from kwwk.deploy.broker import write_broker_files

    with cli_errors(ValueError):
        registry = load_cells(cells)
        summary = write_broker_files(registry, out, secrets, collectors=collector or ["collector"],
                                     rotate=rotate or [], iterations=iterations, beacon=beacon or None)
    typer.echo(f"wrote {summary.dynsec_file}, {summary.password_file} and {summary.acl_file}")
    for label, names in (("new password", summary.created), ("kept", summary.kept),
                         ("re-hashed from its secret file", summary.rehashed), ("rotated", summary.rotated),
                         ("removed (no longer in the registry)", summary.removed)):
        for name in names:
            where = f"  -> {summary.secret_files[name]}" if name in summary.secret_files else ""
            typer.echo(f"  {name}: {label}{where}")
    for name in summary.kept_without_secret:
        typer.secho(f"  {name}: kept its existing hash, but {summary.secret_files[name]} is missing: the password "
                    f"cannot be handed out; run again with --rotate {name} to make a new one", fg=typer.colors.YELLOW)
    if summary.changed:
        # Mosquitto 2.0.11's dynamic-security plugin does not re-read its file on SIGHUP (tested): restart it;
        # sessions and queued messages survive in its persistence file
        typer.echo("to reload Mosquitto's access control, restart it: docker compose restart mosquitto   "
                   "(or: systemctl restart mosquitto)")


@app.command("beacon", epilog="Example: kwwk broker beacon --mqtt-host broker.example --mqtt-port 8883 --mqtt-tls "
                              "--mqtt-username beacon --mqtt-password-file var/secrets/beacon.password")
def beacon(
    mqtt_host: Annotated[str, typer.Option("--mqtt-host", envvar="KWWK_MQTT_HOST")] = "127.0.0.1",
    mqtt_port: Annotated[int, typer.Option("--mqtt-port", envvar="KWWK_MQTT_PORT")] = 1883,
    mqtt_username: Annotated[str | None, typer.Option("--mqtt-username", envvar="KWWK_MQTT_USERNAME")] = None,
    mqtt_password_file: Annotated[Path | None, typer.Option("--mqtt-password-file", envvar="KWWK_MQTT_PASSWORD_FILE")]
    = None,
    mqtt_tls: Annotated[bool, typer.Option("--mqtt-tls/--no-mqtt-tls", envvar="KWWK_MQTT_TLS")] = False,
    mqtt_ca: Annotated[str | None, typer.Option("--mqtt-ca", envvar="KWWK_MQTT_CA")] = None,
    interval: Annotated[float, typer.Option(help="seconds between beacons; 0 publishes once and exits")] = 60.0,
    expiry: Annotated[int, typer.Option(help="Message Expiry Interval of each beacon, seconds")] = 3600,
) -> None:
    """Keep a retained time beacon (this machine's clock) on kwwk/v1/_time, for offline clock checks.

    Run it on the central server, whose clock is NTP-synchronised, under the beacon account (its own:
    the broker makes the client id the username, so a shared account would knock the other client off).
    `kwwk commission verify` on a gateway reads the beacon and corrects for its age with the
    remaining Message Expiry Interval Mosquitto sends along, so the check needs no NTP on site.
    """
    import threading
    import time

    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from edge.messages import TIME_TOPIC, time_beacon_payload
    from edge.mqtt import MqttSettings, connect_kwargs, paho_client, read_password_file

    with cli_errors(OSError):
        password = read_password_file(mqtt_password_file) if mqtt_username and mqtt_password_file else None
        settings = MqttSettings(host=mqtt_host, port=mqtt_port, username=mqtt_username, password=password,
                                tls=mqtt_tls, ca_file=mqtt_ca)
        client = paho_client(settings, client_id_prefix="kwwk-beacon")
    acked = threading.Event()
    result: dict[str, object] = {}

    def on_publish(_c: object, _u: object, _mid: int, reason: object, _p: object) -> None:
        result["reason"] = reason
        acked.set()

    connected = threading.Event()

    def on_connect(_c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        result["connack"] = reason
        connected.set()

    client.on_publish = on_publish
    client.on_connect = on_connect
    try:
        client.connect(**connect_kwargs(settings))
    except OSError as err:
        fail(f"cannot reach the broker at {settings.address}: {err}", 1)
    client.loop_start()
    try:
        if not connected.wait(10) or getattr(result.get("connack"), "is_failure", True):
            fail(f"the broker refused the connection: {result.get('connack', 'no answer')}", 1)
        while True:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = expiry
            acked.clear()
            client.publish(TIME_TOPIC, time_beacon_payload(expiry), qos=1, retain=True, properties=props)
            if not acked.wait(10):
                fail("the broker did not acknowledge the beacon", 1)
            reason = result.get("reason")
            if getattr(reason, "is_failure", False):
                fail(f"the broker refused the beacon: {reason} (does the ACL let this account write {TIME_TOPIC}?)", 1)
            if interval <= 0:
                typer.echo(f"published the time beacon on {TIME_TOPIC}")
                return
            time.sleep(interval)
    finally:
        client.disconnect()
        client.loop_stop()
