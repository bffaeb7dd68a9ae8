"""A token bucket of bytes per second, shared by every task of a command (WALG_*_RATE_LIMIT)."""
from __future__ import annotations

import asyncio
import time
from typing import Callable

# The bucket holds this much time of the rate: enough that a taker working between two takes, or
# woken a little late, loses none of the rate; little enough that a transfer of a second or two
# keeps to the limit within a few percent (WAL-G's bucket holds a whole second, which doubles the
# rate of a one-second transfer).
BURST_SECONDS = 0.02
# A slow rate still lets a few pages through at once, as WAL-G's bucket does.
MIN_BURST = 64 << 10


class RateLimiter:
    """`await take(n)` before moving n bytes; all takers together move at most burst + rate * t
    bytes in any t seconds.

    Debt model: take reserves its n bytes at once, below zero if need be, and sleeps until the
    bucket is back at zero. A chunk larger than the burst therefore passes (it waits longer), and
    concurrent takers are served in the order they asked: each one's wait covers the bytes reserved
    before it, so a sleep lasts at most (bytes reserved ahead + n) / rate. A taker cancelled while it
    waits gives its bytes back, since they never moved. No state belongs to an event loop, so one
    bucket serves a storage used by several loops in turn.
    """

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic):
        if rate <= 0:
            raise ValueError("a rate limit must be positive")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(self.rate * BURST_SECONDS, float(MIN_BURST))
        self._clock = clock
        self._level = self.burst  # bytes that may move now; below zero: bytes reserved ahead of the rate
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.burst, self._level + (now - self._stamp) * self.rate)
        self._stamp = now

    async def take(self, n: int) -> None:
        if n <= 0:
            return
        self._refill()
        self._level -= n
        if self._level >= 0:
            return
        try:
            await asyncio.sleep(-self._level / self.rate)
        except asyncio.CancelledError:
            self._refill()
            self._level = min(self.burst, self._level + n)
            raise
