"""The sequence audit's pure parts: what is missing of a stream (bounded whatever the numbers), and its liveness
as /healthz and /metrics show it. Against real InfluxDB and a real collector: tests/test_sequence.py."""

from __future__ import annotations

import threading
import time
import tracemalloc
from typing import Any

import pytest

from collector.audit import GapAuditor, missing_seqs, with_audit
from collector.encode import MAX_SEQ_JUMP
from collector.metrics import CollectorMetrics


def test_missing_numbers_between_and_below_a_new_stream() -> None:
    m = missing_seqs([0, 1, 3, 6], begins_here=True, limit=100)
    assert (m.seqs, m.implausible, m.truncated) == ([5, 4, 2], [], 0)
    assert missing_seqs([3, 4, 6], begins_here=True, limit=100).seqs == [5, 2, 1, 0], "a new stream begins at 0"
    assert missing_seqs([3, 4, 6], begins_here=False, limit=100).seqs == [5], "an older one: from its lowest"
    assert missing_seqs([], begins_here=True, limit=100).seqs == []


def test_only_the_newest_missing_numbers_are_kept_up_to_the_limit() -> None:
    m = missing_seqs([0, 50_001], begins_here=True, limit=1000)
    assert m.seqs == list(range(50_000, 49_000, -1))
    assert m.truncated == 49_000, "asked for once the newer ones are stored"


@pytest.mark.parametrize("absurd", [10**12, 2**63 - 1, 3_000_000])
def test_an_absurd_number_is_an_implausible_run_and_costs_no_memory(absurd: int) -> None:
    tracemalloc.start()
    try:
        new = missing_seqs([absurd], begins_here=True, limit=10_000)
        jump = missing_seqs([0, 1, 2, absurd, absurd + 2], begins_here=True, limit=10_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (new.seqs, new.implausible) == ([], [(0, absurd - 1)]), "a new stream 'beginning' there is not audited"
    assert (jump.seqs, jump.implausible) == ([absurd + 1], [(3, absurd - 1)]), "the rest of the stream is"
    assert peak < 1_000_000, f"{peak} bytes for one absurd number"


def test_a_run_of_exactly_the_jump_is_still_audited() -> None:
    m = missing_seqs([0, MAX_SEQ_JUMP + 1], begins_here=False, limit=10)
    assert (len(m.seqs), m.implausible) == (10, [])
    assert missing_seqs([0, MAX_SEQ_JUMP + 2], begins_here=False, limit=10).implausible == [(1, MAX_SEQ_JUMP + 1)]


# -- liveness ------------------------------------------------------------------------------------------------
def _auditor(metrics: CollectorMetrics | None = None) -> GapAuditor:
    # the database is never asked in these tests: `ready` decides what a round does
    return GapAuditor(db=None, publish=lambda _t, _b: None, metrics=metrics or CollectorMetrics())  # type: ignore[arg-type]


def _gauge(metrics: CollectorMetrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


def _run(audit: GapAuditor, ready: Any, stop: threading.Event) -> threading.Thread:
    t = threading.Thread(target=audit.run, args=(stop, 0.01, ready), daemon=True)
    t.start()
    return t


def _wait(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_an_audit_not_started_yet_is_healthy_and_a_running_one_reports_its_rounds() -> None:
    metrics = CollectorMetrics()
    audit = _auditor(metrics)
    alive, info = audit.liveness()
    assert (alive, info["state"]) == (True, "starting")
    stop = threading.Event()
    t = _run(audit, lambda: False, stop)  # no broker: rounds are skipped, and still completed
    try:
        _wait(lambda: audit.last_round is not None, "a completed round")
        health = with_audit({"status": "ok"}, audit)
        assert (health["status"], health["audit"]["state"]) == ("ok", "ok")
        assert _gauge(metrics, "kwwk_collector_audit_alive") == 1
        assert _gauge(metrics, "kwwk_collector_audit_last_round_timestamp_seconds") == pytest.approx(time.time(), abs=5)
    finally:
        stop.set()
        t.join(5)
    assert with_audit({"status": "ok"}, audit)["audit"]["state"] == "stopped", "a clean stop is no failure"


def test_a_round_that_raises_is_survived_and_makes_health_fail_until_one_succeeds() -> None:
    metrics = CollectorMetrics()
    audit = _auditor(metrics)
    broken = [True]

    def ready() -> bool:
        if broken[0]:
            raise RuntimeError("a bug in a round")
        return False

    stop = threading.Event()
    t = _run(audit, ready, stop)
    try:
        _wait(lambda: audit.failures >= 3, "failed rounds")
        assert t.is_alive(), "the audit thread survives a failing round"
        health = with_audit({"status": "ok", "broker_connected": True}, audit)
        assert health["status"] == "degraded"
        assert (health["audit"]["state"], health["audit"]["error"]) == ("failing", "RuntimeError: a bug in a round")
        assert health["broker_connected"] is True, "the rest of the health stays as it was"
        assert _gauge(metrics, "kwwk_collector_audit_alive") == 0
        assert metrics.registry.get_sample_value("kwwk_collector_audit_rounds_total", {"result": "failed"}) >= 3
        broken[0] = False
        _wait(lambda: audit.failures == 0, "a round that succeeds again")
        assert with_audit({"status": "ok"}, audit)["status"] == "ok"
    finally:
        stop.set()
        t.join(5)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the crash is the point
def test_a_dead_audit_thread_makes_health_fail() -> None:
    audit = _auditor()

    def ready() -> bool:
        raise SystemExit  # what no round catches: the thread ends as a crashed one would

    stop = threading.Event()
    t = _run(audit, ready, stop)
    t.join(5)
    assert not t.is_alive()
    health = with_audit({"status": "ok"}, audit)
    assert (health["status"], health["audit"]["state"]) == ("degraded", "dead")


def test_an_audit_that_completes_no_round_for_too_long_is_stalled() -> None:
    audit = _auditor()
    audit.interval_s, audit.started = 15.0, 1000.0
    audit.last_round = 1000.0
    assert audit.liveness(now=1000.0 + audit.stall_after_s() - 1)[1]["state"] == "ok"
    health = with_audit({"status": "ok"}, audit, now=1000.0 + audit.stall_after_s() + 1)
    assert (health["status"], health["audit"]["state"]) == ("degraded", "stalled")
    assert with_audit({"status": "degraded"}, None) == {"status": "degraded"}, "no audit configured: as it was"
