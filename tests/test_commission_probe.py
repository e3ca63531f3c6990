"""`kwwk commission probe`: every value of a device judged through its profile, against real pymodbus
servers that serve a meter right, or with the mistakes commissioning finds (word order, an address off
by one, a wrong unit id, a wrong scale, a counter that stands still or runs backwards)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from edge.cell import load_cell
from edge.modbus import ModbusLine
from edge.planner import plan
from edge.profile import Profile, get_profile
from edge.sim import SimClock
from edge.sim.image import RegisterImage
from edge.sim.modbus_server import SimServer
from gateway.commission.probe import DeviceProbe, probe_device
from tests.conftest import start_simulator
from tests.helpers import wait_for

pytestmark = pytest.mark.integration
KWWK = str(Path(sys.executable).parent / "kwwk")
EM24 = get_profile("carlo_gavazzi_em24_e1")
SDM = get_profile("eastron_sdm630")
METER = {"voltage_l1": 230.2, "voltage_l2": 231.1, "voltage_l3": 229.5, "current_l1": 5.5, "current_l2": 5.1,
         "current_l3": 4.9, "power_l1": 1100.0, "power_l2": 1000.0, "power_l3": 900.0, "power": 3000.0,
         "frequency": 50.02, "energy_import": 90210.5, "energy_export": 4011.25, "energy_import_l1": 30000.0,
         "energy_import_l2": 30000.0, "energy_import_l3": 30210.5, "power_factor": 0.95, "power_factor_l1": 0.9,
         "power_factor_l2": 0.95, "power_factor_l3": 0.97}


def variant(profile: Profile, *, shift: int = 0, **changes: Any) -> Profile:
    """The same register map with a mistake: another word order, or every address moved."""
    data = profile.model_dump(by_alias=True)
    data.update(changes)
    for p in data["points"]:
        p["address"] += shift
    data["golden"] = []
    return Profile.model_validate(data)


def image(served: Profile, values: dict[str, float] | None = None) -> dict[str, dict[int, int]]:
    img = RegisterImage(served)
    img.update({k: v for k, v in (values or METER).items() if k in served.by_name})
    return {t: dict(w) for t, w in img.tables.items() if w}


async def probe(units: dict[int, dict[str, dict[int, int]]], profile: Profile, unit: int, **kw: Any) -> DeviceProbe:
    async with SimServer(units) as server:
        line = ModbusLine(server.spec(timeout=0.5))
        try:
            return await probe_device(line, profile, unit, **kw)
        finally:
            await line.close()


def messages(p: DeviceProbe) -> str:
    return "\n".join(f"{f.status}: {f.message} | {f.fix}" for f in p.findings)


async def test_a_right_device_passes_and_every_value_is_checked() -> None:
    result = await probe({1: image(EM24)}, EM24, 1, pause=0)
    assert result.status == "pass", messages(result)
    assert result.reachable and not result.findings
    by = {c.point.name: c for c in result.points}
    assert by["voltage_l1"].value == pytest.approx(230.2) and by["voltage_l1"].verdict == "ok"
    assert by["model_code"].value == 1648.0
    assert result.identity == ["model_code = 1648 (expected one of 1648, 1649, 1650, 1651, 1652, 1653)"]
    assert {c.point.name for c in result.points} == {p.name for p in EM24.points}


async def test_wrong_word_order_is_named_with_the_fix() -> None:
    # the device sends the high word first; the profile says low word first
    result = await probe({1: image(variant(EM24, word_order="big"))}, EM24, 1, pause=0)
    assert result.status == "fail"
    text = messages(result)
    assert "word order looks wrong" in text and "word_order big" in text and "address off" not in text
    by = {c.point.name: c for c in result.points}
    assert by["voltage_l1"].verdict == "out_of_range"
    assert any("with word_order big: 230.2 V (plausible)" in h for h in by["voltage_l1"].hints)
    assert by["power_factor"].verdict == "ok"  # one register has no word order


async def test_address_off_by_one_is_named_with_the_fix() -> None:
    # the device's map sits one register later than the profile says (a 1-based document read as 0-based)
    result = await probe({1: image(variant(EM24, shift=1))}, EM24, 1, pause=0)
    text = messages(result)
    assert result.status == "fail"
    assert "address off by +1" in text and "one_based" in text
    assert "does not identify as carlo_gavazzi_em24_e1" in text  # the model code is one register later too
    assert "word order looks wrong" not in text


async def test_float_maps_say_word_order_or_address_when_both_fit() -> None:
    """With float-only maps swapped words and a one-register shift both give nearly right values (the high
    word carries the magnitude): when the whole map answers, both are reported, to settle at the display."""
    swapped = image(variant(SDM, word_order="little"))
    whole = {"input": {**dict.fromkeys(range(120), 0), **swapped["input"]}}  # the meter has more registers
    result = await probe({1: whole}, SDM, 1, pause=0)
    text = messages(result)
    assert result.status == "fail" and "word order or address off by one" in text
    assert "voltage_l1 (V) reads with word_order little: 230.2 or one register later:" in text
    # where the map ends right after the last value, a shift cannot explain it: the word order wins
    edge = await probe({1: swapped}, SDM, 1, pause=0)
    assert "word order looks wrong: 13 of 13" in messages(edge)


async def test_wrong_unit_id_fails_clearly() -> None:
    units = {1: image(EM24)}
    refused = await probe(units, EM24, 7, pause=0)  # pymodbus answers exception 4 for a unit it lacks
    assert refused.status == "fail"
    assert "unit 7" in messages(refused) and "refuses every request" in messages(refused)
    assert "kwwk commission scan" in refused.findings[0].fix
    async with SimServer(units, dead={7}) as server:  # an RS-485 bus: nobody answers at all
        line = ModbusLine(server.spec(timeout=0.2, retries=0))
        silent = await probe_device(line, EM24, 7, pause=0)
        await line.close()
    assert not silent.reachable and "no answer from unit 7" in messages(silent)


async def test_wrong_scale_gets_a_hint_and_tiny_floats_a_warning() -> None:
    values = {**METER, "voltage_l1": 2302.0, "current_l1": 1e-9}
    result = await probe({1: image(SDM, values)}, SDM, 1, pause=0)
    by = {c.point.name: c for c in result.points}
    assert by["voltage_l1"].verdict == "out_of_range" and result.status == "fail"
    assert any("x10^-1: 230.2 V would be plausible" in h for h in by["voltage_l1"].hints)
    assert by["current_l1"].verdict == "tiny" and by["current_l1"].status == "warn"
    assert "outside their plausible range: voltage_l1 = 2302 V" in messages(result)


def _one_meter_cell(folder: Path) -> Path:
    """A cell with one simulated meter; start_simulator serves it on a port of the system's choosing."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "probecell.yaml"
    path.write_text("cell: {id: probecell, name: Probe Cell}\ngateways:\n  - id: gw-p\n    devices:\n"
                    "      - {id: grid, profile: eastron_sdm630, connection: {host: 127.0.0.1, port: 5020}, "
                    "sim: {model: grid}}\n")
    return path


async def test_counters_that_stand_still_warn_and_counters_that_run_backwards_fail(tmp_path: Path) -> None:
    # an hour per second: counters move
    sim, served = await start_simulator(_one_meter_cell(tmp_path), tmp_path / "gateway", clock=SimClock(speed=3600),
                                        step=0.1)
    cfg = load_cell(served)
    spec, unit = cfg.line_spec(cfg.gateways[0], cfg.device("grid"))
    line = ModbusLine(spec)
    try:
        alive = await probe_device(line, SDM, unit, pause=0.6)
        by = {c.point.name: c for c in alive.points}
        assert by["energy_import"].verdict == "ok" and by["energy_import"].second > by["energy_import"].value
        assert by["energy_export"].verdict == "frozen"  # the village imports: nothing is exported
        assert alive.status == "warn" and "did not change in 0.6 s: energy_export" in messages(alive)

        answered, first_read = line.stats.replies, len(plan(SDM))

        async def reset_meter() -> None:  # between the probe's two reads: once the first is answered
            await wait_for(lambda: line.stats.replies >= answered + first_read, 5, "the probe's first read", 0.005)
            sim.pin("probecell", "grid", "energy_import", 5.0)

        task = asyncio.create_task(reset_meter())
        backwards = await probe_device(line, SDM, unit, pause=0.6)
        await task
        assert backwards.status == "fail" and "went backwards: energy_import" in messages(backwards)
    finally:
        await line.close()
        await sim.stop()


async def _cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(KWWK, "commission", "probe", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, env={"COLUMNS": "220", "PATH": "/usr/bin:/bin"})
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


async def test_cli_probe_exit_codes() -> None:
    async with SimServer({1: image(EM24), 2: image(variant(EM24, word_order="big"))}) as server:
        base = ["--host", "127.0.0.1", "--port", str(server.port), "--profile", "carlo_gavazzi_em24_e1", "--pause", "0"]
        good, good_out = await _cli(*base, "--unit", "1")
        bad, bad_out = await _cli(*base, "--unit", "2")
        unknown, unknown_out = await _cli("--host", "127.0.0.1", "--profile", "acme_nothing")
    assert good == 0, good_out
    assert "PASS" in good_out and "voltage_l1" in good_out and "230.2" in good_out
    assert bad == 1 and "word order looks wrong" in bad_out and "fix:" in bad_out
    assert unknown == 2 and "unknown profile 'acme_nothing'" in unknown_out


async def test_cli_probe_takes_the_device_from_the_cell_config(tmp_path: Path) -> None:
    sim, cfg_path = await start_simulator(_one_meter_cell(tmp_path), tmp_path / "gateway")
    try:
        code, out = await _cli("--cell", str(cfg_path), "--device", "grid", "--pause", "0")
    finally:
        await sim.stop()
    assert code == 0, out
    assert "eastron_sdm630" in out and "frequency" in out

