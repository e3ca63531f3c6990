"""A bad cell config stops with a message naming the file, the line and the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge.cell import load_cell, load_cells
from edge.yamlio import ConfigError
from tests.conftest import CELLS

GOOD = """\
cell:
  id: testdorf
  name: Testdorf
gateways:
  - id: gw-1
    poll_interval: 5
    devices:
      - id: grid
        profile: eastron_sdm630
        connection: {host: 127.0.0.1, port: 1502}
      - id: pump
        profile: eastron_sdm630
        connection:
          host: 127.0.0.1
          port: 1503
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "testdorf.yaml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_cell(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_demo_cells_are_valid() -> None:
    cells = load_cells(CELLS)
    assert {"musterdorf", "lindenau"} <= set(cells)
    assert len(cells["musterdorf"].devices()) >= 14


def test_good_config_loads(tmp_path: Path) -> None:
    cfg = load_cell(_write(tmp_path, GOOD))
    assert [d.id for _, d in cfg.devices()] == ["grid", "pump"]


def test_unknown_profile(tmp_path: Path) -> None:
    msg = _error(tmp_path, GOOD.replace("profile: eastron_sdm630\n        connection: {host: 127.0.0.1, port: 1502}",
                                        "profile: eastron_sdm999\n        connection: {host: 127.0.0.1, port: 1502}"))
    assert ":9: gateways[gw-1].devices[grid].profile: unknown profile 'eastron_sdm999'" in msg
    assert "eastron_sdm630" in msg  # lists what would be valid


def test_duplicate_device_id(tmp_path: Path) -> None:
    msg = _error(tmp_path, GOOD.replace("- id: pump", "- id: grid"))
    assert ":11: gateways[gw-1].devices[grid].id: duplicate device id" in msg


def test_wrong_type(tmp_path: Path) -> None:
    msg = _error(tmp_path, GOOD.replace("poll_interval: 5", "poll_interval: often"))
    assert ":6: gateways[gw-1].poll_interval: Input should be a valid number" in msg


def test_missing_field(tmp_path: Path) -> None:
    msg = _error(tmp_path, GOOD.replace("  name: Testdorf\n", ""))
    assert ":1: cell.name: required field is missing" in msg  # the line of the mapping that lacks it


def test_unknown_field_and_several_errors_at_once(tmp_path: Path) -> None:
    msg = _error(tmp_path, GOOD.replace("port: 1503", "prot: 1503").replace("poll_interval: 5", "poll_interval: -1"))
    assert ":15: gateways[gw-1].devices[pump].connection.prot: unknown field" in msg
    assert ":6: gateways[gw-1].poll_interval:" in msg


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    msg = _error(tmp_path, GOOD.replace("  name: Testdorf\n", "  name: Testdorf\n  name: Other\n"))
    assert ":4:" in msg and "duplicate key 'name'" in msg


def test_role_needs_counter(tmp_path: Path) -> None:
    msg = _error(tmp_path, GOOD.replace("connection: {host: 127.0.0.1, port: 1502}",
                                        "connection: {host: 127.0.0.1, port: 1502}\n"
                                        "        roles: {frequency: electricity.grid_import}"))
    assert "devices[grid].roles.frequency: a balance role needs a cumulative counter" in msg


def test_cli_reports_the_error_and_exits_2(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD.replace("poll_interval: 5", "poll_interval: often"))
    kwwk = Path(sys.executable).parent / "kwwk"
    proc = subprocess.run([str(kwwk), "gateway", "run", "--cell", str(path), "--gateway", "gw-1"],  # noqa: S603
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"{path}:6: gateways[gw-1].poll_interval" in proc.stderr
    assert "Traceback" not in proc.stderr
