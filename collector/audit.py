"""Find sequence numbers missing from what is stored, and ask their gateways to send those batches again.

Gaps are read from the database, not from one replica's memory: with a shared subscription each
replica sees only part of a gateway's stream, but every replica writes `kwwk_batches`. The broker
acknowledged the missing batches to the gateway, yet lost them (Mosquitto drops queued messages past
its per-client limit and around its own restart); the gateway still keeps them in its archive.

Memory is bounded by what is stored and by what the audit asks for, never by the value of a number: per
stream at most `max_missing` numbers (the newest) are tracked, `max_open` in all, and a missing run longer
than MAX_SEQ_JUMP (a stream that "begins" at 10^12, a jump no gateway can make) is implausible: counted
(`kwwk_collector_sequence_implausible_total`), logged once, never asked for.

Liveness: `run` never dies of an exception in a round (it is logged and counted, and the round is retried
next interval); `liveness()` says whether rounds complete, for /healthz and /metrics.
"""

from __future__ import annotations

import bisect
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from collector.encode import BATCH_MEASUREMENT, MAX_SEQ_JUMP, StreamKey
from collector.metrics import CollectorMetrics
from collector.query import BlockingInfluxQL, QueryError, Series, ident
from edge.backoff import Backoff
from edge.messages import ResendRequest
from edge.telemetry import resend_topic

__all__ = ["GapAuditor", "Missing", "missing_seqs", "with_audit"]

log = structlog.get_logger("kwwk.collector.audit")
Key = StreamKey  # cell, gateway, stream


@dataclass
class Missing:
    """What is missing of one stream: the numbers to ask for (newest first) and the runs too long to be real."""

    seqs: list[int] = field(default_factory=list)
    implausible: list[tuple[int, int]] = field(default_factory=list)  # [first, last] missing, inclusive
    truncated: int = 0  # plausible missing numbers beyond the limit: asked for once the newer ones are stored


def missing_seqs(stored: Sequence[int], begins_here: bool, limit: int, jump: int = MAX_SEQ_JUMP) -> Missing:
    """The numbers missing between the sorted, distinct `stored` ones (and below the lowest, from 0, for a
    stream that began within the window), the newest `limit` of them; a missing run longer than `jump` is
    implausible and only reported. Time and memory: O(len(stored) + limit), whatever the numbers are."""
    out = Missing()
    if not stored:
        return out
    runs = [(stored[i - 1] + 1, stored[i] - 1) for i in range(len(stored) - 1, 0, -1)]  # newest first
    if begins_here:
        runs.append((0, stored[0] - 1))
    for first, last in runs:
        n = last - first + 1
        if n <= 0:
            continue
        if n > jump:
            out.implausible.append((first, last))
            continue
        take = min(n, limit - len(out.seqs))
        out.seqs.extend(range(last, last - take, -1))
        out.truncated += n - take
    return out


class _Gap:
    __slots__ = ("backoff", "due", "tries")

    def __init__(self, backoff: Backoff, due: float) -> None:
        self.backoff = backoff
        self.due = due  # when to ask (again)
        self.tries = 0


@dataclass
class GapAuditor:
    db: BlockingInfluxQL
    publish: Callable[[str, bytes], None]
    metrics: CollectorMetrics
    window_s: int = 3600
    grace_s: float = 10.0
    retry_s: float = 30.0  # the first wait between requests for one gap; it doubles (jittered) up to 4x
    max_tries: int = 20
    max_missing: int = 10_000  # numbers tracked per stream (the newest); ResendRequests carry 1,000 each
    max_open: int = 50_000  # numbers tracked in all
    #: told the highest plausible number stored per stream after every read (the encoder's `learn`)
    on_streams: Callable[[Mapping[Key, int], float], None] | None = None
    gaps: dict[tuple[Key, int], _Gap] = field(default_factory=dict)
    available: bool = True
    # liveness: set by `run`
    interval_s: float | None = None
    started: float | None = None
    last_round: float | None = None  # when the last round completed (time.time())
    failures: int = 0  # rounds in a row that raised
    last_error: str | None = None
    exited: bool = False
    _stopping: threading.Event | None = field(default=None, repr=False)
    _implausible: set[tuple[Key, int, int]] = field(default_factory=set, repr=False)
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        self.metrics.audit_alive.set_function(lambda: 1.0 if self.liveness()[0] else 0.0)

    def stored_seqs(self) -> tuple[dict[Key, set[int]], dict[Key, int]]:
        """Sequence numbers stored within the window, and the last one of each stream before the window."""
        group = f"GROUP BY {ident('cell')}, {ident('gateway')}, {ident('stream')}"
        recent = f"SELECT {ident('seq')} FROM {ident(BATCH_MEASUREMENT)} WHERE time > now() - {int(self.window_s)}s {group}"
        older = (f"SELECT last({ident('seq')}) FROM {ident(BATCH_MEASUREMENT)} "
                 f"WHERE time <= now() - {int(self.window_s)}s {group}")
        results = self.db.query(recent, older)

        def keyed(result: list[Series]) -> dict[Key, list[list[object]]]:
            return {(s.tags.get("cell", ""), s.tags.get("gateway", ""), s.tags.get("stream", "")): s.values
                    for s in result}

        seqs = {k: {int(v[1]) for v in values} for k, values in keyed(results[0]).items()}  # type: ignore[call-overload]
        before = {k: int(values[-1][1]) for k, values in  # type: ignore[call-overload]
                  (keyed(results[1]) if len(results) > 1 else {}).items() if values}
        return seqs, before

    # -- the audit thread ------------------------------------------------------------------------
    def run(self, stop: threading.Event, interval_s: float, ready: Callable[[], bool]) -> None:
        """Audit every `interval_s` while `ready()` (connected to the broker), until `stop` is set. A round
        that raises is logged and counted; the next one comes as usual."""
        self.interval_s, self._stopping, self.started = interval_s, stop, time.time()
        try:
            try:  # at once, without the broker: the encoder learns every stream's highest number
                self.survey()
            except Exception:
                log.exception("the first look at stored sequence numbers failed")
            while not stop.wait(interval_s):
                try:
                    if ready():
                        self.run_once()
                        self.metrics.audit_rounds.labels("ok" if self.available else "no_database").inc()
                    else:
                        self.metrics.audit_rounds.labels("skipped").inc()
                except Exception as err:  # a bug of ours: keep auditing, and let health say so
                    self.failures += 1
                    self.last_error = f"{type(err).__name__}: {err}"[:300]
                    self.metrics.audit_rounds.labels("failed").inc()
                    if self.failures == 1 or self.failures % 100 == 0:
                        log.exception("a sequence audit round failed", failures=self.failures)
                    continue
                self.failures, self.last_error = 0, None
                self.last_round = time.time()
                self.metrics.audit_last_round.set(self.last_round)
        finally:
            self.exited = True
            if not stop.is_set():
                log.error("the sequence audit stopped; the collector's health fails until it is restarted")

    def stall_after_s(self) -> float:
        """How long without a completed round means the audit is stuck (a query is bounded by its timeout)."""
        return 4 * (self.interval_s or 15.0) + 30.0

    def liveness(self, now: float | None = None) -> tuple[bool, dict[str, Any]]:
        """(alive, what /healthz shows): alive while rounds complete; not started yet counts as alive."""
        now = time.time() if now is None else now
        since = self.last_round or self.started
        age = None if since is None else round(now - since, 1)
        stopping = self._stopping is not None and self._stopping.is_set()
        if self.started is None:
            state = "starting"
        elif self.exited:
            state = "stopped" if stopping else "dead"
        elif self.failures:
            state = "failing"
        elif age is not None and age > self.stall_after_s():
            state = "stalled"
        else:
            state = "ok"
        info: dict[str, Any] = {"state": state, "last_round": self.last_round, "last_round_age_s": age,
                                "database_ok": self.available, "gaps_open": len(self.gaps)}
        if self.last_error:
            info["error"] = self.last_error
        return state in ("ok", "starting", "stopped"), info

    # -- one round ---------------------------------------------------------------------------------
    def survey(self, now: float | None = None) -> tuple[dict[Key, list[int]], dict[Key, Missing]] | None:
        """Read what is stored; per stream the sorted numbers and what is missing. Tells `on_streams` the
        highest plausible number of every stream. None when the database does not answer."""
        now = now or time.time()
        try:
            stored, before = self.stored_seqs()
        except QueryError as err:
            if self.available:
                log.warning("cannot audit sequence numbers: the database does not answer InfluxQL", error=str(err))
            self.available = False
            self.metrics.audit_up.set(0)
            return None
        self.available = True
        self.metrics.audit_up.set(1)
        ordered = {key: sorted(seqs) for key, seqs in stored.items()}
        # a stream that began within the window began at 0: numbers below its lowest stored one are missing too
        missing = {key: missing_seqs(seqs, key not in before, self.max_missing) for key, seqs in ordered.items()}
        if self.on_streams is not None:
            tops = {k: v for k, v in before.items() if k not in stored}
            tops.update({k: _plausible_top(seqs, missing[k].implausible) for k, seqs in ordered.items()})
            self.on_streams(tops, now)
        return ordered, missing

    def run_once(self, now: float | None = None) -> int:
        """One audit; returns how many sequence numbers were requested again."""
        now = now or time.time()
        surveyed = self.survey(now)
        if surveyed is None:
            return 0
        ordered, missing = surveyed
        requested = 0
        live: set[tuple[Key, int]] = set()
        found: dict[Key, int] = {}  # new gaps per stream, for one log line
        asked: dict[Key, int] = {}
        untracked: dict[Key, int] = {}
        for key, m in missing.items():
            if m.truncated:
                untracked[key] = m.truncated
            due: list[int] = []
            for seq in m.seqs:
                gap = self.gaps.get((key, seq))
                if gap is None:
                    if len(self.gaps) >= self.max_open:
                        untracked[key] = untracked.get(key, 0) + 1
                        continue
                    gap = self.gaps[(key, seq)] = _Gap(Backoff(self.retry_s, 4 * self.retry_s, rng=self._rng),
                                                        now + self.grace_s)
                    found[key] = found.get(key, 0) + 1
                live.add((key, seq))
                if now >= gap.due and gap.tries < self.max_tries:
                    gap.due, gap.tries = now + gap.backoff.failure(), gap.tries + 1
                    due.append(seq)
            if key in found:
                self.metrics.seq_gaps.labels(key[0], key[1]).inc(found[key])
            # in a new order each time: a shared subscription deals messages round robin, and a dead replica's
            # session keeps its turn until it expires; the same order could hand it the same batch every time
            random.shuffle(due)
            for chunk in (due[i:i + 1000] for i in range(0, len(due), 1000)):
                self.publish(resend_topic(key[0], key[1]), ResendRequest(stream=key[2], seqs=chunk).to_bytes())
                requested += len(chunk)
                asked[key] = asked.get(key, 0) + len(chunk)
        self._note_implausible({(key, *run) for key, m in missing.items() for run in m.implausible})
        filled = self._forget(live, ordered)
        self.metrics.gaps_open.set(len(self.gaps))
        if found or asked or untracked or filled:  # one line a round, whatever the numbers
            log.info("sequence audit", gaps_found=_per_stream(found), resend_requested=_per_stream(asked),
                     gaps_filled=filled, not_tracked=_per_stream(untracked), gaps_open=len(self.gaps))
        return requested

    def _note_implausible(self, runs: set[tuple[Key, int, int]]) -> None:
        """Count and log each implausible run once (while it stays within the window)."""
        new = runs - self._implausible
        self._implausible = runs
        for key, first, last in sorted(new)[:5]:
            log.warning("implausible sequence numbers: not audited", cell=key[0], gateway=key[1], stream=key[2],
                        missing_from=first, missing_to=last, more=max(0, len(new) - 5))
        for key, _first, _last in new:
            self.metrics.seq_implausible.labels(key[0], key[1]).inc()

    def _forget(self, live: set[tuple[Key, int]], stored: dict[Key, list[int]]) -> int:
        """Drop the gaps no longer missing; count those filled (stored now, not merely out of the window)."""
        filled = 0
        for k in [k for k in self.gaps if k not in live]:
            del self.gaps[k]
            seqs = stored.get(k[0])
            if seqs is not None and _contains(seqs, k[1]):
                self.metrics.gaps_recovered.labels(k[0][0], k[0][1]).inc()
                filled += 1
        return filled


def _contains(sorted_seqs: list[int], seq: int) -> bool:
    i = bisect.bisect_left(sorted_seqs, seq)
    return i < len(sorted_seqs) and sorted_seqs[i] == seq


def _plausible_top(seqs: list[int], implausible: list[tuple[int, int]]) -> int:
    """The highest stored number below the first implausible run: what the stream really reached (0 for a
    stream that "began" at an absurd number: as good as new)."""
    if not implausible:
        return seqs[-1]
    below = bisect.bisect_left(seqs, min(implausible)[0])
    return seqs[below - 1] if below else 0


def _per_stream(counts: dict[Key, int], shown: int = 10) -> dict[str, int]:
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    out = {"/".join(k): n for k, n in items[:shown]}
    if len(items) > shown:
        out["(other streams)"] = sum(n for _k, n in items[shown:])
    return out


def with_audit(health: dict[str, Any], auditor: GapAuditor | None, now: float | None = None) -> dict[str, Any]:
    """A service's health with the audit's liveness added: an audit that died, fails its rounds or has not
    completed one in `stall_after_s` makes the status "degraded" (503)."""
    if auditor is None:
        return health
    alive, info = auditor.liveness(now)
    out = {**health, "audit": info}
    if not alive and out.get("status") == "ok":
        out["status"] = "degraded"
    return out
