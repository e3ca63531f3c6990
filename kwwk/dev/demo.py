"""`kwwk demo`: the whole data path on one machine, from simulated meters to the API.

Mosquitto and InfluxDB are the real servers from the system packages, with their data under var/;
the simulator, one gateway per cell gateway, the collector and the API run in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from rich.console import Console
from rich.table import Table

from collector.api.app import API_MQTT, ApiSettings, create_app
from collector.api.tokens import issue_token
from collector.ingest import COLLECTOR_MQTT, CollectorSettings
from collector.registry import Registry
from collector.service import run_collector
from collector.storage import InfluxSettings
from edge.cell import load_cells
from edge.sim import SimClock, SimulatorServer
from gateway.service import GatewayService
from gateway.settings import gateway_mqtt
from kwwk.dev.history import backfill
from kwwk.dev.localservers import InfluxDB1, Mosquitto, _port_open

__all__ = ["Demo"]

console = Console()


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the demo stops it with everything else."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Demo:
    def __init__(self, cells_dir: Path, var: Path, api_port: int = 8000, mqtt_port: int = 18830,
                 influx_port: int = 18086, host: str = "127.0.0.1", sim_speed: float = 1.0,
                 history_hours: float = 0.0) -> None:
        self.cells = load_cells(cells_dir)
        self.var = var.resolve()
        self.api_port = api_port
        self.mqtt_port = mqtt_port
        self.influx_port = influx_port
        self.host = host
        self.sim_speed = sim_speed
        self.history_hours = history_hours
        self.tokens_file = self.var / "api-tokens"
        self.token_file = self.var / "operator-token"

    async def run(self, stop: asyncio.Event, duration: float | None = None) -> None:
        for name, port in (("API", self.api_port), ("MQTT", self.mqtt_port), ("InfluxDB", self.influx_port)):
            if _port_open(port):
                console.print(f"[red]port {port} for the {name} is in use[/]: stop what uses it or pass "
                              f"--{name.lower()}-port")
                raise SystemExit(2)
        t0 = time.monotonic()
        mosquitto = Mosquitto(self.var / "mosquitto", self.mqtt_port)
        influx = InfluxDB1(self.var / "influxdb", self.influx_port)
        with console.status("starting Mosquitto and InfluxDB"):
            await asyncio.to_thread(mosquitto.start)
            await asyncio.to_thread(influx.start)
        influx_settings = InfluxSettings(url=influx.url, database=influx.database)
        sites = None
        if self.history_hours > 0:
            with console.status("simulating history") as status:
                sites = await backfill(self.cells.values(), influx_settings, self.history_hours,
                                       progress=lambda text: status.update(text))
        sim = SimulatorServer(self.cells.values(), SimClock(speed=self.sim_speed), sites=sites)
        gateways: list[GatewayService] = []
        tasks: list[asyncio.Task[None]] = []
        inner_stop = asyncio.Event()
        issue_token(self.tokens_file, "demo", save_to=self.token_file)  # a fresh operator token each run
        api = _Uvicorn(uvicorn.Config(
            create_app(Registry(self.cells), ApiSettings(
                influx_settings, mqtt=API_MQTT.replace(host=self.host, port=self.mqtt_port), tokens_file=self.tokens_file)),
            host=self.host, port=self.api_port, log_config=None, log_level="warning"))
        try:
            await sim.start()
            broker = gateway_mqtt(host=self.host, port=self.mqtt_port)
            for cfg in self.cells.values():
                for gw in cfg.gateways:
                    svc = GatewayService(cfg, gw.id, broker, self.var / "gateway" / f"{gw.id}.sqlite")
                    gateways.append(svc)
                    tasks.append(asyncio.create_task(svc.run(inner_stop), name=f"demo.gateway.{gw.id}"))
            collector = CollectorSettings(mqtt=COLLECTOR_MQTT.replace(host=self.host, port=self.mqtt_port,
                                                                        client_id="kwwk-demo-collector"))
            tasks.append(asyncio.create_task(
                run_collector(collector, influx_settings, Registry(self.cells), stop=inner_stop), name="demo.collector"))
            tasks.append(asyncio.create_task(api.serve(), name="demo.api"))
            while not api.started:
                await asyncio.sleep(0.05)
            self._print(sim, gateways, mosquitto, influx, time.monotonic() - t0)
            waiter = asyncio.create_task(stop.wait())
            await asyncio.wait([waiter, *tasks], timeout=duration, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            for t in tasks:
                if t.done() and t.exception():
                    console.print(f"[red]{t.get_name()} failed:[/] {t.exception()!r}")
        finally:
            console.print("stopping…")
            inner_stop.set()
            api.should_exit = True
            await asyncio.gather(*tasks, return_exceptions=True)
            await sim.stop()
            await asyncio.to_thread(influx.stop)
            await asyncio.to_thread(mosquitto.stop)
            console.print("stopped")

    def _print(self, sim: SimulatorServer, gateways: list[GatewayService], mosquitto: Mosquitto,
               influx: InfluxDB1, took: float) -> None:
        t = Table(title=f"KWWK demo running (ready in {took:.1f}s) — Ctrl-C stops everything", title_justify="left")
        t.add_column("what")
        t.add_column("where")
        t.add_column("notes")
        t.add_row("residents' page", f"http://{self.host}:{self.api_port}/", "public: cell aggregates only")
        t.add_row("operator API", f"http://{self.host}:{self.api_port}/docs", f"token in {self.token_file}")
        t.add_row("Mosquitto", f"mqtt://{self.host}:{self.mqtt_port}", f"data in {mosquitto.dir}")
        t.add_row("InfluxDB 1.x", influx.url, f"database {influx.database!r}, data in {influx.dir}")
        for host, port, devices in sim.endpoints:
            t.add_row("simulated device", f"modbus://{host}:{port}", ", ".join(devices))
        for g in gateways:
            t.add_row(f"gateway {g.gateway.id}", f"http://{g.health.host}:{g.health.port}/healthz",
                      f"cell {g.cfg.cell.id}, {len(g.pollers)} devices, outbox {g.outbox.path.name}")
        t.add_row("collector", "in this process", "shared subscription, acks after InfluxDB accepted")
        console.print(t)
        first = next(iter(self.cells))
        console.print(f'try: curl -s -H "Authorization: Bearer $(cat {self.token_file})" '
                      f"http://{self.host}:{self.api_port}/api/cells/{first}/latest")
