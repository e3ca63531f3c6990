"""Warnings that cannot flood a log: the first of each kind at once, then one summary per interval with counts.

A hostile or broken sender can make a service warn once per message (10,000 bad messages, 10,000 lines) and a
device that is away makes a gateway warn once per poll. `LogSummary` logs the first occurrence of each key (a
reason, a device) at once, with its fields, and counts the ones after it; at most once per interval it logs
one summary line with the count per key. A key that stays quiet for a whole interval is logged at once again
the next time it occurs. The number of lines is bounded by the number of keys and the time, never by the
number of messages. The interval is 60 s, or `KWWK_LOG_SUMMARY_S` from the environment (read when a
summary is created).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["LogSummary", "summarised"]

#: seconds between two summaries of one LogSummary, unless KWWK_LOG_SUMMARY_S says otherwise
SUMMARY_INTERVAL_S = 60.0
#: keys counted separately; more distinct keys within one interval are counted together as OTHER
MAX_KEYS = 64
OTHER = "(other)"


class LogSummary:
    """Rate-limited warnings of one event (e.g. "dead-lettered"), keyed by what kind of occurrence it is.

    `logger` is a structlog (or stdlib-compatible keyword) logger; `level` the method called on it. The first
    line of a key carries its fields, `count` and `summary_every_s` (so a reader knows more may follow). The
    summary, `<event>: summary`, has `counts` (per key, weighted by `count`) and `occurrences` of what was not
    logged one by one, `interval_s`, and the last fields seen per key (`last`, values cut to 160 characters).
    With `autoflush`, a daemon timer logs the summary when its interval ends even if nothing else occurs;
    without it (tests, with an injected `clock`) the next call after the interval logs it, or `flush()`.
    """

    def __init__(self, logger: Any, event: str, *, interval_s: float | None = None, level: str = "warning",
                 clock: Callable[[], float] = time.monotonic, autoflush: bool = True, max_keys: int = MAX_KEYS) -> None:
        self._logger, self._level = logger, level  # looked up at each line: logging may be configured later
        self.event = event
        self.interval_s = interval_s if interval_s is not None else float(
            os.environ.get("KWWK_LOG_SUMMARY_S") or SUMMARY_INTERVAL_S)
        self._clock = clock
        self._autoflush = autoflush
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._window_start = clock()
        self._logged: set[Hashable] = set()  # logged at once this interval, or repeated in the last one
        self._counts: dict[Hashable, int] = {}  # suppressed occurrences of this interval, weighted
        self._occurrences = 0
        self._last: dict[Hashable, dict[str, Any]] = {}
        self._timer: threading.Timer | None = None

    def __call__(self, key: Hashable, count: int = 1, **fields: Any) -> None:
        """One occurrence of `key` (weighing `count`, e.g. readings dropped), with the fields of its log line."""
        first = False
        with self._lock:
            summary = self._roll(self._clock())
            if key not in self._logged and len(self._logged) < self._max_keys:
                self._logged.add(key)
                first = True
            else:
                if key not in self._logged:
                    key = OTHER  # too many kinds at once: counted together
                self._counts[key] = self._counts.get(key, 0) + count
                self._occurrences += 1
                self._last[key] = fields
                self._arm()
        if summary is not None:
            self._log(f"{self.event}: summary", **summary)
        if first:
            self._log(self.event, **fields, count=count, summary_every_s=self.interval_s)

    def _log(self, event: str, **fields: Any) -> None:
        getattr(self._logger, self._level)(event, **fields)

    def flush(self) -> None:
        """Log the summary of what was counted so far (if anything) and start a new interval."""
        with self._lock:
            summary = self._take(self._clock())
        if summary is not None:
            self._log(f"{self.event}: summary", **summary)

    def _roll(self, now: float) -> dict[str, Any] | None:
        """At the end of an interval: the summary to log, and a new interval (keys quiet all along forgotten)."""
        if now - self._window_start < self.interval_s:
            return None
        return self._take(now)

    def _take(self, now: float) -> dict[str, Any] | None:
        counts, occurrences, last = self._counts, self._occurrences, self._last
        elapsed = now - self._window_start
        self._logged = set(counts)  # repeated this interval: stays summarised; quiet: logged at once next time
        self._counts, self._occurrences, self._last = {}, 0, {}
        self._window_start = now
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not occurrences:
            return None
        return {"counts": {_show(k): n for k, n in counts.items()}, "occurrences": occurrences,
                "interval_s": round(elapsed, 1),
                "last": {_show(k): {f: _cut(v) for f, v in fs.items()} for k, fs in last.items()}}

    def _arm(self) -> None:
        if not self._autoflush or self._timer is not None:
            return
        delay = max(0.0, self._window_start + self.interval_s - self._clock())
        self._timer = threading.Timer(delay, self._timed_flush)
        self._timer.daemon = True  # never keeps a stopping process alive
        self._timer.start()

    def _timed_flush(self) -> None:
        with self._lock:
            if self._timer is not threading.current_thread():
                return  # a call rolled the interval over first and cancelled this timer
            self._timer = None
            summary = self._take(self._clock())
        if summary is not None:
            self._log(f"{self.event}: summary", **summary)


_registry: dict[tuple[int, str], LogSummary] = {}
_registry_lock = threading.Lock()


def summarised(logger: Any, event: str, key: Hashable, count: int = 1, **fields: Any) -> None:
    """`LogSummary(logger, event)(key, count, **fields)` with one LogSummary per logger and event, kept here:
    a call site turns a per-message warning into a summarised one without a field of its own."""
    with _registry_lock:
        summary = _registry.get((id(logger), event))
        if summary is None:
            summary = _registry[(id(logger), event)] = LogSummary(logger, event)
    summary(key, count, **fields)


def _show(key: Hashable) -> str:
    return key if isinstance(key, str) else "/".join(map(str, key)) if isinstance(key, tuple) else str(key)


def _cut(value: Any, limit: int = 160) -> Any:
    if isinstance(value, str | bytes) and len(value) > limit:
        return value[:limit] + ("…" if isinstance(value, str) else b"...")
    return value
