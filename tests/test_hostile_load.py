"""Hostile input cannot flood the log nor grow the collector without bound: edge.ratelimit's summaries (the
first of each kind at once, then a line per interval with counts), and 10,000 hostile payloads through a real
collector process (Mosquitto, InfluxDB): every one dead-lettered with its reason, under 100 log lines, peak RSS
printed and bounded."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge.messages import DEADLETTER_PAYLOAD_MAX
from edge.ratelimit import OTHER, LogSummary, summarised
from kwwk.dev.localservers import InfluxDB1, Mosquitto
from tests.conftest import ROOT
from tests.helpers import Recorder, wait_until

# --- the summary, on its own -------------------------------------------------------------------------------


class _Log:
    """A keyword logger that keeps its lines."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))

    def summaries(self) -> list[dict[str, Any]]:
        return [f for e, f in self.lines if e.endswith(": summary")]


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _summary(log: _Log, clock: _Clock, interval: float = 60.0, **kw: Any) -> LogSummary:
    return LogSummary(log, "dead-lettered", interval_s=interval, clock=clock, autoflush=False, **kw)


def test_the_first_of_each_reason_at_once_then_one_summary_per_interval_with_counts() -> None:
    log, clock = _Log(), _Clock()
    s = _summary(log, clock)
    for i in range(10_000):  # five intervals of three reasons
        clock.now = 1000.0 + i * 0.03
        s(("bad_json", "bad_schema", "topic_mismatch")[i % 3], detail=f"message {i}")
    s.flush()
    firsts = [f for e, f in log.lines if e == "dead-lettered"]
    assert [f["detail"] for f in firsts] == ["message 0", "message 1", "message 2"]
    assert all(f["count"] == 1 and f["summary_every_s"] == 60.0 for f in firsts)
    summaries = log.summaries()
    assert len(summaries) == 5 and len(log.lines) == 8  # 10,000 occurrences, 8 lines
    assert sum(sum(s["counts"].values()) for s in summaries) == 10_000 - 3
    # the first interval: occurrences 0..1999, less the three logged at once
    assert summaries[0]["counts"] == {"bad_json": 666, "bad_schema": 666, "topic_mismatch": 665}
    assert summaries[0]["occurrences"] == 1997 and summaries[0]["interval_s"] == pytest.approx(60, abs=0.1)
    assert summaries[-1]["last"]["bad_json"] == {"detail": "message 9999"}


def test_a_reason_quiet_for_an_interval_is_logged_at_once_again() -> None:
    log, clock = _Log(), _Clock()
    s = _summary(log, clock)
    s("bad_json", detail="a")
    s("bad_json", detail="b")  # counted
    clock.now += 61
    s("bad_schema", detail="c")  # rolls over: the summary of bad_json, then bad_schema at once
    clock.now += 61
    s("bad_json", detail="d")  # bad_json was repeated in the first interval, quiet in the second: at once
    assert [(e, f.get("detail") or f["counts"]) for e, f in log.lines] == [
        ("dead-lettered", "a"), ("dead-lettered: summary", {"bad_json": 1}), ("dead-lettered", "c"),
        ("dead-lettered", "d")]


def test_counts_are_weighted_and_too_many_keys_are_counted_together() -> None:
    log, clock = _Log(), _Clock()
    s = _summary(log, clock, max_keys=2)
    for n in (5, 7, 11):
        s("drop_oldest", count=n, policy="drop_oldest")
    for device in ("a", "b", "c", "d"):
        s(device)
    s.flush()
    assert [f["count"] for e, f in log.lines if e == "dead-lettered"] == [5, 1]  # drop_oldest and "a" at once
    assert log.summaries()[0]["counts"] == {"drop_oldest": 18, OTHER: 3}


def test_a_pending_summary_is_logged_when_its_interval_ends_without_another_call() -> None:
    log = _Log()
    s = LogSummary(log, "device read failed", interval_s=0.2)
    s(("grid", "timeout"), error="no answer")
    s(("grid", "timeout"), error="no answer again")
    found = wait_until(log.summaries, 5, "the timer's summary")
    assert found[0]["counts"] == {"grid/timeout": 1}


def test_summarised_keeps_one_summary_per_logger_and_event() -> None:
    log = _Log()
    for _ in range(100):
        summarised(log, "outbox overflow: readings dropped", "drop_oldest", count=3)
    summarised(log, "another event", "drop_oldest")
    assert [e for e, _ in log.lines] == ["outbox overflow: readings dropped", "another event"]


async def test_an_overflowing_outbox_logs_its_first_drop_not_a_line_per_append(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    from edge.telemetry import Reading
    from gateway.outbox import Outbox

    outbox = Outbox(tmp_path / "ob.sqlite", max_readings=10)
    with capture_logs() as logs:
        for k in range(500):  # every append (a poll) overflows; no broker: each is committed
            await outbox.append([Reading("grid", "power", 1_795_304_815_000 + k, 1.0)])
    await outbox.close()
    assert outbox.dropped == {"full_drop_oldest": 490}
    assert len([entry for entry in logs if entry["event"].startswith("outbox overflow")]) <= 2, logs[:5]


# --- 10,000 hostile payloads through a real collector --------------------------------------------------------

TOPIC = "kwwk/v1/twocell/gw-two/telemetry"
HOSTILE = 10_000


def _body(i: int, now: int, **over: Any) -> dict[str, Any]:
    body = {"schema": "kwwk.telemetry/2", "cell": "twocell", "gateway": "gw-two", "stream": "hostile", "seq": i,
            "sent": now, "replay": False, "polls": [{"device": "grid", "ts": now, "values": {"power": 1.5}}]}
    return {**body, **over}


def _poll(i: int, now: int, **over: Any) -> dict[str, Any]:
    return _body(i, now, polls=[{"device": "grid", "ts": now, "values": {"power": 1.5}, **over}])


def _j(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def _hostile(n: int) -> list[tuple[str, bytes, str]]:
    """(topic, payload, the reason its dead letter must give): n distinct payloads of the kinds an attacker with
    a gateway's credentials, or a broken gateway, sends. None of them is stored."""
    now = int(time.time() * 1000)
    future = now + 3_600_000
    kinds: list[Callable[[int], tuple[str, bytes, str]]] = [
        lambda i: (TOPIC, f"not json {i}".encode(), "bad_json"),
        lambda i: (TOPIC, _j(_body(i, now))[:-2], "bad_json"),
        lambda i: (TOPIC, b"\xff\xfe" + str(i).encode(), "bad_json"),
        lambda i: (TOPIC, b"[" * 3000 + str(i).encode(), "bad_json"),  # nesting past the parser's limit
        lambda i: (TOPIC, _j(_body(i, now, seq=str(i))), "bad_schema"),
        lambda i: (TOPIC, _j(_body(i, now, replay="yes")), "bad_schema"),
        lambda i: (TOPIC, _j(_body(i, now, sent=now + 0.5)), "bad_schema"),
        lambda i: (TOPIC, _j(_body(i, now, sent=4_070_908_800_000)), "bad_schema"),  # 2099
        lambda i: (TOPIC, _j(_poll(i, now, ts=future)), "bad_schema"),
        lambda i: (TOPIC, _j(_body(i, now, seq=10**30 + i)), "bad_schema"),
        lambda i: (TOPIC, _j(_body(-i - 1, now)), "bad_schema"),
        lambda i: (TOPIC, _j(_body(i, now)).replace(b'"power": 1.5', b'"power": NaN'), "bad_schema"),
        lambda i: (TOPIC, _j(_poll(i, now, values={f"p{k}": 1.0 for k in range(1001)})), "bad_schema"),
        lambda i: (TOPIC, _j(_body(i, now, schema="kwwk.telemetry/3")), "bad_schema"),
        lambda i: (TOPIC, _j(_body(i, now, polls=[])), "bad_schema"),
        lambda i: (TOPIC, _j(_body(i, now, admin=True)), "bad_schema"),
        lambda i: ("kwwk/v1/twocell/gw-ghost/telemetry", _j(_body(i, now)), "topic_mismatch"),
        lambda i: ("kwwk/v1/twocell/gw-ghost/telemetry", _j(_body(i, now, gateway="gw-ghost")), "unknown_gateway"),
        lambda i: ("kwwk/v1/nowhere/gw-two/telemetry", _j(_body(i, now, cell="nowhere")), "unknown_cell"),
    ]
    out = [kinds[i % len(kinds)](i) for i in range(n)]
    for i in range(0, n, 100):  # one in a hundred is large: 200 kB, refused for its unknown field
        out[i] = (TOPIC, json.dumps({"n": i, **_body(i, now), "pad": "x" * 200_000}).encode(), "bad_schema")
    return out


def _echo(payload: bytes) -> str:
    """What a dead letter carries of a payload."""
    return payload[:DEADLETTER_PAYLOAD_MAX].decode("utf-8", errors="replace")


def _vm(pid: int, field: str) -> float:
    """VmRSS / VmHWM (peak) of a process, MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def _log_lines(log: Path, start: int = 0) -> list[dict[str, Any]]:
    with log.open("rb") as f:
        f.seek(start)
        return [json.loads(line) for line in f.read().splitlines() if line.startswith(b"{")]


def _logged_dead_letters(lines: list[dict[str, Any]]) -> int:
    """Dead letters the log accounts for: the ones logged one by one, plus the summaries' counts."""
    return sum(1 for ln in lines if ln["event"] == "dead-lettered") + sum(
        sum(ln["counts"].values()) for ln in lines if ln["event"] == "dead-lettered: summary")


def _probe(pub: mqtt.Client, letters: Recorder, topic: str, wrap: Callable[[str], bytes], what: str,
           timeout: float = 30) -> None:
    """Publish numbered probes until one comes back as a dead letter: then the subscriptions are in place
    (a message published before a subscription exists is lost, so each try is a new probe)."""
    deadline = time.monotonic() + timeout
    k = 0
    while time.monotonic() < deadline:
        k += 1
        probe = f"{what}: probe {k}"
        pub.publish(topic, wrap(probe), qos=1)
        answer = time.monotonic() + 0.5
        while time.monotonic() < answer:
            if any(d.get("payload") == probe for d in letters.snapshot()):
                return
            time.sleep(0.02)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.integration
async def test_ten_thousand_hostile_payloads_are_dead_lettered_in_a_few_log_lines_and_bounded_memory(
        tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_collector import CollectorProc

    cells = tmp_path / "cells"
    cells.mkdir()
    (cells / "twocell.yaml").write_text((ROOT / "tests/data/twocell.yaml").read_text())
    monkeypatch.setenv("KWWK_LOG_SUMMARY_S", "5")  # a summary every 5 s, so the test sees several
    monkeypatch.setenv("KWWK_DEADLETTER_DIR", str(tmp_path / "deadletters"))  # the durable copies: not in var/
    log = tmp_path / "collector.log"
    collector = CollectorProc(cells, mosquitto, influxdb, "hostile-collector", log)
    letters = Recorder(mosquitto.port, topic="kwwk/v1/_deadletter/#", client_id="hostile-deadletters")
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="hostile-gateway", protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    try:
        await collector.started()

        # ready: the recorder gets dead letters, and the collector has subscribed (it counts a probe's rejection)
        _probe(pub, letters, "kwwk/v1/_deadletter/probe/probe", lambda p: json.dumps({"payload": p}).encode(),
               "the recorder subscribed")
        probes = iter(range(1, 10**6))

        def collector_took_a_probe() -> bool:  # its subscription is in place once it dead-letters one
            if collector.metric("kwwk_collector_rejects_total") > 0:
                return True
            pub.publish(TOPIC, f"collector probe {next(probes)}", qos=1)
            return False

        wait_until(collector_took_a_probe, 30, "the collector dead-lettering a probe", interval=0.3)
        rss_before = _vm(collector.proc.pid, "VmRSS")
        log_from = log.stat().st_size
        before = len(letters.snapshot())

        cases = _hostile(HOSTILE)
        want = {(topic, _echo(payload)): reason for topic, payload, reason in cases}
        assert len(want) == HOSTILE, "every hostile payload is distinct"
        t0 = time.monotonic()
        infos = [pub.publish(topic, payload, qos=1) for topic, payload, _ in cases]
        wait_until(lambda: all(i.is_published() for i in infos), 120, "every hostile payload published", interval=0.5)

        def hostile_letters() -> dict[tuple[str, str], dict[str, Any]] | None:
            got = {(d.get("topic"), d.get("payload")): d for d in letters.snapshot()[before:]}
            got = {k: d for k, d in got.items() if k in want}
            return got if len(got) == HOSTILE else None

        got = wait_until(hostile_letters, 180,
                         lambda: f"{HOSTILE} dead letters (have {len(letters.snapshot()) - before})", interval=0.5)
        took = time.monotonic() - t0
        peak = _vm(collector.proc.pid, "VmHWM")
        wrong = [(k[0], k[1][:80], d["reason"], want[k]) for k, d in got.items() if d["reason"] != want[k]]
        assert not wrong, wrong[:10]
        assert all(d["detail"] for d in got.values()), "each dead letter says what was wrong"
        named = Counter(d["detail"].split(":")[0] for d in got.values() if d["reason"] == "bad_schema")
        assert {"seq", "replay", "sent", "polls.0.ts", "polls.0.values.power", "schema", "polls", "admin"} <= set(named)

        # the log accounts for every dead letter (the last summary comes when its interval ends) in few lines
        rejected = collector.metric("kwwk_collector_rejects_total")  # every dead letter, the probes' too
        assert rejected >= HOSTILE
        wait_until(lambda: _logged_dead_letters(_log_lines(log)) >= rejected, 30,
                   lambda: f"the log's summaries to count all {rejected:.0f} dead letters "
                           f"(counted {_logged_dead_letters(_log_lines(log))})")
        assert _logged_dead_letters(_log_lines(log)) == rejected
        phase = _log_lines(log, log_from)
        events = Counter(ln["event"] for ln in phase)
        print(f"\n{HOSTILE} hostile payloads: dead-lettered in {took:.1f} s; collector log {len(phase)} lines "
              f"({dict(events)}); RSS {rss_before:.0f} MB before, peak (VmHWM) {peak:.0f} MB")
        assert len(phase) < 100, events
        assert peak < 150, f"collector peak RSS {peak:.0f} MB"
        assert collector.proc.poll() is None, "the collector is still up"
    finally:
        pub.loop_stop()
        pub.disconnect()
        letters.close()
        collector.stop()
