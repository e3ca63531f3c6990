"""The one `kwwk` command. Each subcommand imports its part lazily, so a gateway needs only the gateway extra."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from edge.errors import SettingsError, cli_errors
from gateway import settings as gs  # the gateway's options: `gateway run` and `commission verify` share them

app = typer.Typer(help="KWWK Telemetry: closed heat-water-power loops made visible.", no_args_is_help=True,
                  pretty_exceptions_enable=False, rich_markup_mode="rich",
                  epilog="Example: kwwk demo   (everything on this machine; then open http://127.0.0.1:8000)")
sim_app = typer.Typer(help="The site simulator.", no_args_is_help=True,
                      epilog="Example: kwwk sim run --cell firmware_configs/cells/musterdorf.yaml")
gateway_app = typer.Typer(help="The gateway daemon (runs on the Raspberry Pi).", no_args_is_help=True,
                          epilog="Example: kwwk gateway run --cell firmware_configs/cells/musterdorf.yaml "
                                 "--gateway gw-musterdorf-1")
collector_app = typer.Typer(help="The collector: MQTT → InfluxDB.", no_args_is_help=True,
                            epilog="Example: kwwk collector run --cells firmware_configs/cells")
api_app = typer.Typer(help="The HTTP API.", no_args_is_help=True,
                      epilog="Example: kwwk api run --cells firmware_configs/cells --port 8000")


def _installed(package: str) -> bool:
    """Whether `package` is importable here. A gateway's install (`pip install '.[gateway]'`) has no collector,
    dashboards, edge.sim, kwwk.dev or kwwk.deploy; find_spec raises, not answers None, when the parent is absent."""
    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:
        return False


# Only the groups whose package is installed are offered, so a gateway shows `gateway` and `commission`.
# The groups below grow on their own, each keeping its imports inside its commands.
_GROUPS = (
    (app, sim_app, "sim", "edge.sim"),
    (app, gateway_app, "gateway", "gateway"),
    (app, collector_app, "collector", "collector"),
    (app, api_app, "api", "collector.api"),
    (api_app, "collector.api.tokens_cli", "token", "collector.api"),
    (app, "collector.balance.cli", "balance", "collector.balance"),
    (app, "gateway.commission.cli", "commission", "gateway.commission"),
    (app, "kwwk.deploy.broker_cli", "broker", "kwwk.deploy"),
    (app, "dashboards.cli", "dashboards", "dashboards"),
)
for _parent, _group, _name, _package in _GROUPS:
    if _installed(_package):
        _parent.add_typer(importlib.import_module(_group).app if isinstance(_group, str) else _group, name=_name)

DEFAULT_CELLS = Path("firmware_configs/cells")
CellOpt = Annotated[Path, typer.Option("--cell", help="cell config file", exists=True, dir_okay=False)]
CellsOpt = Annotated[Path, typer.Option("--cells", help="folder of cell config files", envvar="KWWK_CELLS")]
LogOpt = Annotated[str, typer.Option("--log-level", envvar="KWWK_LOG_LEVEL", help="DEBUG, INFO, WARNING")]
MqttHost = Annotated[str, typer.Option("--mqtt-host", envvar="KWWK_MQTT_HOST")]
MqttPort = Annotated[int, typer.Option("--mqtt-port", envvar="KWWK_MQTT_PORT")]
MqttUser = Annotated[str | None, typer.Option("--mqtt-username", envvar="KWWK_MQTT_USERNAME")]
MqttPass = Annotated[str | None, typer.Option("--mqtt-password-file", envvar="KWWK_MQTT_PASSWORD_FILE",
                                                   help="file holding the password (never on the command line)")]
MqttTls = Annotated[bool, typer.Option("--mqtt-tls/--no-mqtt-tls", envvar="KWWK_MQTT_TLS")]
MqttCa = Annotated[str | None, typer.Option("--mqtt-ca", envvar="KWWK_MQTT_CA", help="CA certificate file (PEM)")]
InfluxUrl = Annotated[str, typer.Option("--influx-url", envvar="KWWK_INFLUX_URL")]
InfluxApi = Annotated[str, typer.Option("--influx-api", envvar="KWWK_INFLUX_API", help="v1 (/write) or v2")]
InfluxDb = Annotated[str, typer.Option("--influx-db", envvar="KWWK_INFLUX_DB", help="v1 database / v2 bucket")]
InfluxToken = Annotated[str | None, typer.Option("--influx-token", envvar="KWWK_INFLUX_TOKEN")]
InfluxOrg = Annotated[str, typer.Option("--influx-org", envvar="KWWK_INFLUX_ORG")]


def _mqtt(base, host: str, port: int, username: str | None, password_file: str | None, tls: bool,  # noqa: ANN001
          ca: str | None):  # noqa: ANN202 - edge.mqtt.MqttSettings, imported lazily like everything here
    """The central services' broker settings from their options (typer reads KWWK_MQTT_* for them)."""
    from edge.mqtt import read_password_file

    with cli_errors():
        password = read_password_file(password_file) if password_file else None
    return base.replace(host=host, port=port, username=username, password=password, tls=tls, ca_file=ca)


def _run(coro_factory) -> None:  # noqa: ANN001
    """Run an async service until SIGINT/SIGTERM, then stop it cleanly."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await coro_factory(stop)

    asyncio.run(main())


def _registry(cells: Path):  # noqa: ANN202
    from collector.registry import Registry

    with cli_errors():
        return Registry.from_dir(cells)


def _load_cell(path: Path):  # noqa: ANN202
    from edge.cell import load_cell

    with cli_errors():
        return load_cell(path)


@sim_app.command("run", epilog="Example: kwwk sim run --cell firmware_configs/cells/musterdorf.yaml")
def sim_run(cell: Annotated[list[Path], typer.Option("--cell", help="cell config file (repeat for several)")],
            speed: Annotated[float, typer.Option(help="simulated seconds per real second")] = 1.0,
            log_level: LogOpt = "INFO") -> None:
    """Serve every device of the cells as Modbus TCP servers whose registers follow the site's physics."""
    from edge.sim import SimClock, SimulatorServer
    from edge.obs import setup_logging

    setup_logging(log_level)
    cfgs = [_load_cell(c) for c in cell]

    async def serve(stop: asyncio.Event) -> None:
        server = SimulatorServer(cfgs, SimClock(speed=speed))
        await server.start()
        for host, port, devices in server.endpoints:
            typer.echo(f"modbus tcp {host}:{port}  {', '.join(devices)}")
        await stop.wait()
        await server.stop()

    _run(serve)


@gateway_app.command("run", epilog="Example: kwwk gateway run --cell firmware_configs/cells/musterdorf.yaml "
                                   "--gateway gw-musterdorf-1 --mqtt-host broker.example --mqtt-tls")
def gateway_run(
    cell: CellOpt,
    gateway: gs.GatewayOpt = None,
    env_file: gs.EnvFileOpt = None,
    mqtt_host: gs.MqttHostOpt = None, mqtt_port: gs.MqttPortOpt = None, mqtt_username: gs.MqttUserOpt = None,
    mqtt_password_file: gs.MqttPassOpt = None, mqtt_tls: gs.MqttTlsOpt = None, mqtt_ca: gs.MqttCaOpt = None,
    outbox: gs.OutboxOpt = None,
    health_port: Annotated[int | None, typer.Option(help="port of /healthz and /metrics on 127.0.0.1 (default "
                                                         "9102); env KWWK_HEALTH_PORT", show_default=False)] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING (default INFO); env KWWK_LOG_LEVEL",
                                                  show_default=False)] = None,
    print_settings: gs.PrintSettingsOpt = False,
) -> None:
    """Poll the gateway's devices and publish their readings; nothing is lost while the uplink is down.

    Each setting comes from its option, else the environment (KWWK_*), else the env file (default
    /etc/kwwk/gateway.env when it exists), else the cell config, else its default: exactly what
    `kwwk commission verify` checks. --print-settings shows the result and where each part came from.
    """
    from edge.obs import setup_logging
    from gateway.service import GatewayService

    cfg = _load_cell(cell)
    flags = gs.GatewayFlags(gateway=gateway, env_file=env_file, mqtt_host=mqtt_host, mqtt_port=mqtt_port,
                         mqtt_username=mqtt_username, mqtt_password_file=mqtt_password_file, mqtt_tls=mqtt_tls,
                         mqtt_ca=mqtt_ca, outbox=outbox, health_port=health_port, log_level=log_level)
    with cli_errors():
        settings = gs.resolve(cfg, flags)
    if print_settings:
        typer.echo(settings.to_json())
        return
    with cli_errors():
        if settings.password_error:
            raise SettingsError(settings.password_error)
    setup_logging(settings.log_level)
    service = GatewayService(cfg, settings.gateway, settings.mqtt, settings.outbox, health_port=settings.health_port)
    _run(service.run)


@collector_app.command("run", epilog="Example: kwwk collector run --cells firmware_configs/cells "
                                     "--influx-url http://127.0.0.1:8086 --client-id kwwk-collector-1")
def collector_run(
    cells: CellsOpt = DEFAULT_CELLS,
    mqtt_host: MqttHost = "127.0.0.1", mqtt_port: MqttPort = 1883, mqtt_username: MqttUser = None,
    mqtt_password_file: MqttPass = None, mqtt_tls: MqttTls = False, mqtt_ca: MqttCa = None,
    client_id: Annotated[str, typer.Option(help="fixed per replica: it names the persistent session (the shipped "
                                                "broker makes it the replica's username)",
                                           envvar="KWWK_CLIENT_ID")] = "kwwk-collector-1",
    influx_url: InfluxUrl = "http://127.0.0.1:8086", influx_api: InfluxApi = "v1", influx_db: InfluxDb = "kwwk",
    influx_token: InfluxToken = None, influx_org: InfluxOrg = "kwwk",
    health_port: Annotated[int, typer.Option(envvar="KWWK_HEALTH_PORT")] = 9103,
    audit_interval: Annotated[float, typer.Option(help="seconds between sequence audits (resend requests)",
                                                  envvar="KWWK_AUDIT_INTERVAL")] = 3.0,  # CollectorSettings.audit_interval_s
    log_level: LogOpt = "INFO",
) -> None:
    """Subscribe to every gateway's telemetry and store it in InfluxDB, acknowledging only what is stored."""
    from collector.ingest import CollectorSettings
    from collector.service import run_collector
    from collector.storage import InfluxSettings
    from edge.obs import setup_logging

    setup_logging(log_level)
    registry = _registry(cells)
    mqtt = _mqtt(CollectorSettings().mqtt, mqtt_host, mqtt_port, mqtt_username, mqtt_password_file, mqtt_tls, mqtt_ca)
    settings = CollectorSettings(mqtt=mqtt.replace(client_id=client_id), audit_interval_s=audit_interval,
                                 audit_grace_s=min(CollectorSettings.audit_grace_s, audit_interval),
                                 audit_retry_s=2 * audit_interval)
    influx = InfluxSettings(url=influx_url, api="v2" if influx_api == "v2" else "v1", database=influx_db,
                            bucket=influx_db, token=influx_token, org=influx_org)
    _run(lambda stop: run_collector(settings, influx, registry, health_port=health_port, stop=stop))


@collector_app.command("replay-deadletters",
                       epilog="Example: kwwk collector replay-deadletters --since 2026-12-01 --reason unknown_device "
                              "--cells firmware_configs/cells --influx-url http://127.0.0.1:8086")
def collector_replay_deadletters(
    cells: CellsOpt = DEFAULT_CELLS,
    deadletter_dir: Annotated[Path, typer.Option("--dir", envvar="KWWK_DEADLETTER_DIR",
                                                 help="the collector's dead-letter folder")] = Path("var/deadletters"),
    since: Annotated[str | None, typer.Option(help="only those received from then on: 2026-12-01 or "
                                                   "2026-12-01T08:00 (UTC)")] = None,
    reason: Annotated[str | None, typer.Option(help="only those dead-lettered for this reason, e.g. "
                                                    "unknown_device, storage_rejected")] = None,
    influx_url: InfluxUrl = "http://127.0.0.1:8086", influx_api: InfluxApi = "v1", influx_db: InfluxDb = "kwwk",
    influx_token: InfluxToken = None, influx_org: InfluxOrg = "kwwk",
    timeout: Annotated[float, typer.Option(help="give up after this many seconds (the rest stays for a next run)")]
    = 600.0,
    log_level: LogOpt = "WARNING",
) -> None:
    """Re-ingest stored dead letters after a fix (a device added to the cell config, a database repaired).

    They go through the collector's own validation and write path: what is stored now is marked replayed,
    what is still refused is dead-lettered again (a new record naming the old one), nothing is lost.
    """
    from datetime import UTC, datetime

    from collector.acking import AckingWriter, WriterSettings
    from collector.deadletters import DeadLetterStore, replay
    from collector.encode import Encoder
    from collector.metrics import CollectorMetrics
    from collector.storage import InfluxSettings, make_writer
    from edge.obs import setup_logging

    setup_logging(log_level)
    since_ms = None
    if since:
        with cli_errors():
            try:
                at = datetime.fromisoformat(since)
            except ValueError:
                raise SettingsError(f"--since {since!r}: want a date (2026-12-01) or a time (2026-12-01T08:00)") \
                    from None
        since_ms = int((at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp() * 1000)
    registry = _registry(cells)
    influx = InfluxSettings(url=influx_url, api="v2" if influx_api == "v2" else "v1", database=influx_db,
                            bucket=influx_db, token=influx_token, org=influx_org)
    store = DeadLetterStore(deadletter_dir)

    def acking(ack):  # noqa: ANN001, ANN202 - the collector's writer, its dead letters back into the store
        return AckingWriter(WriterSettings(deadletter_dir=None), Encoder(registry), make_writer(influx),
                            CollectorMetrics(), ack=ack, deadletter_store=store)

    with cli_errors():
        try:
            result = replay(store, acking, since_ms=since_ms, reason=reason, timeout_s=timeout)
        except TimeoutError as err:
            raise SettingsError(str(err)) from None
    typer.echo(f"replayed {result.replayed} dead letters: {result.stored} stored, {result.partial} in part, "
               f"{result.refused_again} refused again (kept in {deadletter_dir}), {result.skipped} cut short and "
               f"skipped; {result.readings} readings stored")


@api_app.command("run", epilog="Example: kwwk api run --cells firmware_configs/cells --port 8000 "
                               "--tokens-file var/api-tokens")
def api_run(
    cells: CellsOpt = DEFAULT_CELLS,
    host: Annotated[str, typer.Option(envvar="KWWK_API_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="KWWK_API_PORT")] = 8000,
    mqtt_host: MqttHost = "127.0.0.1", mqtt_port: MqttPort = 1883, mqtt_username: MqttUser = None,
    mqtt_password_file: MqttPass = None, mqtt_tls: MqttTls = False, mqtt_ca: MqttCa = None,
    influx_url: InfluxUrl = "http://127.0.0.1:8086", influx_db: InfluxDb = "kwwk",
    influx_token: InfluxToken = None,
    tokens_file: Annotated[Path, typer.Option("--tokens-file", envvar="KWWK_API_TOKENS_FILE",
                                              help="operator tokens, hashed (kwwk api token create)")] = Path(
                                                  "var/api-tokens"),
    public_rate: Annotated[float, typer.Option(envvar="KWWK_API_PUBLIC_RATE",
                                               help="public requests per second per client address (0: no limit)")] = 2.0,
    forwarded_allow_ips: Annotated[str | None, typer.Option(
        envvar="KWWK_API_FORWARDED_ALLOW_IPS",
        help="behind a reverse proxy: its address, so X-Forwarded-For names the client (for the public limit)")] = None,
    log_level: LogOpt = "INFO",
) -> None:
    """Serve the residents' page (/), the public API, the operator API (token required), /healthz and /metrics."""
    import uvicorn

    from collector.api.app import API_MQTT, ApiSettings, create_app
    from collector.storage import InfluxSettings
    from edge.obs import setup_logging

    setup_logging(log_level)
    registry = _registry(cells)
    settings = ApiSettings(InfluxSettings(url=influx_url, database=influx_db, token=influx_token),
                           mqtt=_mqtt(API_MQTT, mqtt_host, mqtt_port, mqtt_username, mqtt_password_file, mqtt_tls,
                                      mqtt_ca),
                           tokens_file=tokens_file, public_rate_per_s=public_rate)
    uvicorn.run(create_app(registry, settings), host=host, port=port, log_config=None,
                proxy_headers=forwarded_allow_ips is not None, forwarded_allow_ips=forwarded_allow_ips)


def demo(
    cells: CellsOpt = DEFAULT_CELLS,
    duration: Annotated[float | None, typer.Option(help="stop by itself after this many seconds")] = None,
    var: Annotated[Path, typer.Option(help="where the demo keeps its data")] = Path("var"),
    api_port: Annotated[int, typer.Option(help="port of the API")] = 8000,
    mqtt_port: Annotated[int, typer.Option(help="port of the demo's Mosquitto")] = 18830,
    influx_port: Annotated[int, typer.Option(help="port of the demo's InfluxDB")] = 18086,
    sim_speed: Annotated[float, typer.Option(help="simulated seconds per real second (0 freezes the plant)")] = 1.0,
    history: Annotated[float, typer.Option(help="hours of simulated history to store first, so balances and the "
                                                "residents' page have numbers at once (0: none)")] = 24.0,
    log_level: LogOpt = "WARNING",
) -> None:
    """Run a whole simulated alliance on this machine: Mosquitto, InfluxDB, the simulator, a gateway per
    cell, the collector and the API on 127.0.0.1. Ctrl-C stops everything."""
    from kwwk.dev.demo import Demo
    from edge.obs import setup_logging

    setup_logging(log_level)
    with cli_errors():
        d = Demo(cells, var, api_port=api_port, mqtt_port=mqtt_port, influx_port=influx_port, sim_speed=sim_speed,
                 history_hours=history)
    _run(lambda stop: d.run(stop, duration))


if _installed("kwwk.dev"):  # development tooling: not in a gateway's install
    app.command("demo", epilog="Example: kwwk demo --duration 120")(demo)


def main() -> None:  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(app())
