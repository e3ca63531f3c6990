"""`kwwk commission scan`: finds the simulated devices over Modbus TCP and on an RTU bus (a socat pty
pair with a real pymodbus serial server), names their profiles, and writes YAML a cell config accepts."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest
import yaml

from edge.cell import load_cell
from edge.profile import get_profile
from edge.sim import SimulatorServer
from edge.sim.image import RegisterImage
from edge.sim.modbus_server import SimServer
from gateway.commission.scan import parse_units, scan_serial, scan_tcp, scan_yaml

pytestmark = pytest.mark.integration
KWWK = str(Path(sys.executable).parent / "kwwk")

#: unit -> (profile, sim model): three profiles with identification registers, two SunSpec, one without
TCP_DEVICES = {1: ("carlo_gavazzi_em24_e1", "grid"), 2: ("sunspec_inverter_103", "pv"),
               3: ("siemens_mag6000", "water_supply"), 5: ("eastron_sdm630", "grid"), 7: ("sunspec_meter_203", "grid")}
NAMED = {u: p for u, (p, _) in TCP_DEVICES.items() if p != "eastron_sdm630"}


def sim_cell(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["cell: {id: scantest, name: Scan Test}", "gateways:", "  - id: gw-scan", "    devices:"]
    for unit, (profile, model) in TCP_DEVICES.items():
        lines.append(f"      - {{id: dev{unit}, profile: {profile}, sim: {{model: {model}}}, "
                     f"connection: {{host: 127.0.0.1, port: 502, unit_id: {unit}}}}}")
    path = folder / "scantest.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def _serve(folder: Path) -> SimulatorServer:
    """The simulated devices on one endpoint, on a port the system picks (port 0)."""
    sim = SimulatorServer([load_cell(sim_cell(folder))], any_port=True)
    await sim.start()
    return sim


def _paste(snippet: str, folder: Path) -> Path:
    """Put the scan's YAML under a gateway of a fresh cell config, as a technician would."""
    data = yaml.safe_load(snippet)
    gw = {"id": "gw-new", "devices": data["devices"], **({"lines": data["lines"]} if data.get("lines") else {})}
    path = folder / "pasted.yaml"
    path.write_text(yaml.safe_dump({"cell": {"id": "pasted", "name": "Pasted"}, "gateways": [gw]}))
    return path


async def test_scan_finds_and_names_the_simulated_devices_over_tcp(tmp_path: Path) -> None:
    sim = await _serve(tmp_path)
    port = sim.endpoints[0][1]
    try:
        t0 = time.monotonic()
        result = await scan_tcp("127.0.0.1", port, parse_units("1-247"), timeout=0.3)
        took = time.monotonic() - t0
    finally:
        await sim.stop()
    by_unit = {f.unit_id: f for f in result.found}
    assert sorted(by_unit) == sorted(TCP_DEVICES), f"found {sorted(by_unit)}"
    for unit, profile in NAMED.items():
        assert by_unit[unit].profile == profile and by_unit[unit].how == "identification registers", by_unit[unit]
    assert by_unit[1].label == "EM24DINAV23XE1X"
    assert [m.model_id for m in by_unit[2].sunspec] == [1, 103] and [m.model_id for m in by_unit[7].sunspec] == [1, 203]
    # the SDM630 has no identification registers: a guess, not a name
    assert by_unit[5].profile is None and by_unit[5].how == "guess" and "eastron_sdm630" in by_unit[5].candidates
    assert took < 20, f"scan took {took:.1f} s"

    snippet = scan_yaml([result])
    cfg = load_cell(_paste(snippet, tmp_path))  # what the technician pastes is a valid cell config
    pasted = {d.connection.unit_id: d.profile for d in cfg.gateways[0].devices}
    assert pasted == NAMED  # only named devices are live entries; the guess is commented out
    assert f"kwwk commission probe --host 127.0.0.1 --port {port} --unit 5 --profile eastron_sdm630" in snippet


def _image(profile_id: str) -> dict[str, dict[int, int]]:
    img = RegisterImage(get_profile(profile_id))  # identification registers get their documented values
    return {t: dict(words) for t, words in img.tables.items() if words}


async def test_scan_finds_the_devices_on_an_rtu_bus(pty_pair: tuple[str, str]) -> None:
    """A real RS-485 bus: absent unit ids stay silent (each costs a timeout), present ones answer."""
    server_end, client_end = pty_pair
    present = {4: "siemens_mag6000", 9: "carlo_gavazzi_em24_e1", 17: "eastron_sdm630"}
    units = {u: _image(p) for u, p in present.items()}
    server = SimServer(units, framer="rtu", serial_port=server_end, dead=set(range(248)) - set(present))
    async with server:
        results = await scan_serial(client_end, parse_units("1-40"), baudrates=[9600, 19200], parities=["N"],
                                    timeout=0.05, quick_units=[1, 4, 9])
    assert len(results) == 1, "stops at the first setting that answers"
    res = results[0]
    assert (res.spec.baudrate, res.spec.parity) == (9600, "N")
    by_unit = {f.unit_id: f for f in res.found}
    assert sorted(by_unit) == sorted(present)
    assert by_unit[4].profile == "siemens_mag6000" and by_unit[4].label == "MAG 6000"
    assert by_unit[9].profile == "carlo_gavazzi_em24_e1"
    assert by_unit[17].profile is None and "eastron_sdm630" in by_unit[17].candidates
    # absent units were asked once each (no retries): the bus was not flooded
    absent_requests = [o for o in server.seen if o.unit_id not in present]
    assert len(absent_requests) == 40 - 3 + 1  # the scan, plus unit 1 in the quick phase (before unit 4 answered)
    snippet = scan_yaml(results)
    data = yaml.safe_load(snippet)
    assert data["lines"] == [{"id": "rs485-1", "kind": "rtu", "serial_port": client_end, "baudrate": 9600,
                              "parity": "N", "stopbits": 1}]
    assert {d["connection"]["unit_id"]: d["profile"] for d in data["devices"]} == {4: "siemens_mag6000",
                                                                                   9: "carlo_gavazzi_em24_e1"}


async def test_a_setting_the_port_refuses_does_not_stop_the_search(pty_pair: tuple[str, str]) -> None:
    """A pty, like some USB adapters, refuses even parity (tcsetattr EINVAL): the search moves on."""
    server_end, client_end = pty_pair
    async with SimServer({3: _image("siemens_mag6000")}, framer="rtu", serial_port=server_end,
                         dead=set(range(248)) - {3}):
        results = await scan_serial(client_end, parse_units("1-5"), baudrates=[19200], parities=["E", "O", "N"],
                                    timeout=0.05, quick_units=[1, 3])
    assert [(r.spec.baudrate, r.spec.parity) for r in results] == [(19200, "N")]
    assert [(f.unit_id, f.profile) for f in results[0].found] == [(3, "siemens_mag6000")]


async def test_no_answer_at_any_setting_returns_nothing(pty_pair: tuple[str, str]) -> None:
    server_end, client_end = pty_pair
    async with SimServer({1: _image("siemens_mag6000")}, framer="rtu", serial_port=server_end,
                         dead=set(range(248))):
        results = await scan_serial(client_end, parse_units("1-5"), baudrates=[9600, 19200], parities=["N", "E"],
                                    timeout=0.05, quick_units=[1, 2])
    assert results == []


async def test_a_device_that_ignores_the_unit_id_is_listed_once() -> None:
    # pymodbus' simulator answers every unit id with device 0: like a plain TCP meter
    async with SimServer({0: _image("siemens_mag6000")}) as server:
        result = await scan_tcp("127.0.0.1", server.port, parse_units("1-12"), timeout=0.3)
    assert result.ignores_unit_id
    assert [(f.unit_id, f.profile) for f in result.found] == [(1, "siemens_mag6000")]


async def test_cli_scan_prints_table_and_writes_yaml(tmp_path: Path) -> None:
    sim = await _serve(tmp_path)
    port = sim.endpoints[0][1]
    out = tmp_path / "devices.yaml"
    try:
        proc = await asyncio.create_subprocess_exec(
            KWWK, "commission", "scan", "--host", "127.0.0.1", "--port", str(port), "--units", "1-8",
            "--yaml-out", str(out), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await sim.stop()
    text = stdout.decode()
    assert proc.returncode == 0, text + stderr.decode()
    for profile in NAMED.values():
        assert profile in text
    assert "scanning 127.0.0.1" in stderr.decode()  # the progress bar goes to stderr
    assert yaml.safe_load(out.read_text())["devices"][0]["profile"] == "carlo_gavazzi_em24_e1"


def test_parse_units() -> None:
    assert parse_units("1-3,7, 10-11") == [1, 2, 3, 7, 10, 11]
    with pytest.raises(ValueError):
        parse_units("5-2")
    with pytest.raises(ValueError):
        parse_units("1-300")
