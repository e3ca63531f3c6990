"""Find sequence numbers missing from what is stored, and ask their gateways to send those batches again.

Gaps are read from the database, not from one replica's memory: with a shared subscription each
replica sees only part of a gateway's stream, but every replica writes `kwwk_batches`. The broker
acknowledged the missing batches to the gateway, yet lost them (Mosquitto drops queued messages past
its per-client limit and around its own restart); the gateway still keeps them in its archive.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from collector.encode import BATCH_MEASUREMENT
from collector.metrics import CollectorMetrics
from collector.query import BlockingInfluxQL, QueryError, Series, ident
from edge.backoff import Backoff
from edge.messages import ResendRequest
from edge.telemetry import resend_topic

__all__ = ["GapAuditor"]

log = structlog.get_logger("kwwk.collector.audit")
Key = tuple[str, str, str]  # cell, gateway, stream


@dataclass
class _Gap:
    backoff: Backoff
    due: float  # when to ask (again)
    tries: int = 0


@dataclass
class GapAuditor:
    db: BlockingInfluxQL
    publish: Callable[[str, bytes], None]
    metrics: CollectorMetrics
    window_s: int = 3600
    grace_s: float = 10.0
    retry_s: float = 30.0  # the first wait between requests for one gap; it doubles (jittered) up to 4x
    max_tries: int = 20
    gaps: dict[tuple[Key, int], _Gap] = field(default_factory=dict)
    available: bool = True
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def stored_seqs(self) -> tuple[dict[Key, set[int]], set[Key]]:
        """Sequence numbers stored within the window, and the streams that already existed before it."""
        group = f"GROUP BY {ident('cell')}, {ident('gateway')}, {ident('stream')}"
        recent = f"SELECT {ident('seq')} FROM {ident(BATCH_MEASUREMENT)} WHERE time > now() - {int(self.window_s)}s {group}"
        older = (f"SELECT last({ident('seq')}) FROM {ident(BATCH_MEASUREMENT)} "
                 f"WHERE time <= now() - {int(self.window_s)}s {group}")
        results = self.db.query(recent, older)

        def keyed(result: list[Series]) -> dict[Key, list[list[object]]]:
            return {(s.tags.get("cell", ""), s.tags.get("gateway", ""), s.tags.get("stream", "")): s.values
                    for s in result}

        seqs = {k: {int(v[1]) for v in values} for k, values in keyed(results[0]).items()}  # type: ignore[call-overload]
        return seqs, set(keyed(results[1]) if len(results) > 1 else {})

    def run(self, stop: threading.Event, interval_s: float, ready: Callable[[], bool]) -> None:
        """Audit every `interval_s` while `ready()` (connected to the broker), until `stop` is set."""
        while not stop.wait(interval_s):
            if ready():
                self.run_once()

    def run_once(self, now: float | None = None) -> int:
        """One audit; returns how many sequence numbers were requested again."""
        now = now or time.time()
        try:
            stored, old_streams = self.stored_seqs()
        except QueryError as err:
            if self.available:
                log.warning("cannot audit sequence numbers: the database does not answer InfluxQL", error=str(err))
            self.available = False
            self.metrics.audit_up.set(0)
            return 0
        self.available = True
        self.metrics.audit_up.set(1)
        requested = 0
        live: set[tuple[Key, int]] = set()
        for key, seqs in stored.items():
            # a stream that began within the window began at 0: numbers below its lowest stored one are missing too
            first = min(seqs) if key in old_streams else 0
            missing = set(range(first, max(seqs) + 1)) - seqs
            if len(missing) > 100_000:
                log.error("implausible sequence gap; auditing only the newest", cell=key[0], gateway=key[1],
                          missing=len(missing))
                missing = set(sorted(missing)[-1000:])
            due: list[int] = []
            for seq in missing:
                live.add((key, seq))
                gap = self.gaps.get((key, seq))
                if gap is None:
                    gap = self.gaps[(key, seq)] = _Gap(Backoff(self.retry_s, 4 * self.retry_s, rng=self._rng),
                                                        now + self.grace_s)
                    self.metrics.seq_gaps.labels(key[0], key[1]).inc()
                    log.warning("sequence gap", cell=key[0], gateway=key[1], stream=key[2], seq=seq)
                if now >= gap.due and gap.tries < self.max_tries:
                    gap.due, gap.tries = now + gap.backoff.failure(), gap.tries + 1
                    due.append(seq)
            # in a new order each time: a shared subscription deals messages round robin, and a dead replica's
            # session keeps its turn until it expires; the same order could hand it the same batch every time
            random.shuffle(due)
            for chunk in (due[i:i + 1000] for i in range(0, len(due), 1000)):
                self.publish(resend_topic(key[0], key[1]), ResendRequest(stream=key[2], seqs=chunk).to_bytes())
                requested += len(chunk)
                log.info("asked a gateway to resend", cell=key[0], gateway=key[1], seqs=len(chunk))
        for k in list(self.gaps):
            if k not in live:
                gap = self.gaps.pop(k)
                if k[0] in stored:  # filled, not merely out of the window
                    self.metrics.gaps_recovered.labels(k[0][0], k[0][1]).inc()
                    log.info("sequence gap filled", cell=k[0][0], gateway=k[0][1], seq=k[1], tries=gap.tries)
        self.metrics.gaps_open.set(len(self.gaps))
        return requested
