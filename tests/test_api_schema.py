"""Schemathesis against the OpenAPI spec of a live API with simulator data behind it: whatever the spec
lets a client send, no answer is a 5xx and none carries a stack trace. Operator endpoints are called
with a valid token, so the fuzzing reaches past the login; in half of the cases the cell, device and
times are swapped for real ones, so it also reaches past "unknown cell" into the queries. Bounded:
50 examples per operation.

(schemathesis' own pytest plugin does not run under pytest 9 yet, so each operation's Hypothesis
strategy is driven here directly.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.test_api_data import ApiData, api_data, live_api  # noqa: F401 - shared fixtures

pytestmark = pytest.mark.integration
EXAMPLES = 50
CELLS = st.sampled_from(["musterdorf", "lindenau", "einzelhof", "werkhof"])
DEVICES = st.sampled_from(["grid", "pv1", "heat-school", "water-supply", "chp1"])
TIMES = st.one_of(
    st.sampled_from(["2026-10-31", "2026-11-01", "2026-11-02", "2026-11-02T13:00", "2026-11-02T14:07:13+01:00",
                     "2026-10-25T02:30", "1793574000000", "2000-01-01", "2099-12-31", "2026-11-02T13:00Z"]),
    st.integers(946_684_800_000, 4_102_444_800_000).map(str),
    st.dates().map(lambda d: d.isoformat()))
_MS = st.integers(1_793_000_000_000, 1_794_000_000_000)
RANGES = st.one_of(
    st.tuples(TIMES, TIMES),
    st.tuples(_MS, st.integers(1, 40 * 86_400_000)).map(lambda p: (str(p[0]), str(p[0] + p[1]))),
    st.sampled_from([("2026-10-31", "2026-11-03"), ("2026-11-02T09:00", "2026-11-02T11:00"), ("2026-01-01", "2027-01-01")]))


def _fuzz(operation: object, base_url: str, auth: dict[str, str], seen: set[int]) -> None:
    """EXAMPLES requests the operation's schema allows; none may fail with a 5xx or show a trace."""

    @given(case=operation.as_strategy(), real=st.booleans(), cell=CELLS, device=DEVICES, span=RANGES)  # type: ignore[attr-defined]
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case, real: bool, cell: str, device: str, span: tuple[str, str]) -> None:
        if real:
            if case.path_parameters and "cell" in case.path_parameters:
                case.path_parameters["cell"] = cell
            query = dict(case.query or {})
            for key, value in (("from", span[0]), ("to", span[1]), ("device", device)):
                if key in query:
                    query[key] = value
            case.query = query
        response = case.call(base_url=base_url, headers=auth, timeout=15)
        seen.add(response.status_code)
        where = f"{case.method} {case.formatted_path} query={case.query}"
        assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:300]}"
        assert "Traceback" not in response.text and 'File "' not in response.text, where

    check()


def test_no_request_the_spec_allows_gets_a_5xx(live_api: str, api_data: ApiData) -> None:  # noqa: F811
    schema = schemathesis.openapi.from_url(f"{live_api}/openapi.json")
    failures: list[str] = []
    statuses: dict[str, set[int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        seen = statuses.setdefault(f"{operation.method.upper()} {operation.path}", set())
        try:
            _fuzz(operation, live_api, api_data.auth, seen)
        except AssertionError as err:
            failures.append(str(err).splitlines()[0])
    assert len(statuses) >= 12, sorted(statuses)
    assert not failures, "\n".join(failures)
    # the fuzzing got past the validation into real answers wherever there are any to get
    for name, codes in statuses.items():
        assert 200 in codes, f"{name}: only {sorted(codes)}"
