"""A destination's bandwidth cap (`max_mbps`): a token bucket its associations share.

Every byte of every PDU sent to the destination passes `TokenBucket.take` before it goes on
the wire, in chunks of at most `CHUNK` bytes, so the link is never above the cap for longer
than one chunk, even within one large instance. The cap holds per router process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CHUNK = 16 * 1024  # bytes sent per take: the largest burst above the rate


def bytes_per_second(mbps: float) -> float:
    """Megabits per second, as links are sold (10**6 bits), in bytes per second."""
    return mbps * 1_000_000 / 8


class TokenBucket:
    """`rate` bytes per second (0: no cap) for every thread that takes from it, with bursts of at
    most `burst` bytes. Thread-safe; a taker that would go over the rate sleeps its share."""

    def __init__(self, rate: float, burst: int = CHUNK, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate = rate
        self.burst = burst
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._at = clock()
        self.throttled_until = 0.0  # on `clock`: until when the last taker waited for the cap
        self.waited_s = 0.0  # total time takers slept for the cap

    def set_rate(self, rate: float) -> None:
        with self._lock:
            self._refill()
            self.rate = rate

    def _refill(self) -> None:
        now = self._clock()
        if self.rate > 0:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self, size: int) -> float:
        """Wait until `size` bytes may go; returns the seconds waited. Takers are served in the
        order they came: each reserves its bytes, then sleeps until the rate has paid for them."""
        with self._lock:
            if self.rate <= 0:
                return 0.0
            self._refill()
            self._tokens -= size
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
            if wait > 0:
                self.throttled_until = max(self.throttled_until, self._at + wait)
                self.waited_s += wait
        if wait > 0:
            self._sleep(wait)
        return wait

    def throttled(self) -> bool:
        """Whether a taker is waiting for the cap now."""
        return self.rate > 0 and self._clock() < self.throttled_until
