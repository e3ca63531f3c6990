"""Jittered, capped exponential backoff: how long to leave a dead device or a lost connection alone."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """Counts consecutive failures; after the n-th, waits base * 2**(n-1), capped, with jitter.

    The jitter is "equal jitter": the delay is drawn from [d/2, d]. Devices that died together
    (a bus that lost power) do not come back in lockstep, and the wait never drops below half
    the nominal one, so a dead device costs at most one timeout per half-period.
    """

    def __init__(self, base: float, cap: float, *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        if base <= 0 or cap < base:
            msg = f"backoff needs 0 < base <= cap, got base={base}, cap={cap}"
            raise ValueError(msg)
        self.base = base
        self.cap = cap
        self.clock = clock
        self.rng = rng or random.Random()
        self.failures = 0
        self.until = 0.0  # clock() value before which nothing is tried

    def nominal(self, failures: int) -> float:
        """The un-jittered delay after this many consecutive failures."""
        if failures <= 0:
            return 0.0
        # 2**60 would overflow nothing, but keep the exponent small anyway
        return min(self.cap, self.base * 2.0 ** min(failures - 1, 60))

    def failure(self) -> float:
        """Record a failure; return the delay before the next try."""
        self.failures += 1
        d = self.nominal(self.failures)
        delay = d / 2 + self.rng.random() * d / 2
        self.until = self.clock() + delay
        return delay

    def success(self) -> None:
        self.failures = 0
        self.until = 0.0

    @property
    def remaining(self) -> float:
        """Seconds until the next try is allowed (0 when allowed now)."""
        return max(0.0, self.until - self.clock())

    @property
    def blocked(self) -> bool:
        return self.remaining > 0
