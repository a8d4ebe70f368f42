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
from typing import Any, TypeVar

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


Check = tuple[Any, ...]  # ("take", key, rate, burst, lease) or ("within", key, limit): SharedTable.admit

LEASE_SECONDS = 0.01  # a worker leases this long of a bucket's rate ahead...
LEASE_OF_BURST = 0.25  # ...but no more than this share of its depth
LEASE_LIFE = 1.0  # seconds leased session-rate tokens stay good: older ones would add to a later burst
MAX_LEASES = 4096  # buckets leased by this worker; beyond, it starts over (what was leased is spent)
MAX_PLANS = 4096  # clients' plans kept; beyond, they are made again


def rate_lease(rate: float, burst: float) -> float:
    """Tokens a worker leases beyond the one it takes from a session-rate bucket: none below 200
    sessions/s (every new session asks the shared bucket, exactly), else up to 10 ms of the rate."""
    return float(max(0, int(min(rate * LEASE_SECONDS, burst * LEASE_OF_BURST)) - 1))


class LeasedBucket:
    """A bucket of the shared table that this worker spends from leased tokens (quota leasing, as
    Envoy's rate-limit quotas and nginx's shared zones do).

    A chunk the tokens leased so far cover costs a subtraction; the others go to the shared
    bucket, paying for the chunk (into debt if need be) and leasing up to a lease more while
    the bucket holds them.  The total still holds for every worker together: what a worker
    has leased and not yet spent is at most one lease ahead of the shared bucket.  While the
    shared bucket is in debt every chunk goes to it, so each tunnel learns its pause.

    Has the ``charge`` of :class:`~.buckets.TokenBucket`, so a tunnel's limiter takes either.
    """

    __slots__ = ("burst", "key", "lease", "rate", "table", "tokens", "until")

    def __init__(self, table: SharedTable, key: Hashable, rate: float, burst: float) -> None:
        self.table, self.key, self.rate, self.burst = table, key, rate, burst
        self.lease = min(rate * LEASE_SECONDS, burst * LEASE_OF_BURST)
        self.tokens = 0.0  # leased, not yet spent
        self.until = 0.0  # the shared bucket's debt is paid then, as last heard

    def charge(self, amount: int, now: float) -> float:
        tokens = self.tokens
        if amount <= tokens and now >= self.until:
            self.tokens = tokens - amount
            return 0.0
        granted, wait = self.table.lease(self.key, self.rate, self.burst, amount - tokens, self.lease, now)
        self.tokens = granted
        self.until = now + wait
        return wait


class State:
    """One server's limit state: the shared table, and what this worker holds in it."""

    def __init__(self, table) -> None:
        self.table = table
        self.active: collections.Counter[Hashable] = collections.Counter()  # sessions
        self.handshaking: collections.Counter[Hashable] = collections.Counter()
        self.held = {"sessions": self.active, "handshakes": self.handshaking, "udp": collections.Counter()}
        # One machine's table answers every operation at once; Redis's may have to ask first.
        self.answers_at_once = isinstance(table, SharedTable)
        self.buckets: dict[Hashable, LeasedBucket | SharedBucket] = {}
        self.rate_leases: dict[Hashable, list[float]] = {}  # session-rate tokens leased: [tokens, when]
        # What sessions from one client (and identity) are admitted and paced by, under the
        # limits of ``plans_for``: worked out once, not per session (see the plugin's hooks).
        self.plans_for: object = None
        self.plans: dict[Hashable, Any] = {}

    def plans_under(self, limits: object) -> dict[Hashable, Any]:
        """The plans made under ``limits`` (the configuration's): none yet after a reload."""
        if limits is not self.plans_for or len(self.plans) >= MAX_PLANS:
            self.plans_for = limits
            self.plans = {}
        return self.plans

    def bucket(self, key: Hashable, rate: float, burst: float) -> LeasedBucket | SharedBucket:
        """The shared bandwidth bucket ``key``, as this worker's tunnels charge it."""
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= MAX_LEASES:
                self.buckets.clear()
            make = LeasedBucket if self.answers_at_once else SharedBucket  # Redis's table leases itself
            bucket = self.buckets[key] = make(self.table, key, rate, burst)
        return bucket

    # ------------------------------------------------------------------ concurrency

    async def acquire(self, kind: str, key: Hashable, limit: int, now: float) -> bool:
        """Count one more ``kind`` (``sessions``, ``handshakes``) under ``key`` unless ``limit`` are
        counted already, server-wide."""
        if not await settled(self.table.acquire((kind, key), limit, now)):
            return False
        self.held[kind][key] += 1
        return True

    def release(self, kind: str, key: Hashable) -> None:
        self.table.release((kind, key))
        held = self.held[kind]
        held[key] -= 1
        if not held[key]:
            del held[key]

    def admit(
        self, checks: list[Check], acquires: list[tuple[Hashable, int]], now: float
    ) -> int | Awaitable[int]:
        """:meth:`SharedTable.admit` with ``acquires`` counting ``sessions``: at once in one critical
        section on one machine's table, else (Redis) an awaitable asking one limit after another.

        Session rates are leased as bandwidth is (:func:`rate_lease`): the leading ``take``
        checks this worker holds tokens for are answered here, in order, the rest by the table.
        """
        if not self.answers_at_once:
            return self._admit_stepwise(checks, acquires, now)
        spent = 0
        leased: list[tuple[Hashable, float]] | None = None
        if checks:
            leases = self.rate_leases
            for check in checks:
                lease = leases.get(check[1]) if check[0] == "take" else None
                if lease is None or lease[0] < 1 or now - lease[1] > LEASE_LIFE:
                    break
                lease[0] -= 1
                spent += 1
            leased = []
        table_acquires = [(("sessions", key), limit) for key, limit in acquires]
        refused = self.table.admit(checks[spent:] if spent else checks, table_acquires, now, leased)
        if leased:
            self._keep_leases(leased, now)
        if refused >= 0:
            return refused + spent
        active = self.active
        for key, _ in acquires:
            active[key] += 1
        return refused

    def _keep_leases(self, leased: list[tuple[Hashable, float]], now: float) -> None:
        leases = self.rate_leases
        for key, tokens in leased:
            lease = leases.get(key)
            if lease is None or now - lease[1] > LEASE_LIFE:
                if len(leases) >= MAX_LEASES:
                    leases.clear()
                leases[key] = [tokens, now]
            else:
                lease[0] += tokens
                lease[1] = now

    async def _admit_stepwise(
        self, checks: list[Check], acquires: list[tuple[Hashable, int]], now: float
    ) -> int:
        for index, check in enumerate(checks):
            if check[0] == "take":
                passed = await settled(self.table.take(check[1], check[2], check[3], now))  # type: ignore[misc]
            else:
                passed = await settled(self.table.count(check[1])) <= check[2]  # type: ignore[operator]
            if not passed:
                return index
        for index, (key, limit) in enumerate(acquires):
            if not await self.acquire("sessions", key, limit, now):
                for earlier, _ in acquires[:index]:
                    self.release("sessions", earlier)
                return len(checks) + index
        return -1

    async def count(self, kind: str, key: Hashable) -> int:
        return await settled(self.table.count((kind, key)))

    async def take(self, key: Hashable, rate: float, burst: float, now: float) -> bool:
        """One token from the bucket ``key`` (session rates)."""
        return await settled(self.table.take(key, rate, burst, now))

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
        if await settled(self.table.record(("failures", key), rule.within, now)) < rule.failures:
            return False
        self.table.forget_events(("failures", key))
        return await settled(self.table.block(("block", key), now + rule.block, now))


async def settled(answer: T | Awaitable[T]) -> T:
    """``answer``, awaited if the table had to ask (Redis)."""
    return await answer if inspect.isawaitable(answer) else answer  # type: ignore[return-value]
