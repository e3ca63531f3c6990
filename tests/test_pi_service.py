"""The Raspberry Pi service files: systemd accepts the unit, and the install script is sound shell."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

UNIT = ROOT / "firmware_configs/systemd/kwwk-gateway.service"


def test_systemd_accepts_the_gateway_unit(tmp_path: Path) -> None:
    # the unit names the installed path; point it at this checkout's kwwk so systemd can check it all
    kwwk = Path(sys.executable).parent / "kwwk"
    unit = tmp_path / "kwwk-gateway.service"
    unit.write_text(UNIT.read_text().replace("/opt/kwwk/venv/bin/kwwk", str(kwwk)))
    analyze = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)  # noqa: S603
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if "kwwk-gateway.service" in line]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr


def test_unit_uses_notify_and_watchdog_the_gateway_implements() -> None:
    text = UNIT.read_text()
    assert "Type=notify" in text and "WatchdogSec=" in text
    assert "--outbox /var/lib/kwwk/" in text and "StateDirectory=kwwk" in text


def test_install_script_parses() -> None:
    script = ROOT / "firmware_configs/pi/install-gateway.sh"
    subprocess.run(["sh", "-n", str(script)], check=True, timeout=30)  # noqa: S603, S607
    for name in ("kwwk-gateway.service", "journald-kwwk.conf", "gateway.env.example"):
        assert name in script.read_text()
