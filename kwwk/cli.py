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

from edge.yamlio import ConfigError

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


def _fail(err: Exception) -> typer.Exit:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


def _secret(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_text().strip()
    except OSError as err:
        raise _fail(ValueError(f"cannot read the password file {path}: {err.strerror}")) from None


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

    try:
        return Registry.from_dir(cells)
    except ConfigError as err:
        raise _fail(err) from None


def _load_cell(path: Path):  # noqa: ANN202
    from edge.cell import load_cell

    try:
        return load_cell(path)
    except ConfigError as err:
        raise _fail(err) from None


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
    gateway: Annotated[str, typer.Option("--gateway", help="gateway id in the cell config", envvar="KWWK_GATEWAY")],
    mqtt_host: MqttHost = "127.0.0.1", mqtt_port: MqttPort = 1883, mqtt_username: MqttUser = None,
    mqtt_password_file: MqttPass = None, mqtt_tls: MqttTls = False, mqtt_ca: MqttCa = None,
    outbox: Annotated[Path | None, typer.Option(help="outbox file (default var/gateway/<id>.sqlite)",
                                                envvar="KWWK_OUTBOX")] = None,
    health_port: Annotated[int, typer.Option(help="port of /healthz and /metrics", envvar="KWWK_HEALTH_PORT")] = 9102,
    log_level: LogOpt = "INFO",
) -> None:
    """Poll the gateway's devices and publish their readings; nothing is lost while the uplink is down."""
    from gateway.service import GatewayService
    from gateway.uplink import BrokerSettings
    from edge.obs import setup_logging

    setup_logging(log_level)
    cfg = _load_cell(cell)
    try:
        gw = cfg.gateway(gateway)
    except LookupError as err:
        raise _fail(err) from None
    broker = BrokerSettings(host=mqtt_host, port=mqtt_port, username=mqtt_username or gw.mqtt.username,
                            password=_secret(mqtt_password_file or gw.mqtt.password_file), tls=mqtt_tls, ca_file=mqtt_ca)
    service = GatewayService(cfg, gateway, broker, outbox or Path("var/gateway") / f"{gateway}.sqlite",
                             health_port=health_port)
    _run(service.run)


@collector_app.command("run", epilog="Example: kwwk collector run --cells firmware_configs/cells "
                                     "--influx-url http://127.0.0.1:8086 --client-id kwwk-collector-1")
def collector_run(
    cells: CellsOpt = DEFAULT_CELLS,
    mqtt_host: MqttHost = "127.0.0.1", mqtt_port: MqttPort = 1883, mqtt_username: MqttUser = None,
    mqtt_password_file: MqttPass = None, mqtt_tls: MqttTls = False, mqtt_ca: MqttCa = None,
    client_id: Annotated[str, typer.Option(help="fixed per replica: it names the persistent session",
                                           envvar="KWWK_CLIENT_ID")] = "kwwk-collector-1",
    influx_url: InfluxUrl = "http://127.0.0.1:8086", influx_api: InfluxApi = "v1", influx_db: InfluxDb = "kwwk",
    influx_token: InfluxToken = None, influx_org: InfluxOrg = "kwwk",
    health_port: Annotated[int, typer.Option(envvar="KWWK_HEALTH_PORT")] = 9103,
    audit_interval: Annotated[float, typer.Option(help="seconds between sequence audits (resend requests)",
                                                  envvar="KWWK_AUDIT_INTERVAL")] = 15.0,
    log_level: LogOpt = "INFO",
) -> None:
    """Subscribe to every gateway's telemetry and store it in InfluxDB, acknowledging only what is stored."""
    from collector.ingest import CollectorSettings
    from collector.service import run_collector
    from collector.storage import InfluxSettings
    from edge.obs import setup_logging

    setup_logging(log_level)
    registry = _registry(cells)
    settings = CollectorSettings(mqtt_host=mqtt_host, mqtt_port=mqtt_port, username=mqtt_username,
                                 password=_secret(mqtt_password_file), tls=mqtt_tls, ca_file=mqtt_ca,
                                 client_id=client_id, audit_interval_s=audit_interval,
                                 audit_grace_s=min(10.0, audit_interval), audit_retry_s=2 * audit_interval)
    influx = InfluxSettings(url=influx_url, api="v2" if influx_api == "v2" else "v1", database=influx_db,
                            bucket=influx_db, token=influx_token, org=influx_org)
    _run(lambda stop: run_collector(settings, influx, registry, health_port=health_port, stop=stop))


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

    from collector.api.app import ApiSettings, create_app
    from collector.storage import InfluxSettings
    from edge.obs import setup_logging

    setup_logging(log_level)
    registry = _registry(cells)
    settings = ApiSettings(InfluxSettings(url=influx_url, database=influx_db, token=influx_token),
                           mqtt_host=mqtt_host, mqtt_port=mqtt_port, mqtt_username=mqtt_username,
                           mqtt_password=_secret(mqtt_password_file), mqtt_tls=mqtt_tls, mqtt_ca=mqtt_ca,
                           tokens_file=tokens_file, public_rate_per_s=public_rate)
    uvicorn.run(create_app(registry, settings), host=host, port=port, log_config=None,
                proxy_headers=forwarded_allow_ips is not None, forwarded_allow_ips=forwarded_allow_ips)


@app.command("demo", epilog="Example: kwwk demo --duration 120")
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
    try:
        d = Demo(cells, var, api_port=api_port, mqtt_port=mqtt_port, influx_port=influx_port, sim_speed=sim_speed,
                 history_hours=history)
    except ConfigError as err:
        raise _fail(err) from None
    _run(lambda stop: d.run(stop, duration))


def main() -> None:  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(app())
