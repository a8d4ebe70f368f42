"""What outlives a session and a reload: counts, buckets, failed logins and blocks.

They live in the server's shared limit table (``server.shared_state``): with ``socksflow run
--workers N`` every worker sees the same table, so a limit written once holds for the server
as a whole; a worker that dies gives back what it held (the supervisor sees to it).  Each
operation is one short critical section of the table.

What this worker holds is also counted here (``active``, ``handshaking``): a session gives back
exactly what it took, and an operator (or a test) can see this worker's share.
"""

from __future__ import annotations

import collections
import inspect
import time
from collections.abc import Awaitable, Hashable
from typing import TypeVar

from socksflow import SharedTable

from .settings import AuthThrottle

T = TypeVar("T")


class SharedBucket:
    """A token bucket kept in the shared table: bandwidth shared by every tunnel (and worker) it covers.

    Has the ``charge`` of :class:`~.buckets.TokenBucket`, so a tunnel's limiter takes either.
    """

    __slots__ = ("burst", "key", "rate", "table")

    def __init__(self, table, key: Hashable, rate: float, burst: float) -> None:
        self.table, self.key, self.rate, self.burst = table, key, rate, burst

    def charge(self, amount: int, now: float) -> float:
        return self.table.charge(self.key, self.rate, self.burst, amount, now)


class State:
    """One server's limit state: the shared table, and what this worker holds in it."""

    def __init__(self, table) -> None:
        self.table = table
        self.active: collections.Counter[Hashable] = collections.Counter()  # sessions
        self.handshaking: collections.Counter[Hashable] = collections.Counter()
        self.held = {"sessions": self.active, "handshakes": self.handshaking, "udp": collections.Counter()}
        # One machine's table answers every operation at once; Redis's may have to ask first.
        self.answers_at_once = isinstance(table, SharedTable)

    # ------------------------------------------------------------------ concurrency

    async def acquire(self, kind: str, key: Hashable, limit: int, now: float) -> bool:
        """Count one more ``kind`` (``sessions``, ``handshakes``) under ``key`` unless ``limit`` are
        counted already, server-wide."""
        if not await _settled(self.table.acquire((kind, key), limit, now)):
            return False
        self.held[kind][key] += 1
        return True

    def release(self, kind: str, key: Hashable) -> None:
        self.table.release((kind, key))
        held = self.held[kind]
        held[key] -= 1
        if not held[key]:
            del held[key]

    async def count(self, kind: str, key: Hashable) -> int:
        return await _settled(self.table.count((kind, key)))

    async def take(self, key: Hashable, rate: float, burst: float, now: float) -> bool:
        """One token from the bucket ``key`` (session rates)."""
        return await _settled(self.table.take(key, rate, burst, now))

    # ------------------------------------------------------------------ failed logins

    def blocked_until(self, key: Hashable, now: float) -> float:
        return self.table.blocked_until(("block", key), now)

    async def fail(self, key: Hashable, rule: AuthThrottle) -> bool:
        """Record a failed login under ``key``; True when it starts a block (to be logged once).

        "``max`` failures within ``within``" is judged over a sliding window estimated from two
        fixed ones (the previous window's count weighted by how much of it is still covered):
        what fits in a fixed-size slot that every worker shares.
        """
        now = time.monotonic()
        if await _settled(self.table.record(("failures", key), rule.within, now)) < rule.failures:
            return False
        self.table.forget_events(("failures", key))
        return await _settled(self.table.block(("block", key), now + rule.block, now))


async def _settled(answer: T | Awaitable[T]) -> T:
    return await answer if inspect.isawaitable(answer) else answer  # type: ignore[return-value]
