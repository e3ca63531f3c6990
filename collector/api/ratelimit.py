"""Per-client request limits for the public endpoints: a token bucket per client address.

Behind a reverse proxy, run uvicorn with --forwarded-allow-ips <proxy> so the client's own address is
seen (X-Forwarded-For); otherwise every resident shares the proxy's bucket.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from fastapi import HTTPException, Request

__all__ = ["RateLimiter"]


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: int, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key → (tokens, last refill)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str) -> float:
        """0 when the request may go ahead, else the seconds until it may."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            if wait == 0.0:
                tokens -= 1
            self._buckets[key] = (tokens, now)
            if len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        return wait

    async def __call__(self, request: Request) -> None:
        """A FastAPI dependency: 429 with Retry-After when the client is over its limit."""
        wait = self.take(request.client.host if request.client else "?")
        if wait > 0:
            raise HTTPException(429, "too many requests: please wait a moment and try again",
                                headers={"Retry-After": str(max(1, round(wait + 0.5)))})
