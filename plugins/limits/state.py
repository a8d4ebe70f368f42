"""What outlives a session and a reload: concurrency counts, buckets, failed-login records."""

from __future__ import annotations

import collections
import weakref
from collections.abc import Hashable
from dataclasses import dataclass, field

from .buckets import TokenBucket
from .settings import AuthThrottle

PRUNE_FLOOR = 1024  # tables are swept for forgettable records when they outgrow this (and double)


class Failures:
    """Recent failed logins from one address, for one ``auth_failures`` entry."""

    __slots__ = ("rule", "times")

    def __init__(self, rule: AuthThrottle) -> None:
        self.rule = rule
        self.times: collections.deque[float] = collections.deque(maxlen=rule.failures)

    def add(self, now: float) -> bool:
        """Record a failure; True when it completes ``max`` failures within the window."""
        self.times.append(now)
        if len(self.times) == self.rule.failures and now - self.times[0] <= self.rule.within:
            self.times.clear()
            return True
        return False

    def stale(self, now: float) -> bool:
        return not self.times or self.times[-1] < now - self.rule.within


@dataclass
class State:
    """What outlives a session and a reload: per server."""

    active: collections.Counter[Hashable] = field(default_factory=collections.Counter)
    handshaking: collections.Counter[Hashable] = field(default_factory=collections.Counter)
    session_buckets: dict[Hashable, TokenBucket] = field(default_factory=dict)
    # Shared bandwidth buckets live as long as a tunnel holds them: a bucket left alone refills to
    # full anyway, so forgetting it loses at most the debt of the last chunk.
    byte_buckets: weakref.WeakValueDictionary[Hashable, TokenBucket] = field(
        default_factory=weakref.WeakValueDictionary
    )
    failures: dict[Hashable, Failures] = field(default_factory=dict)
    blocked: dict[Hashable, float] = field(default_factory=dict)
    prune_at: int = PRUNE_FLOOR

    def prune(self, now: float) -> None:
        """Forget records that carry no information (full buckets, expired blocks) once tables grow."""
        size = len(self.session_buckets) + len(self.failures) + len(self.blocked)
        if size < self.prune_at:
            return
        for key in [k for k, bucket in self.session_buckets.items() if bucket.full(now)]:
            del self.session_buckets[key]
        for key in [k for k, until in self.blocked.items() if until <= now]:
            del self.blocked[key]
        for key in [k for k, record in self.failures.items() if record.stale(now)]:
            del self.failures[key]
        size = len(self.session_buckets) + len(self.failures) + len(self.blocked)
        self.prune_at = max(PRUNE_FLOOR, 2 * size)
