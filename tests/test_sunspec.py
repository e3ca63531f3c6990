"""SunSpec: discovery, model definitions, decoding, the fixed-layout profiles, and a real TCP server.

pysunspec2 (the SunSpec Alliance's own library, with its own Modbus stack and its own copy of the
model definitions) is the independent reference: it builds register images from raw point values
and decodes them, and our decoder and profiles must agree with it point by point. It is used here
only; edge.sunspec never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import string
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
import sunspec2.device as ss_device
import sunspec2.mdef as ss_mdef
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.modbus import DeviceReader, LineDown, LineSpec, ModbusExceptionReply, ModbusLine, ReadTimeout
from edge.profile import Profile, get_profile, golden_check
from edge.quantities import QUANTITIES
from edge.sunspec import (
    BASE_ADDRESSES, QUANTITY_MAP, UNIMPLEMENTED, ModelDef, ModelRef, SunSpecNotFound, build_image,
    decode_model, discover, encode_model, find_base, get_model, image_reader, line_reader, logical_devices,
    model_ids, read_devices, read_model, read_registers, to_quantities,
)

MODELS = [1, 101, 102, 103, 160, 201, 202, 203, 204]

# ----------------------------------------------------------------------------------------------
# helpers: pysunspec2 as the reference
# ----------------------------------------------------------------------------------------------


def words_of(data: bytes) -> list[int]:
    return [int.from_bytes(data[i: i + 2], "big") for i in range(0, len(data), 2)]


def ss_build(model_id: int, raw: Mapping[str, Any], *, blocks: int = 0,
             length: int | None = None) -> list[int]:
    """Registers of one model as pysunspec2 encodes raw point values (missing = not implemented)."""
    data: dict[str, Any] = {k: v for k, v in raw.items() if "[" not in k and v is not None}
    if model_id == 160:
        data["N"] = raw.get("N", blocks)
        data["module"] = [
            {k.split(".", 1)[1]: v for k, v in raw.items()
             if k.startswith(f"module[{i + 1}].") and v is not None}
            for i in range(blocks)
        ]
    if length is None:
        length = get_model(model_id).length_for(blocks)
    data["ID"] = model_id
    data["L"] = length
    m = ss_device.Model(model_id=model_id, model_len=length, data=data)
    assert not m.error_info, m.error_info
    return words_of(m.get_mb())


def ss_decode(model_id: int, words: list[int]) -> dict[str, Any]:
    """pysunspec2's engineering values (cvalue) of a model's registers, named as decode_model names them."""
    data = b"".join(w.to_bytes(2, "big") for w in words)
    m = ss_device.Model(model_id=model_id, model_len=words[1], data=data)
    assert not m.error_info, m.error_info
    out = {name: p.cvalue for name, p in m.points.items() if p.pdef["type"] != "pad"}
    for gname, groups in m.groups.items():
        for i, g in enumerate(groups):
            for name, p in g.points.items():
                out[f"{gname}[{i + 1}].{name}"] = p.cvalue
    return out


def sf_key(model: ModelDef, name: str) -> str | None:
    """The key of the scale factor that scales the point called name in a decoded dict."""
    if "[" in name:
        prefix, point = name.rsplit(".", 1)
        assert model.repeating is not None
        pdef = next(p for p in model.repeating.points if p.name == point)
        if pdef.sf is None:
            return None
        in_block = any(p.name == pdef.sf for p in model.repeating.points)
        return f"{prefix}.{pdef.sf}" if in_block else pdef.sf
    return model.by_name[name].sf


def assert_same(got: Any, want: Any, where: str) -> None:
    if isinstance(got, float) or isinstance(want, float):
        assert got is not None and want is not None, f"{where}: ours {got!r}, pysunspec2 {want!r}"
        assert math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-12), \
            f"{where}: ours {got!r}, pysunspec2 {want!r}"
    else:
        assert got == want, f"{where}: ours {got!r}, pysunspec2 {want!r}"


def assert_agrees(model_id: int, ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> None:
    """Point by point. The one deliberate difference: when a scale factor is not implemented,
    pysunspec2 hands back the unscaled register value, we say None (the value is meaningless)."""
    model = get_model(model_id)
    assert set(ours) == set(theirs)
    for name, want in theirs.items():
        got = ours[name]
        sf = sf_key(model, name)
        if got is None and want is not None and sf is not None and theirs[sf] is None:
            continue
        assert_same(got, want, f"model {model_id} {name}")


# ----------------------------------------------------------------------------------------------
# register images
# ----------------------------------------------------------------------------------------------

COMMON = {"Mn": "KWWK", "Md": "SunSpecTest", "Opt": "opt-1", "Vr": "1.2.3", "SN": "sn-123456789", "DA": 1}

INVERTER = {
    "A": 105, "AphA": 35, "AphB": 35, "AphC": 35, "A_SF": -1,
    "PhVphA": 2307, "PhVphB": 2305, "PhVphC": 2310, "V_SF": -1,
    "W": 24150, "W_SF": -1, "Hz": 5001, "Hz_SF": -2,
    "VA": 2500, "VA_SF": 0, "VAr": -120, "VAr_SF": 0, "PF": 9550, "PF_SF": -2,
    "WH": 123456, "WH_SF": 1,
    "DCA": 612, "DCA_SF": -2, "DCV": 4003, "DCV_SF": -1, "DCW": 2450, "DCW_SF": 0,
    "TmpCab": 425, "Tmp_SF": -1, "St": 4, "Evt1": 0, "Evt2": 0,
}

METER = {
    "A": 150, "AphA": 50, "AphB": 50, "AphC": 50, "A_SF": -1,
    "PhV": 2308, "PhVphA": 2307, "PhVphB": 2309, "PhVphC": 2308, "PPV": 4000,
    "PhVphAB": 3999, "PhVphBC": 4000, "PhVphCA": 4001, "V_SF": -1,
    "Hz": 5000, "Hz_SF": -2, "W": -3450, "WphA": -1150, "WphB": -1148, "WphC": -1152, "W_SF": 0,
    "VA": 3600, "VA_SF": 0, "VAR": 800, "VAR_SF": 0, "PF": -9550, "PF_SF": -2,
    "TotWhExp": 1234567, "TotWhImp": 12345678, "TotWh_SF": 0, "Evt": 4,
}

MPPT = {
    "DCA_SF": -2, "DCV_SF": -1, "DCW_SF": 0, "DCWH_SF": 1, "Evt": 0, "TmsPer": 60,
    "module[1].ID": 1, "module[1].IDStr": "PV1", "module[1].DCA": 850, "module[1].DCV": 4012,
    "module[1].DCW": 3410, "module[1].DCWH": 98765, "module[1].Tms": 3600, "module[1].Tmp": 38,
    "module[1].DCSt": 4,
    "module[2].ID": 2, "module[2].IDStr": "PV2", "module[2].DCA": 790, "module[2].DCV": 3988,
    "module[2].DCW": 3150, "module[2].DCWH": 91234, "module[2].Tms": 3600, "module[2].Tmp": 37,
    "module[2].DCSt": 4,
}


def typical_image(base: int = 40000) -> dict[int, int]:
    """'SunS', model 1, inverter 103, meter 203, end: the layout pysunspec2's notes describe."""
    return build_image([ss_build(1, COMMON), ss_build(103, INVERTER), ss_build(203, METER)], base)


class CountingReader:
    def __init__(self, image: Mapping[int, int]) -> None:
        self.inner = image_reader(image)
        self.requests: list[tuple[int, int]] = []

    async def __call__(self, address: int, count: int) -> list[int]:
        self.requests.append((address, count))
        return await self.inner(address, count)


# ----------------------------------------------------------------------------------------------
# (1) discovery on register images
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [40000, 0, 50000])
async def test_discovery_finds_marker_at_each_base(base: int) -> None:
    models = await discover(image_reader(typical_image(base)))
    assert models == [
        ModelRef(1, base + 2, 66), ModelRef(103, base + 70, 50), ModelRef(203, base + 122, 105),
    ]
    assert models[-1].end == base + 229  # the end model sits here


async def test_discovery_skips_a_base_with_other_data() -> None:
    image = typical_image(0)
    image.update({40000: 0x1234, 40001: 0x5678})  # something else lives at 40000
    assert await find_base(image_reader(image)) == 0


async def test_no_marker_is_a_clear_error() -> None:
    image = {a: 0 for a in range(40000, 40010)}
    with pytest.raises(SunSpecNotFound) as err:
        await discover(image_reader(image))
    msg = str(err.value)
    for base in BASE_ADDRESSES:
        assert f"{base}:" in msg
    assert "0x0000 0x0000 is not the 'SunS' marker" in msg
    assert "not mapped" in msg


async def test_chain_walk_stops_at_end_model() -> None:
    image = typical_image()
    # registers after the end model look like another model: they must not be walked
    image.update({40229 + 2: 1, 40229 + 3: 66})
    reader = CountingReader(image)
    models = await discover(reader)
    assert [m.model_id for m in models] == [1, 103, 203]
    assert all(addr < 40231 for addr, _ in reader.requests)
    # marker + one header read per model + the end model
    assert len(reader.requests) == 1 + 3 + 1


async def test_end_model_without_length() -> None:
    image = build_image([ss_build(1, COMMON), ss_build(103, INVERTER)], end_length=None)
    assert 40122 + 1 not in image
    models = await discover(image_reader(image))
    assert [m.model_id for m in models] == [1, 103]


async def test_end_model_with_garbage_length_is_ignored() -> None:
    image = build_image([ss_build(1, COMMON)], end_length=0xFFFF)
    assert await discover(image_reader(image)) == [ModelRef(1, 40002, 66)]


async def test_chain_without_end_model_ends_where_the_device_does() -> None:
    image = build_image([ss_build(1, COMMON), ss_build(103, INVERTER)])
    del image[40122], image[40123]
    assert [m.model_id for m in await discover(image_reader(image))] == [1, 103]


async def test_second_model_1_starts_a_new_logical_device() -> None:
    image = build_image([
        ss_build(1, COMMON), ss_build(103, INVERTER), ss_build(160, MPPT, blocks=2),
        ss_build(1, {**COMMON, "Md": "Meter", "SN": "m-1"}), ss_build(203, METER),
        encode_model(1, {"Mn": "odd", "Md": "old", "SN": "x"}, length=65),
    ])
    models = await discover(image_reader(image))
    assert [(m.model_id, m.length) for m in models] == [
        (1, 66), (103, 50), (160, 48), (1, 66), (203, 105), (1, 65),
    ]
    devices = logical_devices(models)
    assert [[m.model_id for m in d] for d in devices] == [[1, 103, 160], [1, 203], [1]]
    read = await read_devices(image_reader(image), models)
    assert [d.serial for d in read] == ["sn-123456789", "m-1", "x"]
    assert read[0].quantities["power"] == 2415.0
    assert read[1].quantities["power"] == -3450.0
    assert read[1].quantities["energy_import"] == 12345.678
    assert read[2].common["Md"] == "old" and "Pad" not in read[2].common


async def test_unknown_models_are_walked_and_reported() -> None:
    vendor = [64001, 4, 1, 2, 3, 4]
    image = build_image([ss_build(1, COMMON), vendor, ss_build(103, INVERTER)])
    models = await discover(image_reader(image))
    assert [m.model_id for m in models] == [1, 64001, 103]
    (dev,) = await read_devices(image_reader(image), models)
    assert dev.unknown == [64001]
    assert dev.quantities["dc_power"] == 2450.0


async def test_reads_longer_than_125_registers_are_split() -> None:
    image = build_image([ss_build(1, COMMON), ss_build(160, MPPT, blocks=6)])
    reader = CountingReader(image)
    models = await discover(reader)
    assert models[1] == ModelRef(160, 40070, 8 + 20 * 6)
    reader.requests.clear()
    words = await read_model(reader, models[1])
    assert len(words) == 130
    assert reader.requests == [(40070, 125), (40195, 5)]
    assert words == [image[a] for a in range(40070, 40200)]
    reader.requests.clear()
    await read_registers(reader, 40002, 68, max_count=30)
    assert reader.requests == [(40002, 30), (40032, 30), (40062, 8)]


async def test_base_probe_survives_timeouts_but_not_a_dead_line() -> None:
    image = typical_image(50000)

    async def slow_at_40000(address: int, count: int) -> list[int]:
        if address == 40000:
            raise ReadTimeout("no answer")
        return await image_reader(image)(address, count)

    assert await find_base(slow_at_40000) == 50000

    async def dead(address: int, count: int) -> list[int]:
        raise LineDown("cannot connect")

    with pytest.raises(LineDown):
        await discover(dead)


async def test_first_header_refused_is_an_error() -> None:
    image = {40000: 0x5375, 40001: 0x6E53}
    with pytest.raises(ModbusExceptionReply):
        await discover(image_reader(image))


# ----------------------------------------------------------------------------------------------
# (2) model definitions and decoding agree with pysunspec2
# ----------------------------------------------------------------------------------------------


def _ss_points(gdef: dict[str, Any]) -> list[tuple[Any, ...]]:
    offset = 0
    rows = []
    for p in gdef["points"]:
        size = int(p.get("size", 1))
        rows.append((p["name"], offset, p["type"], size, p.get("sf"), p.get("units"),
                     p.get("mandatory") == "M", p.get("access", "R")))
        offset += size
    return rows


def _our_points(points: list[Any]) -> list[tuple[Any, ...]]:
    return [(p.name, p.offset, p.type, p.registers, p.sf, p.units, p.mandatory, p.access) for p in points]


@pytest.mark.parametrize("model_id", MODELS)
def test_model_definition_matches_pysunspec2(model_id: int) -> None:
    """Our hand-written YAML against the SunSpec JSON that pysunspec2 ships (test-time only)."""
    ours = get_model(model_id)
    theirs = ss_device.get_model_def(model_id)[ss_mdef.GROUP]
    assert ours.name == theirs["name"]
    assert _our_points(ours.points) == _ss_points(theirs)
    their_sym = {p["name"]: {s["value"]: s["name"] for s in p.get("symbols", [])} for p in theirs["points"]}
    for p in ours.points:
        for value, name in (p.symbols or {}).items():
            assert their_sym[p.name].get(value) == name, (p.name, value)
    if ours.repeating is None:
        assert "groups" not in theirs
        assert ours.length == sum(r[3] for r in _ss_points(theirs)) - 2
    else:
        (group,) = theirs["groups"]
        assert ours.repeating.name == group["name"]
        # the JSON says count 0 ("as many blocks as L holds"); ours names the count point N as well,
        # and decoding takes the number of blocks from L either way
        assert group["count"] in (0, ours.repeating.count)
        assert _our_points(ours.repeating.points) == _ss_points(group)
        assert ours.repeating.length == sum(r[3] for r in _ss_points(group))


def test_model_files_are_the_expected_set() -> None:
    assert model_ids() == MODELS


@pytest.mark.parametrize(("model_id", "raw", "blocks"), [
    (1, COMMON, 0),
    (1, {"Mn": "A", "Md": "B", "SN": "C"}, 0),  # Opt, Vr, DA not implemented
    (103, INVERTER, 0),
    (103, {}, 0),  # nothing implemented
    (103, {**INVERTER, "W_SF": None, "WH": 0, "PhVphB": None, "Hz_SF": 2, "W": -32767}, 0),
    (101, {k: v for k, v in INVERTER.items() if not k.endswith(("phB", "phC"))}, 0),
    (160, MPPT, 2),
    (160, {"DCW_SF": 0, "module[1].DCW": 100}, 1),
    (160, {}, 0),
    (203, METER, 0),
    (203, {**METER, "TotWh_SF": 3, "TotWhExp": 0, "PhVphC": None, "Hz_SF": None, "W": 32767}, 0),
    (201, {"A": 12, "A_SF": 0, "PPVphAB": 400, "V_SF": 0, "W": -5, "W_SF": 3}, 0),
])
def test_decoding_agrees_with_pysunspec2(model_id: int, raw: dict[str, Any], blocks: int) -> None:
    words = ss_build(model_id, raw, blocks=blocks)
    assert encode_model(model_id, raw, blocks=blocks) == words  # our encoder writes the same words
    assert_agrees(model_id, decode_model(model_id, words), ss_decode(model_id, words))


def test_decoded_values_by_hand() -> None:
    """The same numbers a person reads off the spec, independent of both libraries."""
    v = decode_model(103, ss_build(103, INVERTER))
    got = (v["W"], v["WH"], v["Hz"], v["PhVphA"], v["PF"], v["TmpCab"])
    assert got == (2415.0, 1234560.0, 50.01, 230.7, 95.5, 42.5)
    assert v["PPVphAB"] is None and v["TmpSnk"] is None and v["St"] == 4 and v["EvtVnd1"] is None
    m = decode_model(203, ss_build(203, {**METER, "TotWh_SF": None}))
    assert m["W"] == -3450.0 and m["TotWhImp"] is None and m["TotWh_SF"] is None
    c = decode_model(1, ss_build(1, COMMON, length=65))
    assert c["Mn"] == "KWWK" and c["L"] == 65 and "Pad" not in c
    # SunSpec scale factors are -10..10: anything else is a broken register, not a value
    odd = decode_model(103, encode_model(103, {**INVERTER, "W_SF": 11, "Hz_SF": -11, "V_SF": 10}))
    assert odd["W"] is None and odd["Hz"] is None and odd["PhVphA"] == 23070000000000.0
    p = decode_model(160, ss_build(160, MPPT, blocks=2))
    assert p["N"] == 2 and p["module[2].DCA"] == 7.9 and p["module[1].DCWH"] == 987650.0


def test_decoder_rejects_inconsistent_input() -> None:
    words = ss_build(103, INVERTER)
    with pytest.raises(ValueError, match="ID register holds 103"):
        decode_model(203, words)
    with pytest.raises(ValueError, match="needs 52 registers"):
        decode_model(103, words[:40])
    bad160 = encode_model(160, blocks=1)
    bad160[1] = 30  # not 8 + 20 N
    with pytest.raises(ValueError, match="not 8 \\+ 20 x N"):
        decode_model(160, bad160 + [0] * 10)


def _value_for(ptype: str, size: int) -> st.SearchStrategy[Any]:
    """Raw values a device may send, including 'not implemented' (None)."""
    ranges = {
        "int16": (-32767, 32767), "uint16": (0, 0xFFFE), "enum16": (0, 0xFFFE), "bitfield16": (0, 0xFFFE),
        "acc16": (1, 0xFFFF), "int32": (-(2**31) + 1, 2**31 - 1), "uint32": (0, 2**32 - 2),
        "acc32": (1, 2**32 - 1), "enum32": (0, 2**32 - 2), "bitfield32": (0, 2**32 - 2),
        "acc64": (1, 2**64 - 1),
        "sunssf": (-10, 10),
    }
    if ptype == "string":
        alphabet = string.ascii_letters + string.digits + " -._"
        return st.none() | st.text(alphabet, min_size=1, max_size=2 * size)
    lo, hi = ranges[ptype]
    return st.none() | st.integers(lo, hi) | st.sampled_from([lo, hi])


@st.composite
def raw_values(draw: st.DrawFn, model_id: int) -> tuple[dict[str, Any], int]:
    m = get_model(model_id)
    blocks = draw(st.integers(0, 7)) if m.repeating else 0
    raw = {p.name: draw(_value_for(p.type, p.registers))
           for p in m.points if p.name not in ("ID", "L", "N") and p.type != "pad"}
    if m.repeating:
        for b in range(blocks):
            for p in m.repeating.points:
                raw[f"{m.repeating.name}[{b + 1}].{p.name}"] = draw(_value_for(p.type, p.registers))
    return raw, blocks


@pytest.mark.parametrize("model_id", [1, 103, 160, 203])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_images_agree_with_pysunspec2(model_id: int, data: st.DataObject) -> None:
    raw, blocks = data.draw(raw_values(model_id))
    words = ss_build(model_id, raw, blocks=blocks)
    assert encode_model(model_id, raw, blocks=blocks) == words
    ours = decode_model(model_id, words)
    assert_agrees(model_id, ours, ss_decode(model_id, words))
    if model_id in QUANTITY_MAP:
        # the shared-vocabulary view is the same numbers in our units
        for q, v in to_quantities(model_id, ours).items():
            point = next(p for p, (name, _) in QUANTITY_MAP[model_id].items() if name == q)
            exp = QUANTITY_MAP[model_id][point][1]
            assert (v is None) == (ours[point] is None)
            if v is not None:
                assert math.isclose(v, ours[point] * 10**exp, rel_tol=1e-12, abs_tol=1e-12)


_UNIT_EXP = {("W", "W"): 0, ("Wh", "kWh"): -3, ("V", "V"): 0, ("A", "A"): 0, ("Hz", "Hz"): 0, ("VA", "VA"): 0,
             ("var", "var"): 0, ("Pct", ""): -2, ("C", "°C"): 0}


@pytest.mark.parametrize("model_id", sorted(QUANTITY_MAP))
def test_quantity_map_units(model_id: int) -> None:
    """Every mapped point exists, and its exponent turns the SunSpec unit into the quantity's unit."""
    model = get_model(model_id)
    targets = [q for q, _ in QUANTITY_MAP[model_id].values()]
    assert len(targets) == len(set(targets))
    for point, (quantity, exp) in QUANTITY_MAP[model_id].items():
        assert point in model.by_name, point
        units = model.by_name[point].units
        assert quantity in QUANTITIES
        assert _UNIT_EXP[(units, QUANTITIES[quantity].unit)] == exp, (point, quantity)


def test_shared_quantities_of_an_inverter_and_a_meter() -> None:
    inv = to_quantities(103, decode_model(103, ss_build(103, INVERTER)))
    assert inv["power"] == 2415.0 and inv["energy_export"] == 1234.56 and inv["voltage_l1"] == 230.7
    assert inv["frequency"] == 50.01 and inv["dc_power"] == 2450.0 and inv["power_factor"] == 0.955
    assert inv["current_l3"] == 3.5 and inv["temperature"] == 42.5
    met = to_quantities(203, decode_model(203, ss_build(203, METER)))
    assert met["energy_import"] == 12345.678 and met["energy_export"] == 1234.567 and met["power"] == -3450.0
    assert met["voltage_l3"] == 230.8 and met["current_l1"] == 5.0 and met["frequency"] == 50.0
    assert to_quantities(1, decode_model(1, ss_build(1, COMMON))) == {}


# ----------------------------------------------------------------------------------------------
# (3) the fixed-layout profiles
# ----------------------------------------------------------------------------------------------

# profile point -> (model, SunSpec point, factor from the SunSpec unit to the profile unit)
_INV_POINTS: dict[str, tuple[int, str, float]] = {
    "common_model_id": (1, "ID", 1), "common_model_length": (1, "L", 1), "manufacturer": (1, "Mn", 1),
    "device_model": (1, "Md", 1), "firmware_version": (1, "Vr", 1), "serial_number": (1, "SN", 1),
    "model_id": (103, "ID", 1), "model_length": (103, "L", 1),
    "current_total": (103, "A", 1), "current_l1": (103, "AphA", 1), "current_l2": (103, "AphB", 1),
    "current_l3": (103, "AphC", 1), "a_sf": (103, "A_SF", 1),
    "voltage_l1_l2": (103, "PPVphAB", 1), "voltage_l2_l3": (103, "PPVphBC", 1),
    "voltage_l3_l1": (103, "PPVphCA", 1),
    "voltage_l1": (103, "PhVphA", 1), "voltage_l2": (103, "PhVphB", 1), "voltage_l3": (103, "PhVphC", 1),
    "v_sf": (103, "V_SF", 1), "power": (103, "W", 1), "w_sf": (103, "W_SF", 1),
    "frequency": (103, "Hz", 1), "hz_sf": (103, "Hz_SF", 1), "apparent_power": (103, "VA", 1),
    "va_sf": (103, "VA_SF", 1), "reactive_power": (103, "VAr", 1), "var_sf": (103, "VAr_SF", 1),
    "power_factor": (103, "PF", 0.01), "pf_sf": (103, "PF_SF", 1), "energy_export": (103, "WH", 0.001),
    "wh_sf": (103, "WH_SF", 1), "dc_current": (103, "DCA", 1), "dca_sf": (103, "DCA_SF", 1),
    "dc_voltage": (103, "DCV", 1), "dcv_sf": (103, "DCV_SF", 1), "dc_power": (103, "DCW", 1),
    "dcw_sf": (103, "DCW_SF", 1), "temperature": (103, "TmpCab", 1), "tmp_sf": (103, "Tmp_SF", 1),
    "operating_state": (103, "St", 1), "events": (103, "Evt1", 1),
    # helper points (publish: false) that complete models 1 and 103 register by register
    "options": (1, "Opt", 1), "device_address": (1, "DA", 1), "common_pad": (1, "Pad", 1),
    "temperature_heatsink": (103, "TmpSnk", 1), "temperature_transformer": (103, "TmpTrns", 1),
    "temperature_other": (103, "TmpOt", 1), "vendor_state": (103, "StVnd", 1), "events2": (103, "Evt2", 1),
    **{f"vendor_events{i}": (103, f"EvtVnd{i}", 1) for i in range(1, 5)},
}

_MET_POINTS: dict[str, tuple[int, str, float]] = {
    **{k: v for k, v in _INV_POINTS.items() if v[0] == 1},
    "model_id": (203, "ID", 1), "model_length": (203, "L", 1),
    "current_total": (203, "A", 1), "current_l1": (203, "AphA", 1), "current_l2": (203, "AphB", 1),
    "current_l3": (203, "AphC", 1), "a_sf": (203, "A_SF", 1), "voltage_ln": (203, "PhV", 1),
    "voltage_l1": (203, "PhVphA", 1), "voltage_l2": (203, "PhVphB", 1), "voltage_l3": (203, "PhVphC", 1),
    "voltage_ll": (203, "PPV", 1), "voltage_l1_l2": (203, "PhVphAB", 1), "voltage_l2_l3": (203, "PhVphBC", 1),
    "voltage_l3_l1": (203, "PhVphCA", 1), "v_sf": (203, "V_SF", 1), "frequency": (203, "Hz", 1),
    "hz_sf": (203, "Hz_SF", 1), "power": (203, "W", 1), "power_l1": (203, "WphA", 1),
    "power_l2": (203, "WphB", 1),
    "power_l3": (203, "WphC", 1), "w_sf": (203, "W_SF", 1), "apparent_power": (203, "VA", 1),
    "va_sf": (203, "VA_SF", 1), "reactive_power": (203, "VAR", 1), "var_sf": (203, "VAR_SF", 1),
    "power_factor": (203, "PF", 0.01), "pf_sf": (203, "PF_SF", 1), "energy_export": (203, "TotWhExp", 0.001),
    "energy_import": (203, "TotWhImp", 0.001), "tot_wh_sf": (203, "TotWh_SF", 1), "events": (203, "Evt", 1),
    # helper points (publish: false) that complete model 203 register by register
    **{f"apparent_power_l{k}": (203, f"VAph{c}", 1) for k, c in ((1, "A"), (2, "B"), (3, "C"))},
    **{f"reactive_power_l{k}": (203, f"VARph{c}", 1) for k, c in ((1, "A"), (2, "B"), (3, "C"))},
    **{f"power_factor_l{k}": (203, f"PFph{c}", 0.01) for k, c in ((1, "A"), (2, "B"), (3, "C"))},
    **{f"energy_export_l{k}": (203, f"TotWhExpPh{c}", 0.001) for k, c in ((1, "A"), (2, "B"), (3, "C"))},
    **{f"energy_import_l{k}": (203, f"TotWhImpPh{c}", 0.001) for k, c in ((1, "A"), (2, "B"), (3, "C"))},
    **{f"{ours}{suffix}": (203, f"{theirs}{ph}", 0.001)
       for ours, theirs in (
           ("apparent_energy_export", "TotVAhExp"), ("apparent_energy_import", "TotVAhImp"),
           ("reactive_energy_import_q1", "TotVArhImpQ1"), ("reactive_energy_import_q2", "TotVArhImpQ2"),
           ("reactive_energy_export_q3", "TotVArhExpQ3"), ("reactive_energy_export_q4", "TotVArhExpQ4"),
       )
       for suffix, ph in (("", ""), ("_l1", "PhA"), ("_l2", "PhB"), ("_l3", "PhC"))},
    "tot_vah_sf": (203, "TotVAh_SF", 1), "tot_varh_sf": (203, "TotVArh_SF", 1),
}

PROFILES = {"sunspec_inverter_103": (103, _INV_POINTS), "sunspec_meter_203": (203, _MET_POINTS)}


@pytest.mark.parametrize("profile_id", sorted(PROFILES))
def test_profile_golden_vectors(profile_id: str) -> None:
    profile = get_profile(profile_id)
    assert profile.golden
    assert golden_check(profile) == []
    assert "SunSpec Information Model Specification" in profile.source.document


@pytest.mark.parametrize("profile_id", sorted(PROFILES))
def test_profile_golden_check_is_live(profile_id: str) -> None:
    """A wrong word in a vector must be reported, or the check proves nothing."""
    profile = get_profile(profile_id)
    g = profile.golden[0]
    regs = {t: {a: list(w) for a, w in r.items()} for t, r in g.registers.items()}
    addr = profile.wire(profile.by_name["power"])
    regs["holding"][addr][0] ^= 0x0100
    bad = profile.model_copy(update={"golden": [g.model_copy(update={"registers": regs})]})
    assert any("power" in f for f in golden_check(bad))


@pytest.mark.parametrize("profile_id", sorted(PROFILES))
def test_profile_addresses_follow_the_model_definitions(profile_id: str) -> None:
    model_id, table = PROFILES[profile_id]
    profile = get_profile(profile_id)
    start = {1: 40002, model_id: 40070}
    names = {p.name for p in profile.points if p.name != "suns_marker"}
    assert names == set(table), "every profile point needs a cross-check entry"
    # the profile describes every register of both models: the simulator serves a complete chain
    covered = {a for p in profile.points for a in range(profile.wire(p), profile.wire(p) + p.registers)}
    assert set(range(40000, 40070 + get_model(model_id).length + 2)) <= covered
    kinds = {"int16": "s16", "sunssf": "s16", "uint16": "u16", "acc32": "u32", "enum16": "enum",
             "bitfield32": "bitfield32", "string": "string", "pad": "u16"}
    for name, (mid, sunspec, _) in table.items():
        p, d = profile.by_name[name], get_model(mid).by_name[sunspec]
        assert profile.wire(p) == start[mid] + d.offset, name
        assert p.registers == d.registers and p.type == kinds[d.type], name
        if d.sf is not None:
            sf_name = next(n for n, (m2, s2, _) in table.items() if m2 == mid and s2 == d.sf)
            assert p.scale_register == sf_name, name
        if p.not_implemented is not None:
            assert p.not_implemented == UNIMPLEMENTED[d.type], name
        elif mid != 1 and sunspec not in ("ID", "L"):
            pytest.fail(f"{name} has no not_implemented sentinel")
    # shared quantity names mean the same SunSpec point as the discovery mapping
    for point, (quantity, _) in QUANTITY_MAP[model_id].items():
        if quantity in table:
            assert table[quantity][1] == point, quantity


def _profile_image(model_id: int, common: dict[str, Any],
                   values: dict[str, Any]) -> tuple[dict[int, int], list[int]]:
    common_words = ss_build(1, common)
    model_words = ss_build(model_id, values)
    return build_image([common_words, model_words]), model_words


def _check_profile_against_pysunspec2(profile: Profile, model_id: int,
                                      table: dict[str, tuple[int, str, float]],
                                      values: dict[str, Any]) -> None:
    image, model_words = _profile_image(model_id, COMMON, values)
    got = profile.decode({"holding": image})
    theirs = {1: ss_decode(1, ss_build(1, COMMON)), model_id: ss_decode(model_id, model_words)}
    assert got["suns_marker"] == 0x53756E53
    for name, (mid, point, factor) in table.items():
        if point == "Pad":
            continue  # pysunspec2 does not decode padding
        want = theirs[mid][point]
        sf = get_model(mid).by_name[point].sf
        if got[name] is None and want is not None and sf is not None and theirs[mid][sf] is None:
            continue  # pysunspec2 leaves the value unscaled when the SF is not implemented
        if isinstance(want, str) or want is None:
            assert got[name] == want, f"{profile.id} {name}: profile {got[name]!r}, pysunspec2 {want!r}"
            continue
        # Profile.engineering rounds to 10 decimals: compare with that absolute tolerance
        assert got[name] is not None, f"{profile.id} {name}: profile None, pysunspec2 {want!r}"
        assert math.isclose(got[name], want * factor, rel_tol=1e-9, abs_tol=1e-10), \
            f"{profile.id} {name}: profile {got[name]!r}, pysunspec2 {want * factor!r}"


@pytest.mark.parametrize("profile_id", sorted(PROFILES))
@pytest.mark.parametrize("case", ["typical", "empty", "sf_not_implemented"])
def test_profile_decodes_pysunspec2_image(profile_id: str, case: str) -> None:
    model_id, table = PROFILES[profile_id]
    profile = get_profile(profile_id)
    base = INVERTER if model_id == 103 else METER
    values = {"typical": base, "empty": {}, "sf_not_implemented": {**base, "W_SF": None, "V_SF": 2}}[case]
    _check_profile_against_pysunspec2(profile, model_id, table, values)
    rules = profile.decode({"holding": _profile_image(model_id, COMMON, values)[0]})
    for rule in profile.identification:
        assert rules[rule.point] == rule.equals


@pytest.mark.parametrize("profile_id", sorted(PROFILES))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_profile_random_images_agree_with_pysunspec2(profile_id: str, data: st.DataObject) -> None:
    model_id, table = PROFILES[profile_id]
    raw, _ = data.draw(raw_values(model_id))
    _check_profile_against_pysunspec2(get_profile(profile_id), model_id, table, raw)


@pytest.mark.parametrize("profile_id", sorted(PROFILES))
def test_profile_and_discovery_give_the_same_readings(profile_id: str) -> None:
    model_id, _ = PROFILES[profile_id]
    values = INVERTER if model_id == 103 else METER
    image, words = _profile_image(model_id, COMMON, values)
    from_profile = get_profile(profile_id).decode({"holding": image})
    for quantity, v in to_quantities(model_id, decode_model(model_id, words)).items():
        if quantity in from_profile:
            assert from_profile[quantity] == pytest.approx(v, rel=1e-12), quantity


@pytest.mark.parametrize("profile_id", sorted(PROFILES))
async def test_simulated_device_is_a_discoverable_sunspec_device(profile_id: str) -> None:
    """The demo cell's simulator encodes a profile into registers: they must walk and decode as SunSpec."""
    from edge.sim.image import RegisterImage

    model_id, _ = PROFILES[profile_id]
    profile = get_profile(profile_id)
    holding = RegisterImage(profile).tables["holding"]
    read = image_reader(holding)
    models = await discover(read)  # no end model in the image: the chain ends where the registers do
    assert models == [ModelRef(1, 40002, 66), ModelRef(model_id, 40070, get_model(model_id).length)]
    (dev,) = await read_devices(read, models)
    from_profile = profile.decode({"holding": holding})
    for quantity, v in dev.quantities.items():
        if quantity in from_profile:
            want = v if v is None else pytest.approx(v, rel=1e-9, abs=1e-9)
            assert from_profile[quantity] == want, quantity


# ----------------------------------------------------------------------------------------------
# (4) a real Modbus TCP server (pymodbus) read through edge.modbus.ModbusLine
# ----------------------------------------------------------------------------------------------


def _simdata(image: Mapping[int, int]) -> list[Any]:
    """One SimData per contiguous run of the image; unmapped addresses answer exception 2."""
    from pymodbus.simulator import DataType, SimData

    runs: list[list[int]] = []
    for a in sorted(image):
        if runs and a == runs[-1][0] + len(runs[-1]) - 1:
            runs[-1].append(image[a])
        else:
            runs.append([a, image[a]])
    return [SimData(r[0], values=r[1:], datatype=DataType.REGISTERS) for r in runs]


@contextlib.asynccontextmanager
async def serve(image: Mapping[int, int]) -> AsyncIterator[int]:
    """A pymodbus TCP server (SimDevice, unit 1) serving the image on a port the system picks (port 0)."""
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import SimDevice

    server = ModbusTcpServer(SimDevice(id=1, simdata=_simdata(image)), address=("127.0.0.1", 0))
    await server.serve_forever(background=True)
    try:
        yield server.transport.sockets[0].getsockname()[1]
    finally:
        await server.shutdown()


@pytest.fixture
async def sunspec_server() -> AsyncIterator[tuple[int, dict[int, int]]]:
    image = build_image([
        ss_build(1, COMMON), ss_build(103, INVERTER), ss_build(160, MPPT | {
            f"module[{i}].{k}": v for i in range(3, 7) for k, v in (("ID", i), ("DCW", 1000 + i))
        }, blocks=6),
        ss_build(1, {**COMMON, "Md": "Meter", "SN": "m-1"}), ss_build(203, METER),
    ])
    async with serve(image) as port:
        yield port, image


@pytest.mark.integration
async def test_discovery_over_pymodbus_tcp(sunspec_server: tuple[int, dict[int, int]]) -> None:
    port, image = sunspec_server
    line = ModbusLine(LineSpec(kind="tcp", host="127.0.0.1", port=port, timeout=2.0))
    try:
        read = line_reader(line, 1)
        models = await discover(read)
        assert [(m.model_id, m.address, m.length) for m in models] == [
            (1, 40002, 66), (103, 40070, 50), (160, 40122, 128), (1, 40252, 66), (203, 40320, 105),
        ]
        devices = await read_devices(read, models)
        inv, meter = devices
        assert (inv.manufacturer, inv.model, inv.serial) == ("KWWK", "SunSpecTest", "sn-123456789")
        assert inv.quantities["power"] == 2415.0 and inv.quantities["energy_export"] == 1234.56
        assert inv.points[160]["module[6].DCW"] == 1006.0  # read past 125 registers, split
        assert meter.model == "Meter" and meter.quantities["energy_import"] == 12345.678
        # every model decodes over the wire exactly as pysunspec2 decodes the same registers
        for ref in models:
            words = await read_model(read, ref)
            assert words == [image[a] for a in range(ref.address, ref.end)]
            assert_agrees(ref.model_id, decode_model(ref.model_id, words), ss_decode(ref.model_id, words))

        # the fixed-layout inverter profile reads the same device through the read planner
        reader = DeviceReader(line, get_profile("sunspec_inverter_103"), unit_id=1)
        result = await reader.read()
        assert not result.errors
        assert result.values["power"] == 2415.0 and result.values["energy_export"] == 1234.56
        assert result.values["voltage_l1"] == 230.7 and result.values["model_id"] == 103
        assert result.values["manufacturer"] == "KWWK"

        # a unit id with nothing behind it: no marker anywhere
        with pytest.raises(SunSpecNotFound):
            await discover(image_reader({}))
    finally:
        await line.close()


@pytest.mark.integration
async def test_pysunspec2_scan_of_the_same_server_agrees(sunspec_server: tuple[int, dict[int, int]]) -> None:
    """pysunspec2's own Modbus TCP client (its own stack) walks the same chain to the same models."""
    from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP

    port, _ = sunspec_server

    def scan() -> list[tuple[int, int, int, dict[str, Any]]]:
        d = SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr="127.0.0.1", ipport=port, timeout=5)
        try:
            d.scan()
            return [(m.model_id, m.model_addr, m.model_len, m.get_dict(computed=True)) for m in d.model_list]
        finally:
            d.close()

    theirs = await asyncio.to_thread(scan)
    line = ModbusLine(LineSpec(kind="tcp", host="127.0.0.1", port=port, timeout=2.0))
    try:
        ours = await discover(line_reader(line, 1))
    finally:
        await line.close()
    want = [(mid, addr, ln) for mid, addr, ln, _ in theirs]
    assert [(m.model_id, m.address, m.length) for m in ours] == want
    assert theirs[1][3]["W"] == 2415.0


@pytest.mark.integration
async def test_meter_profile_over_pymodbus_tcp() -> None:
    """The fixed-layout meter profile, read through the planner, matches discovery on the same server."""
    image = build_image([ss_build(1, COMMON), ss_build(203, METER)])
    async with serve(image) as port:
        line = ModbusLine(LineSpec(kind="tcp", host="127.0.0.1", port=port, timeout=2.0))
        try:
            reader = DeviceReader(line, get_profile("sunspec_meter_203"), unit_id=1)
            result = await reader.read()
            assert not result.errors and result.requests >= 2  # 40000..40176 does not fit one request
            (dev,) = await read_devices(line_reader(line, 1))
        finally:
            await line.close()
    assert dev.models == [ModelRef(1, 40002, 66), ModelRef(203, 40070, 105)]
    for quantity, v in dev.quantities.items():
        if quantity in result.values:
            assert result.values[quantity] == pytest.approx(v, rel=1e-12), quantity
    assert result.values["energy_import"] == 12345.678 and result.values["power"] == -3450.0
