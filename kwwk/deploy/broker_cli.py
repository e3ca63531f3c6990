"""`kwwk broker` subcommands: Mosquitto's password file and ACL from the cell registry, and the time beacon.

    kwwk broker acl --cells firmware_configs/cells --out var/broker --secrets var/secrets
    kwwk broker beacon --mqtt-host broker.example --mqtt-username collector --mqtt-password-file var/secrets/collector.password
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Broker security generated from the cell registry.", no_args_is_help=True,
                  epilog="Example: kwwk broker acl --cells firmware_configs/cells --out var/broker")


@app.command("acl", epilog="Example: kwwk broker acl --cells firmware_configs/cells --out var/broker "
                           "--secrets var/secrets")
def acl(
    cells: Annotated[Path, typer.Option("--cells", help="folder of cell config files", envvar="KWWK_CELLS")]
    = Path("firmware_configs/cells"),
    out: Annotated[Path, typer.Option("--out", help="where passwd and acl are written (Mosquitto's secrets)")]
    = Path("var/broker"),
    secrets: Annotated[Path, typer.Option("--secrets", help="where each account's password is kept "
                                                            "(<username>.password, mode 0600)")] = Path("var/secrets"),
    collector: Annotated[list[str] | None, typer.Option(
        "--collector", help="collector account (repeat for several); default: collector")] = None,
    rotate: Annotated[list[str] | None, typer.Option(
        "--rotate", help="give this account a new password (repeat for several)")] = None,
    iterations: Annotated[int, typer.Option(help="PBKDF2 iterations (mosquitto_passwd 2.0 uses 101)")] = 101,
) -> None:
    """Write Mosquitto's password file and ACL from the cell registry.

    Each gateway may write only its own telemetry and status topics and read only its own resend
    topic; collectors read everything and write resend requests, dead letters and the time beacon;
    nobody else may write. Existing passwords are kept on every re-run; new gateways get new random
    passwords. Hand each gateway its secret file; reload Mosquitto (SIGHUP) after a change.
    """
    from edge.cell import load_cells
    from edge.yamlio import ConfigError
    from kwwk.deploy.broker import write_broker_files

    try:
        registry = load_cells(cells)
        summary = write_broker_files(registry, out, secrets, collectors=collector or ["collector"],
                                     rotate=rotate or [], iterations=iterations)
    except (ConfigError, ValueError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {summary.password_file} and {summary.acl_file}")
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
        typer.echo("reload Mosquitto to apply: docker compose kill -s HUP mosquitto   (or: systemctl reload mosquitto)")


@app.command("beacon", epilog="Example: kwwk broker beacon --mqtt-host broker.example --mqtt-port 8883 --mqtt-tls "
                              "--mqtt-username collector --mqtt-password-file var/secrets/collector.password")
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

    Run it on the central server, whose clock is NTP-synchronised, under a collector account.
    `kwwk commission verify` on a gateway reads the beacon and corrects for its age with the
    remaining Message Expiry Interval Mosquitto sends along, so the check needs no NTP on site.
    """
    import ssl
    import threading
    import time

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from edge.messages import TIME_TOPIC, time_beacon_payload

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"kwwk-beacon-{int(time.time())}",
                         protocol=mqtt.MQTTv5)
    if mqtt_username:
        password = mqtt_password_file.read_text().strip() if mqtt_password_file else None
        client.username_pw_set(mqtt_username, password)
    if mqtt_tls:
        client.tls_set_context(ssl.create_default_context(cafile=mqtt_ca))
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
        client.connect(mqtt_host, mqtt_port, keepalive=30)
    except OSError as err:
        typer.secho(f"error: cannot reach the broker at {mqtt_host}:{mqtt_port}: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    client.loop_start()
    try:
        if not connected.wait(10) or getattr(result.get("connack"), "is_failure", True):
            typer.secho(f"error: the broker refused the connection: {result.get('connack', 'no answer')}",
                        fg=typer.colors.RED, err=True)
            raise typer.Exit(1)
        while True:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = expiry
            acked.clear()
            client.publish(TIME_TOPIC, time_beacon_payload(expiry), qos=1, retain=True, properties=props)
            if not acked.wait(10):
                typer.secho("error: the broker did not acknowledge the beacon", fg=typer.colors.RED, err=True)
                raise typer.Exit(1)
            reason = result.get("reason")
            if getattr(reason, "is_failure", False):
                typer.secho(f"error: the broker refused the beacon: {reason} (does the ACL let this account write "
                            f"{TIME_TOPIC}?)", fg=typer.colors.RED, err=True)
                raise typer.Exit(1)
            if interval <= 0:
                typer.echo(f"published the time beacon on {TIME_TOPIC}")
                return
            time.sleep(interval)
    finally:
        client.disconnect()
        client.loop_stop()
