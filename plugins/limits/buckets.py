"""Token buckets: the arithmetic behind session rates and bandwidth limits."""

from __future__ import annotations

import time

from socksflow import Direction


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; starts full."""

    __slots__ = ("__weakref__", "burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, now: float) -> bool:
        """Take one whole token if there is one (a new session)."""
        self._refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def charge(self, amount: int, now: float) -> float:
        """Take ``amount`` tokens, going into debt if need be; return the seconds until the debt is paid."""
        tokens = self.tokens + (now - self.stamp) * self.rate  # _refill, inlined: called per chunk
        if tokens > self.burst:
            tokens = self.burst
        tokens -= amount
        self.tokens = tokens
        self.stamp = now
        return -tokens / self.rate if tokens < 0 else 0.0

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


class Bandwidth:
    """The :class:`~socksflow.Limiter` of one tunnel: every bucket that applies to it, per direction."""

    __slots__ = ("down", "up")

    def __init__(self, up: list[TokenBucket], down: list[TokenBucket]) -> None:
        self.up = tuple(up)
        self.down = tuple(down)

    def delay(self, direction: Direction, nbytes: int) -> float:
        """Charge every bucket of ``direction``; the longest debt is the pause."""
        now = time.monotonic()
        wait = 0.0
        for bucket in self.up if direction is Direction.UP else self.down:  # per chunk: no generator
            debt = bucket.charge(nbytes, now)
            if debt > wait:
                wait = debt
        return wait
