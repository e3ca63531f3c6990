"""Shared fixtures: real Mosquitto and InfluxDB on free loopback ports, cell configs with free ports."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from kwwk.localservers import InfluxDB1, Mosquitto, VictoriaMetrics, free_port

ROOT = Path(__file__).resolve().parent.parent
CELLS = ROOT / "firmware_configs" / "cells"


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    server = Mosquitto(tmp_path / "mosquitto")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def influxdb(tmp_path: Path) -> Iterator[InfluxDB1]:
    server = InfluxDB1(tmp_path / "influxdb")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def victoria(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    server = VictoriaMetrics(tmp_path / "vm")
    server.start()
    yield server
    server.stop()


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
