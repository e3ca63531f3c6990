"""`kwwk demo` as a new user runs it: live values for every device within 60 s, equal to what the
simulated devices serve over Modbus, and a clean stop on Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from edge.cell import load_cells
from edge.modbus import DeviceReader, ModbusLine
from edge.sim.ports import reserve_port
from kwwk.dev.localservers import _port_open
from tests.conftest import CELLS, with_reserved_ports
from tests.helpers import wait_until

pytestmark = pytest.mark.integration


def _get(url: str, token_file: Path | None = None) -> dict:
    headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"} if token_file else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:  # noqa: S310
        return json.loads(r.read())


def test_demo_serves_live_values_matching_the_simulator(tmp_path: Path) -> None:
    cells_dir = tmp_path / "cells"
    for f in sorted(CELLS.glob("*.yaml")):
        with_reserved_ports(f, cells_dir)
    cells = load_cells(cells_dir)
    # the demo runs in a process of its own and binds fixed ports: reserved for this test (edge.sim.ports)
    api, mqtt, influx = reserve_port(), reserve_port(), reserve_port()
    kwwk = Path(sys.executable).parent / "kwwk"
    proc = subprocess.Popen(  # noqa: S603
        [str(kwwk), "demo", "--cells", str(cells_dir), "--var", str(tmp_path / "var"), "--api-port", str(api),
         "--mqtt-port", str(mqtt), "--influx-port", str(influx), "--sim-speed", "0", "--duration", "150"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
    t0 = time.monotonic()
    token = tmp_path / "var" / "operator-token"  # the demo issues an operator token each run
    try:
        answers: list[dict] = []

        def every_device_live() -> dict | None:
            try:
                answers.append(_get(f"http://127.0.0.1:{api}/api/cells/musterdorf/latest", token))
            except OSError:
                return None  # still starting
            body = answers[-1]
            return body if all(p["value"] is not None for d in body["devices"] for p in d["points"].values()) else None

        body = wait_until(every_device_live, 60, lambda: "a live value for every musterdorf device (last answer: "
                          f"{answers[-1] if answers else None})", interval=1)
        took = time.monotonic() - t0
        assert {d["id"] for d in body["devices"]} == {d.id for _, d in cells["musterdorf"].devices()}
        # the plant is frozen (--sim-speed 0): what the API shows must equal what the devices serve now
        cfg = cells["musterdorf"]

        async def read_all() -> dict[str, dict[str, float]]:
            out = {}
            for gw, dev in cfg.devices():
                spec, unit = cfg.line_spec(gw, dev)
                line = ModbusLine(spec)
                result = await DeviceReader(line, cfg.profiles[dev.id], unit).read()
                await line.close()
                out[dev.id] = result.values
            return out

        served = asyncio.run(read_all())
        for d in body["devices"]:
            for name, p in d["points"].items():
                want = served[d["id"]][name]
                assert math.isclose(p["value"], want, rel_tol=1e-9, abs_tol=1e-9), \
                    f"{d['id']}.{name}: API {p['value']} != device {want}"
        lindenau = _get(f"http://127.0.0.1:{api}/api/cells", token)
        assert {c["id"] for c in lindenau} == {"musterdorf", "lindenau"}
        # the demo stores a simulated history first: residents see balances from the first minute
        summary = _get(f"http://127.0.0.1:{api}/api/public/cells/musterdorf/summary")
        assert summary["last_30_days"]["electricity"]["self_sufficiency_pct"] is not None
        print(f"every musterdorf device live after {took:.1f}s")
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "stopped" in text
    for port in (api, mqtt, influx):
        assert not _port_open(port), f"port {port} still open after Ctrl-C"
