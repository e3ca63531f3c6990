"""The read planner: fewest requests within the protocol's and the device's limits."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.planner import PROTOCOL_LIMITS, Request, plan, plan_single
from edge.profile import Profile, get_profile, profile_ids

BIT_TABLES = ("coil", "discrete")


def make_profile(points: list[dict[str, Any]], **limits: Any) -> Profile:
    return Profile.model_validate({
        "id": "test_device",
        "manufacturer": "Test",
        "model": "T1",
        "device_class": "sensor",
        "source": {"document": "made up for a test"},
        "addressing": "raw",
        "limits": limits,
        "points": points,
    })


def pt(name: str, address: int, type_: str = "u16", table: str = "holding", count: int | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "register": table, "address": address, "type": type_}
    if count is not None:
        d["count"] = count
    return d


def spans(profile: Profile, req: Request) -> list[tuple[int, int]]:
    out = []
    for name in req.points:
        p = profile.by_name[name]
        out.append((profile.wire(p), profile.wire(p) + p.registers - 1))
    return sorted(out)


# ---------------------------------------------------------------- examples


def test_contiguous_points_merge_into_one_request() -> None:
    prof = make_profile([pt("a", 0, "f32"), pt("b", 2, "f32"), pt("c", 4, "u16")])
    assert plan(prof) == [Request("holding", 0, 5, ("a", "b", "c"))]


def test_gap_limit() -> None:
    prof = make_profile([pt("a", 0), pt("b", 9), pt("c", 19)], max_gap=8)
    # 8 unused registers between a and b: merged; 9 between b and c: not
    assert plan(prof) == [Request("holding", 0, 10, ("a", "b")), Request("holding", 19, 1, ("c",))]
    assert len(plan(prof, max_gap=0)) == 3
    assert len(plan(prof, max_gap=9)) == 1


def test_size_limit_is_inclusive() -> None:
    prof = make_profile([pt(f"p{i}", i) for i in range(10)], max_registers=5)
    reqs = plan(prof)
    assert [(r.address, r.count) for r in reqs] == [(0, 5), (5, 5)]


def test_max_registers_override_is_capped_at_the_protocol_limit() -> None:
    prof = make_profile([pt(f"p{i}", i * 2, "f32") for i in range(100)], max_registers=125)
    reqs = plan(prof, max_registers=200)
    assert all(r.count <= 125 for r in reqs)
    assert [r.count for r in reqs] == [124, 76]
    assert [r.count for r in plan(prof, max_registers=10)][:2] == [10, 10]
    with pytest.raises(ValueError):
        plan(prof, max_registers=0)


def test_point_inside_a_failing_range_is_read_alone_and_nothing_merges_across_it() -> None:
    # the old planner only looked at the gap between points, so it merged 8 with 10..11 here
    prof = make_profile([pt("a", 8), pt("b", 10, "u32"), pt("c", 12)], failing=[("holding", 10, 11)])
    assert plan(prof) == [Request("holding", 8, 1, ("a",)), Request("holding", 10, 2, ("b",)),
                          Request("holding", 12, 1, ("c",))]


def test_failing_range_in_a_gap_splits() -> None:
    prof = make_profile([pt("a", 0), pt("b", 4)], failing=[("holding", 2, 2)])
    assert len(plan(prof)) == 2
    prof = make_profile([pt("a", 0), pt("b", 4)], failing=[("input", 2, 2)])  # another table
    assert len(plan(prof)) == 1


def test_failing_range_partly_overlapping_a_point() -> None:
    prof = make_profile([pt("a", 0), pt("b", 1, "f64"), pt("c", 5)], failing=[("holding", 4, 9)])
    reqs = plan(prof)
    assert Request("holding", 1, 4, ("b",)) in reqs
    assert Request("holding", 5, 1, ("c",)) in reqs


def test_coils_are_planned_in_bits() -> None:
    pts = [pt(f"c{i}", i, table="coil") for i in range(300)] + [pt("h", 0)]
    prof = make_profile(pts, max_registers=10, max_bits=2000)
    reqs = plan(prof)
    assert Request("coil", 0, 300, tuple(f"c{i}" for i in range(300))) in reqs
    # max_registers and its override concern registers, never bits
    assert any(r.table == "coil" and r.count == 300 for r in plan(prof, max_registers=5))
    prof = make_profile([pt(f"d{i}", i * 3, table="discrete") for i in range(100)], max_bits=100, max_gap=2)
    reqs = plan(prof)
    assert [r.count for r in reqs] == [100, 100, 94]


def test_multi_bit_coil_point_counts_its_bits() -> None:
    prof = make_profile([pt("a", 0, "bitfield", "coil", count=16), pt("b", 16, table="coil")], max_bits=16)
    assert [(r.address, r.count) for r in plan(prof)] == [(0, 16), (16, 1)]


def test_tables_are_planned_separately() -> None:
    prof = make_profile([pt("a", 0, table="input"), pt("b", 1, table="holding"), pt("c", 1, table="input")])
    assert plan(prof) == [Request("holding", 1, 1, ("b",)), Request("input", 0, 2, ("a", "c"))]


def test_breaks() -> None:
    prof = make_profile([pt("a", 0), pt("b", 1), pt("c", 2), pt("d", 3)])
    assert [r.points for r in plan(prof, breaks={("holding", 1), ("holding", 2)})] == [("a",), ("b",), ("c", "d")]
    assert [r.points for r in plan(prof, breaks={("holding", 2)})] == [("a", "b"), ("c", "d")]
    assert [r.points for r in plan(prof, breaks={("input", 2)})] == [("a", "b", "c", "d")]


def test_subset_and_duplicates() -> None:
    prof = make_profile([pt("a", 0), pt("b", 1), pt("c", 2)])
    assert plan(prof, [prof.by_name["c"], prof.by_name["a"], prof.by_name["c"]]) == [
        Request("holding", 0, 3, ("a", "c"))]
    assert plan(prof, []) == []


def test_plan_single() -> None:
    prof = make_profile([pt("b", 4, "f32"), pt("a", 0)])
    assert plan_single(prof) == [Request("holding", 0, 1, ("a",)), Request("holding", 4, 2, ("b",))]


def test_eastron_sdm630() -> None:
    prof = get_profile("eastron_sdm630")
    reqs = plan(prof)
    # 0..17 (nine floats), 52..53, 70..75: the 34-register gap to 52 exceeds max_gap 10
    assert [(r.table, r.address, r.count) for r in reqs] == [("input", 0, 18), ("input", 52, 2), ("input", 70, 6)]


@pytest.mark.parametrize("profile_id", profile_ids())
def test_library_profiles_plan_within_limits(profile_id: str) -> None:
    prof = get_profile(profile_id)
    check_plan(prof, list(prof.points), plan(prof), frozenset())


# ---------------------------------------------------------------- properties


def feasible(prof: Profile, group: list[tuple[int, int, str]], table: str, gap: int, limit: int,
             breaks: frozenset[tuple[str, int]]) -> bool:
    """Whether these sorted spans may form one request: an independent statement of the rules."""
    if len(group) == 1:
        return True
    first, last = group[0][0], max(s[1] for s in group)
    if last - first + 1 > limit:
        return False
    reach = group[0][1]
    for s in group[1:]:
        if s[0] - reach - 1 > gap:
            return False
        reach = max(reach, s[1])
    inside = {b for s in group for b in range(s[0] + 1, s[1] + 1)}  # a point cannot be split
    if any(t == table and first < b <= last and b not in inside for t, b in breaks):
        return False
    return not any(t == table and f0 <= last and first <= f1 for t, f0, f1 in prof.limits.failing)


def device_limit(prof: Profile, table: str) -> int:
    return prof.limits.max_bits if table in BIT_TABLES else prof.limits.max_registers


def check_plan(prof: Profile, points: list, reqs: list[Request], breaks: frozenset[tuple[str, int]]) -> None:
    wanted = {p.name for p in points}
    planned = [n for r in reqs for n in r.points]
    # every point is in exactly one request, and no request holds anything else
    assert sorted(planned) == sorted(wanted)
    gap = prof.limits.max_gap
    for r in reqs:
        assert r.count <= PROTOCOL_LIMITS[r.table]
        sp = spans(prof, r)
        assert all(prof.by_name[n].table == r.table for n in r.points)
        # the request covers its points exactly: it starts at the first and ends at the last
        assert r.address == sp[0][0] and r.last == max(s[1] for s in sp)
        if len(r.points) == 1:
            continue
        assert r.count <= device_limit(prof, r.table)
        reach = sp[0][1]
        for first, last in sp[1:]:
            assert first - reach - 1 <= gap, f"{r}: {first - reach - 1} unused registers > max_gap {gap}"
            reach = max(reach, last)
        for t, f0, f1 in prof.limits.failing:
            assert not (t == r.table and f0 <= r.last and r.address <= f1), f"{r} touches failing {f0}..{f1}"
        inside = {b for first, last in sp for b in range(first + 1, last + 1)}  # a point cannot be split
        for bt, b in breaks:
            assert not (bt == r.table and r.address < b <= r.last and b not in inside), f"{r} straddles break {b}"
    # a point no request ever merges: requests of one point never exceed what the point needs
    for r in reqs:
        if len(r.points) == 1:
            p = prof.by_name[r.points[0]]
            assert r.count == p.registers
    # no other point's registers fall inside a request (it would have had to be in it)
    for r in reqs:
        for p in points:
            if p.table == r.table and p.name not in r.points:
                a = prof.wire(p)
                assert not (r.address <= a and a + p.registers - 1 <= r.last), f"{p.name} lies inside {r}"
    assert len(reqs) <= len(wanted)


def fewest(prof: Profile, points: list, breaks: frozenset[tuple[str, int]]) -> int:
    """The minimum number of requests, by dynamic programming over contiguous runs of sorted points."""
    total = 0
    by_table: dict[str, list[tuple[int, int, str]]] = {}
    for p in points:
        a = prof.wire(p)
        by_table.setdefault(p.table, []).append((a, a + p.registers - 1, p.name))
    for table, items in by_table.items():
        items.sort()
        limit = min(device_limit(prof, table), PROTOCOL_LIMITS[table])
        best = [0] + [10**9] * len(items)
        for j in range(1, len(items) + 1):
            for i in range(j):
                if best[i] + 1 < best[j] and feasible(prof, items[i:j], table, prof.limits.max_gap, limit, breaks):
                    best[j] = best[i] + 1
        total += best[-1]
    return total


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Profile, list, frozenset[tuple[str, int]]]:
    n = draw(st.integers(1, 30))
    tables = draw(st.lists(st.sampled_from(["holding", "input", "coil", "discrete"]), min_size=1, max_size=2,
                           unique=True))
    next_free = {t: draw(st.integers(0, 500)) for t in tables}
    points = []
    for i in range(n):
        table = draw(st.sampled_from(tables))
        next_free[table] += draw(st.integers(0, 12))
        if table in BIT_TABLES:
            count = draw(st.integers(1, 24))
            points.append(pt(f"p{i}", next_free[table], "u16" if count == 1 else "bitfield", table,
                             count=None if count == 1 else count))
        else:
            kind = draw(st.sampled_from(["u16", "s32", "f32", "u64", "string"]))
            length = draw(st.integers(1, 20)) if kind == "string" else None
            points.append(pt(f"p{i}", next_free[table], kind, table, count=length))
            count = length or {"u16": 1, "s32": 2, "f32": 2, "u64": 4}[kind]
        next_free[table] += count
    failing = []
    for _ in range(draw(st.integers(0, 3))):
        table = draw(st.sampled_from(tables))
        a = draw(st.integers(0, next_free[table] + 5))
        failing.append((table, a, a + draw(st.integers(0, 6))))
    prof = make_profile(points, max_registers=draw(st.integers(1, 125)), max_bits=draw(st.integers(1, 120)),
                        max_gap=draw(st.integers(0, 10)), failing=failing)
    subset = draw(st.lists(st.sampled_from(prof.points), unique_by=lambda p: p.name)) if draw(st.booleans()) \
        else list(prof.points)
    breaks = frozenset((draw(st.sampled_from(tables)), draw(st.integers(0, max(next_free.values()))))
                       for _ in range(draw(st.integers(0, 3))))
    return prof, subset, breaks


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_plan_properties(scenario: tuple[Profile, list, frozenset[tuple[str, int]]]) -> None:
    prof, points, breaks = scenario
    reqs = plan(prof, points, breaks=breaks)
    check_plan(prof, points, reqs, breaks)
    # merging never costs more requests than reading point by point, and it is the fewest possible
    assert len(reqs) <= len(plan_single(prof, points))
    assert len(reqs) == fewest(prof, points, breaks)


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_plan_is_deterministic_and_order_independent(scenario: tuple[Profile, list, frozenset]) -> None:
    prof, points, breaks = scenario
    assert plan(prof, points, breaks=breaks) == plan(prof, list(reversed(points)), breaks=breaks)
