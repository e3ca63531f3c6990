"""Shared fixtures: real Mosquitto and InfluxDB on free loopback ports, cell configs with free ports."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kwwk.dev.localservers import InfluxDB1, Mosquitto, VictoriaMetrics, free_port

ROOT = Path(__file__).resolve().parent.parent
CELLS = ROOT / "firmware_configs" / "cells"


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


def with_free_ports(src: Path, dst_dir: Path) -> Path:
    """Copy a cell config, giving every Modbus TCP endpoint a free port (same endpoint, same new port)."""
    text = src.read_text()
    mapping: dict[str, int] = {}

    def repl(m: re.Match[str]) -> str:
        old = m.group(2)
        mapping.setdefault(old, free_port())
        return f"{m.group(1)}{mapping[old]}"

    text = re.sub(r"(port:\s*)(\d{4,5})", repl, text)
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / src.name
    dst.write_text(text)
    return dst


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two linked pseudo-terminals (socat): what one end writes, the other reads, like a null-modem cable."""
    a, b = tmp_path / "A", tmp_path / "B"
    proc = subprocess.Popen(["socat", "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],  # noqa: S607
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 5
        while not (a.exists() and b.exists()):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"socat did not create the pty pair: {err}")
            time.sleep(0.02)
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
