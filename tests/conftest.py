"""Shared fixtures: real Mosquitto and InfluxDB on loopback ports nobody else gets, and the simulator on
ports the system picks, with the gateway's cell config written from the ports it reports."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.cell import load_cell
from edge.sim import SimulatorServer
from edge.sim.ports import reserve_port
from kwwk.dev.localservers import InfluxDB1, Mosquitto, VictoriaMetrics
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
CELLS = ROOT / "firmware_configs" / "cells"


@pytest.fixture(autouse=True, scope="session")
def _deadletters_in_a_temp_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Collectors keep durable dead letters (collector/deadletters.py); tests keep theirs out of the checkout's var/.
    A test that reads them sets KWWK_DEADLETTER_DIR itself (monkeypatch wins over this default)."""
    old = os.environ.get("KWWK_DEADLETTER_DIR")
    os.environ["KWWK_DEADLETTER_DIR"] = str(tmp_path_factory.mktemp("deadletters"))
    yield
    if old is None:
        os.environ.pop("KWWK_DEADLETTER_DIR", None)
    else:
        os.environ["KWWK_DEADLETTER_DIR"] = old


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "mosquitto") as server:
        yield server


@pytest.fixture
def influxdb(tmp_path: Path) -> Iterator[InfluxDB1]:
    with InfluxDB1(tmp_path / "influxdb") as server:
        yield server


@pytest.fixture
def victoria(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    with VictoriaMetrics(tmp_path / "vm") as server:
        yield server


_PORT = re.compile(r"(port:\s*)(\d{4,5})")


def _with_ports(src: Path, dst_dir: Path, new_port: Callable[[int], int]) -> Path:
    """Copy a cell config to dst_dir, each endpoint's port replaced by new_port(old) (same old, same new)."""
    mapping: dict[int, int] = {}

    def repl(m: re.Match[str]) -> str:
        old = int(m.group(2))
        if old not in mapping:
            mapping[old] = new_port(old)
        return f"{m.group(1)}{mapping[old]}"

    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / src.name
    dst.write_text(_PORT.sub(repl, src.read_text()))
    return dst


def with_reserved_ports(src: Path, dst_dir: Path) -> Path:
    """Copy a cell config, giving every Modbus TCP endpoint a port reserved for this test process
    (edge.sim.ports.reserve_port: not picked by bind-and-close, so two endpoints never share one).
    For the simulator in a process of its own (`kwwk demo`, `kwwk sim run`); in this process prefer
    `start_simulator`, which serves port 0 and reports."""
    return _with_ports(src, dst_dir, lambda _old: reserve_port())



def served_cell(src: Path, dst_dir: Path, sim: SimulatorServer) -> Path:
    """Copy a cell config, each endpoint's configured port replaced by the port the simulator serves it on."""
    by_port: dict[int, set[int]] = {}
    for (_host, configured), served in sim.ports.items():
        by_port.setdefault(configured, set()).add(served)

    def served(old: int) -> int:
        ports = by_port.get(old, set())
        if len(ports) != 1:
            msg = f"{src}: port {old} is served on {sorted(ports) or 'no port'}; want exactly one"
            raise LookupError(msg)
        return ports.pop()

    return _with_ports(src, dst_dir, served)


async def start_simulator(src: Path, dst_dir: Path, **kwargs: Any) -> tuple[SimulatorServer, Path]:
    """Serve a cell config's devices on ports the system picks (port 0); return the running simulator and
    the gateway's copy of the config naming those ports. The caller stops the simulator."""
    sim = SimulatorServer([load_cell(src)], any_port=True, **kwargs)
    await sim.start()
    return sim, served_cell(src, dst_dir, sim)


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two linked pseudo-terminals (socat): what one end writes, the other reads, like a null-modem cable."""
    a, b = tmp_path / "A", tmp_path / "B"
    proc = subprocess.Popen(["socat", "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],  # noqa: S607
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: (a.exists() and b.exists()) or proc.poll() is not None, 5, "socat to create the pty pair")
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"socat did not create the pty pair: {err}")
        yield str(a), str(b)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
