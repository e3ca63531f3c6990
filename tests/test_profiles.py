"""The device-profile library: every profile loads, its golden vectors decode, and the vectors have teeth.

Golden vectors are register words written by hand from each vendor document. A vector that still
passes after the profile's word order or signedness is flipped proves nothing, so each profile is
also checked against its own mutants. Broken profiles must be rejected with an error that a
technician can act on: file, line, point and field.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from edge.codec import REGISTER_COUNT, shortest_f32
from edge.profile import PROFILE_DIR, Profile, get_profile, golden_check, load_profile, profile_ids
from edge.quantities import QUANTITIES
from edge.sim.image import RegisterImage, image_for, synthetic_values
from edge.yamlio import ConfigError

IDS = profile_ids()

#: profiles the demo cell configuration references, with the shared quantities it relies on
DEMO_CELL: dict[str, set[str]] = {
    "eastron_sdm72": {"power", "energy_import", "energy_export", "voltage_l1", "voltage_l2", "voltage_l3",
                      "current_l1", "current_l2", "current_l3"},
    "kwenergy_smartblock": {"power", "energy_export", "heat_energy", "temp_supply", "temp_return", "runtime",
                            "starts"},
    "grundfos_cim500": {"power", "energy_import", "flow", "head", "speed", "runtime", "starts"},
    "sontex_supercal5": {"heat_energy", "volume", "heat_power", "flow", "temp_supply", "temp_return",
                         "temp_diff"},
    "siemens_mag6000": {"flow", "volume", "volume_reverse"},
    "isma_sfar_1m_4di": {"volume"},
    "janitza_umg96rm": {"power", "voltage_l1", "voltage_l2", "voltage_l3", "current_l1", "current_l2",
                        "current_l3", "frequency", "energy_import", "energy_export"},
}

_SIGN_FLIP = {"s16": "u16", "s32": "u32", "s64": "u64"}
_CUMULATIVE_UNITS = {"Wh", "kWh", "MWh", "varh", "kvarh", "m³", "GJ"}


def _load(profile_id: str) -> Profile:
    return load_profile(PROFILE_DIR / f"{profile_id}.yaml")


def _flip(order: str) -> str:
    return "little" if order == "big" else "big"


def _mutant(profile: Profile, *, words: bool = False, sign: bool = False) -> Profile:
    """The same profile with every point's word order reversed and/or signed types made unsigned."""
    data: dict[str, Any] = profile.model_dump(by_alias=True)
    if words:
        data["word_order"] = _flip(profile.word_order)
    for point, raw in zip(profile.points, data["points"], strict=True):
        if words:
            raw["word_order"] = _flip(profile.orders(point)[0])
        if sign and point.type in _SIGN_FLIP:
            raw["type"] = _SIGN_FLIP[point.type]
    return Profile.model_validate(data)


def _detects(mutant: Profile) -> bool:
    """True when at least one golden vector no longer decodes to the document's values."""
    try:
        return bool(golden_check(mutant))
    except (ArithmeticError, ValueError):
        # e.g. a scale-factor register read as 65535 instead of -1: the vector caught it too
        return True


# --- (e) the library is big enough --------------------------------------------------------------


def test_at_least_ten_profiles() -> None:
    assert len(IDS) >= 10, IDS


def test_demo_cell_profiles_exist_with_their_quantities() -> None:
    missing = {}
    for profile_id, names in DEMO_CELL.items():
        assert profile_id in IDS, f"demo cell references profile {profile_id!r}, which does not exist"
        lacking = names - set(_load(profile_id).by_name)
        if lacking:
            missing[profile_id] = sorted(lacking)
    assert not missing, f"profiles lack shared quantities the demo cell needs: {missing}"


# --- (a) every profile loads and every golden vector decodes --------------------------------------


@pytest.mark.parametrize("profile_id", IDS)
def test_profile_loads_and_golden_vectors_decode(profile_id: str) -> None:
    profile = _load(profile_id)
    assert profile.id == profile_id
    assert golden_check(profile) == []


# --- (d) provenance: a source document and at least one golden vector ----------------------------


@pytest.mark.parametrize("profile_id", IDS)
def test_profile_names_its_source_and_has_golden_vectors(profile_id: str) -> None:
    profile = _load(profile_id)
    assert profile.source.document.strip(), f"{profile_id}: source.document is empty"
    assert profile.golden, f"{profile_id}: no golden vector"
    for vector in profile.golden:
        assert vector.expect, f"{profile_id}: golden {vector.name!r} expects nothing"


@pytest.mark.parametrize("profile_id", IDS)
def test_every_published_numeric_point_has_a_plausible_range(profile_id: str) -> None:
    """Helper points (publish: false, e.g. SunSpec scale factors) are exempt: nobody plots them."""
    profile = _load(profile_id)
    no_range = [p.name for p in profile.points if p.numeric and p.publish and p.range is None]
    assert not no_range, f"{profile_id}: points without a plausible range: {no_range}"


@pytest.mark.parametrize("profile_id", IDS)
def test_every_point_says_where_it_is_in_the_document(profile_id: str) -> None:
    profile = _load(profile_id)
    no_doc = [p.name for p in profile.points if not p.doc]
    assert not no_doc, f"{profile_id}: points without doc (where in the document): {no_doc}"


@pytest.mark.parametrize("profile_id", IDS)
def test_cumulative_units_are_counters(profile_id: str) -> None:
    profile = _load(profile_id)
    wrong = [p.name for p in profile.points if p.unit in _CUMULATIVE_UNITS and p.kind != "counter"]
    assert not wrong, f"{profile_id}: energy/volume points must be kind: counter: {wrong}"


@pytest.mark.parametrize("profile_id", IDS)
def test_golden_values_lie_in_the_points_plausible_range(profile_id: str) -> None:
    profile = _load(profile_id)
    outside = []
    for vector in profile.golden:
        for name, want in vector.expect.items():
            point = profile.by_name[name]
            if isinstance(want, int | float) and point.range is not None:
                low, high = point.range
                if not low <= want <= high:
                    outside.append(f"{vector.name!r}: {name}={want} outside {point.range}")
    assert not outside, f"{profile_id}: " + "; ".join(outside)


def test_shared_quantities_keep_their_unit_and_kind() -> None:
    """Belt and braces for the schema rule: every published shared name has the vocabulary's unit."""
    for profile_id in IDS:
        for point in _load(profile_id).points:
            if point.publish and point.name in QUANTITIES:
                q = QUANTITIES[point.name]
                assert (point.unit, point.kind) == (q.unit, q.kind), f"{profile_id}: {point.name}"


def test_kwenergy_says_whether_it_has_heat_power() -> None:
    profile = _load("kwenergy_smartblock")
    if "heat_power" not in profile.by_name:
        assert profile.notes and "heat_power" in profile.notes, "tell the simulator that heat_power is absent"


def test_mag6000_identifies_itself_by_product_code_24() -> None:
    profile = _load("siemens_mag6000")
    rules = {rule.point: rule.equals for rule in profile.identification}
    assert rules.get("product_code") == 24


# --- (b) mutation: the vectors must notice a wrong word order or signedness -----------------------


def _has_multi_register_values(profile_id: str) -> bool:
    return any(p.numeric and p.registers > 1 and p.table in ("holding", "input") for p in _load(profile_id).points)


def _has_signed_points(profile_id: str) -> bool:
    return any(p.type in _SIGN_FLIP for p in _load(profile_id).points)


# word order cannot matter for a profile of single-register values only, nor signedness without signed points
@pytest.mark.parametrize("profile_id", [i for i in IDS if _has_multi_register_values(i)])
def test_golden_vectors_catch_a_flipped_word_order(profile_id: str) -> None:
    profile = _load(profile_id)
    mutant = _mutant(profile, words=True)
    assert _detects(mutant), (
        f"{profile_id}: every golden vector still passes with word_order flipped; add a vector for each "
        "multi-register type whose words differ (e.g. a u32 above 65535 or a float with a non-zero low word)"
    )


@pytest.mark.parametrize("profile_id", IDS)
def test_golden_vectors_catch_a_flipped_word_order_per_type(profile_id: str) -> None:
    """Each multi-register type needs its own vector: an f32 vector says nothing about a u32."""
    profile = _load(profile_id)
    multi = sorted({p.type for p in profile.points
                    if p.numeric and p.registers > 1 and p.table in ("holding", "input")})
    blind = []
    for dtype in multi:
        data: dict[str, Any] = profile.model_dump(by_alias=True)
        for point, raw in zip(profile.points, data["points"], strict=True):
            if point.type == dtype:
                raw["word_order"] = _flip(profile.orders(point)[0])
        if not _detects(Profile.model_validate(data)):
            blind.append(dtype)
    assert not blind, f"{profile_id}: no golden vector notices a flipped word order for {blind}"


@pytest.mark.parametrize("profile_id", [i for i in IDS if _has_signed_points(i)])
def test_golden_vectors_catch_lost_signedness(profile_id: str) -> None:
    profile = _load(profile_id)
    signed = {p.type for p in profile.points if p.type in _SIGN_FLIP}
    mutant = _mutant(profile, sign=True)
    assert _detects(mutant), (
        f"{profile_id}: golden vectors still pass with {sorted(signed)} read unsigned; add a negative value"
    )


@pytest.mark.parametrize("profile_id", IDS)
def test_golden_vectors_catch_lost_signedness_per_signed_type(profile_id: str) -> None:
    """One negative vector for s16 does not cover an s32: each signed type needs its own."""
    profile = _load(profile_id)
    for dtype in sorted({p.type for p in profile.points if p.type in _SIGN_FLIP}):
        data: dict[str, Any] = profile.model_dump(by_alias=True)
        for raw in data["points"]:
            if raw["type"] == dtype:
                raw["type"] = _SIGN_FLIP[dtype]
        mutant = Profile.model_validate(data)
        assert _detects(mutant), f"{profile_id}: no negative golden value of type {dtype}"


def test_mutation_helper_really_mutates() -> None:
    """The mutants must differ from the original, or the tests above prove nothing."""
    profile = _load("carlo_gavazzi_em24_e1")
    flipped = _mutant(profile, words=True, sign=True)
    assert flipped.word_order != profile.word_order
    pairs = zip(profile.points, flipped.points, strict=True)
    assert all(flipped.orders(m)[0] != profile.orders(o)[0] for o, m in pairs)
    assert not any(p.type in _SIGN_FLIP for p in flipped.points)
    assert _detects(flipped)


# --- (c) broken profiles are rejected with file, line, point and field ----------------------------

_HEAD = """\
manufacturer: Test
model: T-1
device_class: electricity_meter
source:
  document: "Test register map"
  confidence: low
addressing: {addressing}
points:
"""


def _point(name: str, address: int, dtype: str, unit: str, *, extra: str = "") -> str:
    text = f"""\
  - name: {name}
    register: input
    address: {address}
    type: {dtype}
    unit: {unit}
    range: [0, 300]
"""
    return text + textwrap.indent(extra, "    ") if extra else text


def _line_of(text: str, needle: str, start: int = 1) -> int:
    """1-based number of the first line at or after `start` that contains needle."""
    for number, line in enumerate(text.splitlines(), 1):
        if number >= start and needle in line:
            return number
    raise AssertionError(f"{needle!r} not in test profile")


def _block_of(text: str, point: str) -> tuple[int, int]:
    """First and last line of the last point called `point` in a block-style points list."""
    lines = text.splitlines()
    starts = [n for n, line in enumerate(lines, 1) if line.startswith("  - name: ")]
    first = [n for n in starts if lines[n - 1] == f"  - name: {point}"][-1]
    last = next((n - 1 for n in starts if n > first), len(lines))
    return first, last


BAD_PROFILES: dict[str, tuple[str, str, str, str]] = {
    # case: (addressing, points yaml, point named in the error, field named in the error)
    "overlapping_points": (
        "raw",
        _point("voltage_l1", 0, "f32", "V") + _point("voltage_l2", 1, "f32", "V"),
        "voltage_l2", "address"),
    "unknown_type": ("raw", _point("voltage_l1", 0, "float32", "V"), "voltage_l1", "type"),
    "count_does_not_fit_type": (
        "raw", _point("voltage_l1", 0, "f32", "V", extra="count: 1\n"), "voltage_l1", "count"),
    "address_outside_register_space": (
        "raw", _point("voltage_l1", 65535, "f32", "V"), "voltage_l1", "address"),
    "address_outside_modicon_range": (
        "modicon", _point("voltage_l1", 40001, "f32", "V"), "voltage_l1", "address"),
    "duplicate_point_name": (
        "raw",
        _point("voltage_l1", 0, "f32", "V") + _point("voltage_l1", 10, "f32", "V"),
        "voltage_l1", "name"),
    "shared_quantity_wrong_unit": ("raw", _point("power", 0, "f32", "kW"), "power", "unit"),
}


def _rejected(path: Path, text: str) -> ConfigError:
    """Write a profile file and return the ConfigError loading it must raise."""
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_profile(path)
    return caught.value


@pytest.mark.parametrize("case", list(BAD_PROFILES))
def test_bad_profile_is_rejected_naming_file_line_point_and_field(case: str, tmp_path: Path) -> None:
    addressing, points, point, field = BAD_PROFILES[case]
    text = _HEAD.format(addressing=addressing) + points
    path = tmp_path / f"bad_{case}.yaml"
    error = _rejected(path, text)
    message = str(error)

    assert str(path) in message, message
    # point and field must be named by the problem itself (the file name would contain the case name)
    named = [f"{field_path} {msg}" for _line, field_path, msg in error.problems]
    assert any(f"points[{point}]" in problem for problem in named), message
    assert any(re.search(rf"\b{field}\b", problem) for problem in named), message
    # the line must lie inside the offending point's block (the later one of an overlapping/duplicate pair)
    first, last = _block_of(text, point)
    lines = [line for line, _field, _msg in error.problems]
    assert lines, message
    assert all(line is not None and first <= line <= last for line in lines), (lines, first, last, message)
    assert f":{lines[0]}:" in message


@pytest.mark.parametrize("case", ["count_does_not_fit_type", "shared_quantity_wrong_unit"])
def test_bad_field_error_points_at_the_fields_own_line(case: str, tmp_path: Path) -> None:
    addressing, points, point, field = BAD_PROFILES[case]
    text = _HEAD.format(addressing=addressing) + points
    line, field_path, _msg = _rejected(tmp_path / f"bad_{case}.yaml", text).problems[0]
    assert field_path == f"points[{point}].{field}"
    assert line == _line_of(text, f"{field}:", start=_line_of(text, f"- name: {point}"))


def test_profile_without_source_is_rejected(tmp_path: Path) -> None:
    text = "\n".join(line for line in _HEAD.format(addressing="raw").splitlines()
                     if not line.startswith(("source:", "  document:", "  confidence:"))) + "\n"
    text += _point("voltage_l1", 0, "f32", "V")
    path = tmp_path / "no_source.yaml"
    error = _rejected(path, text)
    message = str(error)
    assert str(path) in message
    assert "source" in message and "missing" in message
    assert all(line is not None for line, _f, _m in error.problems)


def test_profile_with_empty_source_document_is_rejected(tmp_path: Path) -> None:
    text = _HEAD.format(addressing="raw").replace('"Test register map"', '""')
    text += _point("voltage_l1", 0, "f32", "V")
    message = str(_rejected(tmp_path / "empty_source.yaml", text))
    assert "source.document" in message
    assert f":{_line_of(text, 'document:')}:" in message


def test_modicon_40000_is_not_an_input_register(tmp_path: Path) -> None:
    text = _HEAD.format(addressing="modicon") + _point("voltage_l1", 40000, "u16", "V")
    _rejected(tmp_path / "bad_input_40000.yaml", text)


def test_golden_vector_for_an_unknown_point_is_rejected(tmp_path: Path) -> None:
    text = _HEAD.format(addressing="raw") + _point("voltage_l1", 0, "f32", "V") + textwrap.dedent("""\
        golden:
          - name: typo
            source: "test"
            registers: {input: {0: [0x4366, 0x0000]}}
            expect: {voltage_11: 230.0}
        """)
    message = str(_rejected(tmp_path / "bad_golden.yaml", text))
    assert "voltage_11" in message
    assert f":{_line_of(text, 'voltage_11')}:" in message


def test_golden_check_reports_a_wrong_expectation(tmp_path: Path) -> None:
    """golden_check itself must fail loudly, or every test above is vacuous."""
    text = _HEAD.format(addressing="raw") + _point("voltage_l1", 0, "f32", "V") + textwrap.dedent("""\
        golden:
          - name: off by one volt
            source: "test"
            registers: {input: {0: [0x4366, 0x0000]}}
            expect: {voltage_l1: 231.0}
        """)
    path = tmp_path / "wrong_golden.yaml"
    path.write_text(text, encoding="utf-8")
    failures = golden_check(load_profile(path))
    assert len(failures) == 1 and "voltage_l1" in failures[0] and "230.0" in failures[0]


def test_sign_flip_keeps_the_register_count() -> None:
    """Guards the mutation helper: flipping signedness must keep the registers a point spans."""
    for signed, unsigned in _SIGN_FLIP.items():
        assert REGISTER_COUNT[signed] == REGISTER_COUNT[unsigned]


def test_float32_values_are_published_as_the_meter_meant_them() -> None:
    """An SDM630 voltage of 230.1 V arrives as float32 0x4366 0x199A, which is 230.10000610351562 as a double:
    the gateway publishes 230.1 (the same float32, the shortest decimal), not 17 digits of conversion noise."""
    sdm = get_profile("eastron_sdm630")
    assert sdm.decode({"input": {0: 0x4366, 1: 0x199A}})["voltage_l1"] == 230.1
    assert sdm.decode({"input": {70: 0x4247, 71: 0xEB85}})["frequency"] == 49.98
    assert shortest_f32(123456792.0) == 123456790.0  # 9 digits at most: still the same float32
    assert shortest_f32(1.0000000116860974e-07) == 1e-07


# --- the one encoder of test servers and the simulator: values -> registers -> the same values ---


@pytest.mark.parametrize("profile_id", IDS)
def test_encoded_values_decode_back_through_the_profile(profile_id: str) -> None:
    """image_for (test servers, benchmarks) and RegisterImage (the simulator) encode what decode_points reads,
    scale factors included: a value that does not fit its register would otherwise be served clamped."""
    profile = get_profile(profile_id)
    values = synthetic_values(profile)
    decoded = profile.decode_points(image_for(profile, values))
    assert not (decoded.missing or decoded.undecodable or decoded.unscaled)
    for name, want in values.items():
        p, got = profile.by_name[name], decoded.values[name]
        if not p.scale_register:
            assert got == (pytest.approx(want, rel=1e-6) if isinstance(want, float) else want), name
            continue
        # a scale factor shared with larger values costs a small one its resolution (down to 0: not implemented)
        step = p.scale * 10.0 ** int(decoded.raw[p.scale_register])  # type: ignore[arg-type]
        if got is None:
            assert abs(want) < step, name
        else:
            assert abs(got - want) <= step / 2, name
    served = profile.decode_points(RegisterImage(profile).tables)
    assert set(served.values) == {p.name for p in profile.points}  # the simulator serves every point


def test_a_missing_scale_factor_or_register_leaves_the_value_out_and_says_why() -> None:
    sunspec = get_profile("sunspec_meter_203")
    image = image_for(sunspec, {"power": 1500.0})
    sf = sunspec.by_name["power"].scale_register
    assert sf is not None and sunspec.decode_points(image).values["power"] == 1500.0
    del image["holding"][sunspec.wire(sunspec.by_name[sf])]
    decoded = sunspec.decode_points(image, [sunspec.by_name["power"], sunspec.by_name[sf]])
    assert decoded.missing == [sf] and decoded.unscaled == {"power": sf} and "power" not in decoded.values
    golden = sunspec.decode_points({}, [sunspec.by_name["frequency"]])
    assert golden.missing == ["frequency"] and not golden.values


_SIM_CELLS = sorted([*(Path(__file__).parent.parent / "firmware_configs/cells").glob("*.yaml"),
                     *(Path(__file__).parent / "data").glob("*cell.yaml")])


@pytest.mark.parametrize("cell_path", _SIM_CELLS, ids=[f"{p.parent.name}/{p.name}" for p in _SIM_CELLS])
def test_the_simulated_sites_stay_within_their_profiles_plausible_ranges_all_year(cell_path: Path) -> None:
    """Every quarter hour of every fourth day of a year: each value the simulator serves lies in its point's plausible
    range. A range narrower than what the site really does (seen: a grid meter at 100.4 A at the evening peak,
    against 0-100 A) made probe and verify fail only at certain hours of the day."""
    from edge.cell import load_cell
    from edge.sim.site import Site

    cfg = load_cell(cell_path)
    start = 1_798_761_600  # 2027-01-01 00:00 UTC
    outside: dict[tuple[str, str], tuple[float, tuple[float, float]]] = {}
    checked = 0
    for t in range(start, start + 365 * 86400, 4 * 86400 + 3600):  # the hour moves a step each time
        for quarter in range(96):
            site = Site(cfg, t + quarter * 900)
            for device, values in site.state.items():
                profile = cfg.profiles[device]
                for name, value in values.items():
                    point = profile.by_name.get(name)
                    if point is None or point.range is None:
                        continue
                    checked += 1
                    low, high = point.range
                    if not low <= value <= high:
                        outside.setdefault((device, name), (value, (low, high)))
    assert checked > 1_000
    assert not outside, f"{cell_path.name}: simulated values outside the profile's plausible range: {outside}"
