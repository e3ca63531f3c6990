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

    The same holds for a fleet of gateways losing their broker (MqttSettings: base 0.2-1 s,
    cap 2 s). After a few failures every gateway tries again every 1-2 s (uniform), and each
    one's attempts drift apart from the others'. When the broker comes back, a gateway's next
    attempt is thus 0-2 s away: about two thirds of N gateways arrive in the first second,
    the rest in the second, none later (mean wait ~0.8 s). The broker sees at most about N/1.5
    connects a second, tapering off over the second second, not N at once; no gateway waits more
    than the cap. A higher cap only spreads the fleet thinner at the price of a longer wait for
    every one of them (a 30 s cap kept gateways away for up to 20 s after the broker returned).
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
