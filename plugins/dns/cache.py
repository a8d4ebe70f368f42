"""The answer cache: TTLs clamped, negative answers kept, the least recently used dropped first."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True, slots=True)
class Lookup:
    """What a server said about one name and record type: addresses, or why there are none."""

    addresses: tuple[IPAddress, ...]
    nxdomain: bool = False  # empty and not NXDOMAIN: the name exists without such records


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The ``dns.cache`` section: entry limit and TTL clamps, in seconds."""

    size: int = 10_000
    min_ttl: float = 0.0
    max_ttl: float = 3600.0
    negative_ttl: float = 30.0


class AnswerCache:
    """Lookups by key, each kept for its TTL clamped to the settings; bounded to ``settings.size``."""

    def __init__(self, settings: CacheSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._entries: OrderedDict[object, tuple[float, Lookup]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: object) -> Lookup | None:
        """The live entry for ``key``, or ``None`` (never stored, evicted or expired)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, lookup = entry
        if expires <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return lookup

    def put(self, key: object, lookup: Lookup, ttl: float) -> None:
        """Keep ``lookup`` for ``ttl`` seconds: positive answers within [min_ttl, max_ttl],
        negative ones (RFC 2308) for at most ``negative_ttl``."""
        settings = self.settings
        if lookup.addresses:
            ttl = max(settings.min_ttl, min(ttl, settings.max_ttl))
        else:
            ttl = min(ttl, settings.negative_ttl)
        if ttl <= 0 or settings.size <= 0:
            return
        self._entries[key] = (self._clock() + ttl, lookup)
        self._entries.move_to_end(key)
        while len(self._entries) > settings.size:
            self._entries.popitem(last=False)
