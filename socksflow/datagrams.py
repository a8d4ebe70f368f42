"""The parts of a UDP association (:mod:`socksflow.udp`) that keep state between datagrams.

* :class:`RouteCache`: where a header's datagrams go (the fast path) and the header each
  remote's replies get, with its one eviction rule kept inside.
* :class:`Pacer`: holds datagrams over a bandwidth limit until their turn, or drops them.
* :class:`NameParking`: datagrams waiting for their destination's name to be resolved.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

from socksflow.protocol import Address, IPAddress, build_udp_header
from socksflow.relay import Direction, Limiter

Route = TypeVar("Route")
Parked = TypeVar("Parked")
SockAddr = tuple[str, int]


class RouteCache(Generic[Route]):
    """Routes by header bytes, reply headers by remote; at most ``limit`` of each.

    The one rule: a cached route never outlives its remote's reply header.  So when the
    remotes are full the oldest is forgotten and every route with it; when the routes are full
    they start over (each is found again by the worker on its next datagram).
    """

    __slots__ = ("_headers", "_routes", "limit", "reply_header", "route")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._routes: dict[bytes, Route] = {}
        self._headers: dict[SockAddr, bytes] = {}
        # Asked per datagram: the dicts' own look-ups, without a Python call around them.
        self.route: Callable[[bytes], Route | None] = self._routes.get
        """The route of a datagram whose header bytes are the key, if one is cached."""
        self.reply_header: Callable[[SockAddr], bytes | None] = self._headers.get
        """The header for replies from a remote's address, if the association knows it."""

    def add_route(self, key: bytes, route: Route) -> None:
        if len(self._routes) >= self.limit:
            self._routes.clear()
        self._routes[key] = route

    def add_remote(self, sockaddr: SockAddr, ip: IPAddress) -> bytes:
        """Know the remote at ``sockaddr`` (``ip`` parsed); the header its replies get."""
        header = self._headers.get(sockaddr)
        if header is None:
            if len(self._headers) >= self.limit:
                del self._headers[next(iter(self._headers))]
                self._routes.clear()
            header = self._headers[sockaddr] = build_udp_header(Address(ip, sockaddr[1]))
        return header

    def clear(self) -> None:
        self._routes.clear()
        self._headers.clear()


class Pacer:
    """Bandwidth limits for datagrams: each goes now, later in its turn, or is dropped.

    Datagrams over the rate wait, in order, up to ``max_waiting`` bytes per direction (like a
    TCP tunnel's buffer); beyond that they are dropped, as UDP may.
    """

    __slots__ = ("_closed", "_loop", "_waiting", "limiters", "max_waiting")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, limiters: Sequence[Limiter], max_waiting: int
    ) -> None:
        self._loop = loop
        self.limiters = tuple(limiters)
        self.max_waiting = max_waiting
        self._waiting = {Direction.UP: 0, Direction.DOWN: 0}  # bytes held back
        self._closed = False

    def admit(self, direction: Direction, size: int, send: Callable[..., None], *args: Any) -> str | None:
        """Send now (``send(*args)``), or schedule it; the reason it is dropped instead, if it is."""
        if self._waiting[direction] + size > self.max_waiting:
            return f"bandwidth limit ({direction.value}): {self.max_waiting} bytes already wait"
        wait = 0.0
        for limiter in self.limiters:
            delay = limiter.delay(direction, size)
            if delay > wait:
                wait = delay
        if wait <= 0:
            send(*args)
        else:
            self._waiting[direction] += size
            self._loop.call_later(wait, self._release, direction, size, send, args)
        return None

    def waiting(self, direction: Direction) -> int:
        """Bytes held back in ``direction``, waiting for their turn."""
        return self._waiting[direction]

    def _release(
        self, direction: Direction, size: int, send: Callable[..., None], args: tuple[Any, ...]
    ) -> None:
        self._waiting[direction] -= size
        if not self._closed:
            send(*args)

    def close(self) -> None:
        """Datagrams still waiting are not sent."""
        self._closed = True


class NameParking(Generic[Parked]):
    """Datagrams held until their destination's name is resolved: a slow name delays only its own.

    At most ``max_names`` names are looked up at once and ``max_datagrams`` datagrams wait in all.
    ``look_up(name, port, waiting)`` resolves a name and sends (or drops) what waits in the
    deque, new arrivals included; the name is unparked when it returns.
    """

    __slots__ = ("_look_up", "_loop", "_tasks", "_waiting", "max_datagrams", "max_names")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        look_up: Callable[[str, int, collections.deque[Parked]], Awaitable[None]],
        max_names: int,
        max_datagrams: int,
    ) -> None:
        self._loop = loop
        self._look_up = look_up
        self.max_names = max_names
        self.max_datagrams = max_datagrams
        self._waiting: dict[str, collections.deque[Parked]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __contains__(self, name: Hashable) -> bool:
        """Whether datagrams to ``name`` wait (a new one must queue behind them)."""
        return name in self._waiting

    def park(self, name: str, port: int, parked: Parked) -> str | None:
        """Hold ``parked`` until ``name`` resolves; the reason it is dropped instead, if it is."""
        waiting = self._waiting.get(name)
        if waiting is None:
            if len(self._waiting) >= self.max_names:
                return f"to {Address(name, port)}: {self.max_names} names are being looked up already"
            waiting = self._waiting[name] = collections.deque()
            self._tasks.add(task := self._loop.create_task(self._run(name, port, waiting)))
            task.add_done_callback(self._tasks.discard)
        if sum(map(len, self._waiting.values())) >= self.max_datagrams:
            return "backlog full"
        waiting.append(parked)
        return None

    async def _run(self, name: str, port: int, waiting: collections.deque[Parked]) -> None:
        try:
            await self._look_up(name, port, waiting)
        finally:
            self._waiting.pop(name, None)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._waiting.clear()
