"""Chains (hops that dial through each other) and groups (fallback, balance, fastest) with health checks."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import itertools
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from socksflow import (
    UNSPECIFIED,
    Address,
    Connector,
    Outbound,
    OutboundError,
    Receiver,
    Reply,
    Stream,
    carries,
    direct_connect,
)

log = logging.getLogger("socksflow.outbounds")

Lookup = Callable[[str], Outbound]
T = TypeVar("T")

ROUTE: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "socksflow_outbound_route", default=None
)
"""The group choices made for the dial in progress (``pool=b``), for the access log and metrics."""


def probe_of(outbound: Outbound, lookup: Lookup) -> Address | None:
    """Where a TCP health check connects: the first hop's server (``None``: nothing to probe)."""
    if isinstance(outbound, Chain):
        return probe_of(lookup(outbound.names[0]), lookup)
    probe = getattr(outbound, "probe", None)
    return probe() if probe is not None else None


def _through(hops: list[Outbound], index: int, connect: Connector, user: str) -> Connector:
    """How to reach an address through ``hops[: index + 1]`` (``connect`` itself when index < 0)."""
    if index < 0:
        return connect

    async def hop(address: Address) -> Any:
        sock, _ = await hops[index].open_stream(address, _through(hops, index - 1, connect, user), user)
        return sock

    return hop


@dataclass
class Chain:
    """``chain: [a, b, c]``: client → socksflow → a → b → c → destination; BND from ``c``."""

    name: str
    names: tuple[str, ...]
    lookup: Lookup
    kind: str = "chain"

    async def open_stream(
        self, destination: Address, connect: Connector = direct_connect, user: str = ""
    ) -> Stream:
        hops = [self.lookup(name) for name in self.names]
        return await hops[-1].open_stream(destination, _through(hops, len(hops) - 2, connect, user), user)

    async def open_udp(
        self, receiver: Receiver, connect: Connector = direct_connect, carrier: Any = None
    ) -> Any:
        """UDP through every hop: each hop's association is carried by the previous hop's."""
        hops = [self.lookup(name) for name in self.names]
        if not self.carries("open_udp"):
            raise OutboundError(
                f"outbound {self.name!r}: not every hop can carry UDP", Reply.COMMAND_NOT_SUPPORTED
            )

        async def at(index: int, receive: Receiver) -> Any:
            hop: Any = hops[index]
            if index == 0:
                return await hop.open_udp(receive, connect, carrier)
            return await hop.open_udp(
                receive, _through(hops, index - 1, connect, ""), functools.partial(at, index - 1)
            )

        return await at(len(hops) - 1, receiver)

    def carries(self, method: str) -> bool:
        """Whether every hop has ``method`` (``open_udp``); a chain has no ``open_bind``."""
        return hasattr(self, method) and all(carries(self.lookup(name), method) for name in self.names)

    def hops(self) -> tuple[str, ...]:
        return self.names

    def describe(self) -> str:
        return "chain " + " → ".join(self.names)


@dataclass(frozen=True)
class Health:
    """How members are checked: ``target`` set means a request through the member, else TCP connect."""

    interval: float = 10.0
    timeout: float = 3.0
    failures: int = 1
    target: Address | None = None


@dataclass
class MemberState:
    up: bool = True
    failures: int = 0
    latency: float | None = None
    why: str = ""


@dataclass
class Group:
    """``fallback`` (first healthy in order), ``balance`` (round robin or hashed) or ``fastest``."""

    name: str
    kind: str
    names: tuple[str, ...]
    lookup: Lookup
    health: Health = field(default_factory=Health)
    hash_on: str = ""  # balance: "" (round robin), "destination" or "user"
    tolerance: float = 0.05  # fastest: keep the current member unless another is this much faster
    states: dict[str, MemberState] = field(default_factory=dict)
    _current: str | None = None
    _turn: itertools.count = field(default_factory=itertools.count)
    _checker: asyncio.Task[None] | None = None
    _wake: asyncio.Event | None = None

    def __post_init__(self) -> None:
        self.states = {name: MemberState() for name in self.names}

    # ------------------------------------------------------------------ choosing

    def order(self, destination: Address, user: str) -> list[str]:
        """Members in the order to try: healthy ones by the group's rule, then the down ones."""
        up = [name for name in self.names if self.states[name].up]
        down = [name for name in self.names if not self.states[name].up]
        if self.kind == "balance":
            if self.hash_on:
                key = str(destination.host) if self.hash_on == "destination" else user
                up.sort(key=lambda name: _rendezvous(key, name), reverse=True)
            elif up:
                start = next(self._turn) % len(up)
                up = up[start:] + up[:start]
        elif self.kind == "fastest":
            up = self._by_latency(up)
        return up + down

    def _by_latency(self, up: list[str]) -> list[str]:
        measured = sorted(up, key=lambda name: self.states[name].latency or float("inf"))
        if not measured:
            return measured
        best = measured[0]
        current = self._current
        if current in up and current != best:
            now, fastest = self.states[current].latency, self.states[best].latency
            if now is not None and fastest is not None and now - fastest <= self.tolerance:
                best = current  # not worth switching: keeps connections to one upstream warm
        self._current = best
        return [best] + [name for name in measured if name != best]

    async def open_stream(
        self, destination: Address, connect: Connector = direct_connect, user: str = ""
    ) -> Stream:
        return await self._first_working(
            destination, user, lambda member: member.open_stream(destination, connect, user)
        )

    async def open_udp(
        self, receiver: Receiver, connect: Connector = direct_connect, carrier: Any = None
    ) -> Any:
        """A UDP association through the member the group picks (failing over as for streams)."""
        if not self.carries("open_udp"):
            raise OutboundError(
                f"outbound {self.name!r}: not every member can carry UDP", Reply.COMMAND_NOT_SUPPORTED
            )
        return await self._first_working(
            UNSPECIFIED, "", lambda member: member.open_udp(receiver, connect, carrier)
        )

    def carries(self, method: str) -> bool:
        """Whether every member has ``method`` (``open_udp``); a group has no ``open_bind``."""
        return hasattr(self, method) and all(carries(self.lookup(name), method) for name in self.names)

    async def _first_working(
        self, destination: Address, user: str, attempt: Callable[[Any], Awaitable[T]]
    ) -> T:
        """``attempt`` on each member in the group's order until one works; members that fail
        (or give no answer within ``health.timeout``: a hung member must not eat the whole
        connect timeout) are marked down."""
        self.start()
        errors = []
        for name in self.order(destination, user):
            try:
                async with asyncio.timeout(self.health.timeout):
                    result = await attempt(self.lookup(name))
            except TimeoutError:
                error = OutboundError(
                    f"outbound {name!r}: no answer within {self.health.timeout:g}s",
                    Reply.TTL_EXPIRED,
                    upstream_down=True,
                )
            except OutboundError as exc:
                if not exc.upstream_down:
                    raise  # the destination's answer through a working member: not the member's fault
                error = exc
            else:
                route = ROUTE.get()
                if route is not None:
                    route.append(f"{self.name}={name}")
                return result
            self.mark_down(name, str(error))
            errors.append(f"{name}: {error}")
        message = f"outbound {self.name!r}: every member is down ({'; '.join(errors)})"
        log.warning("%s", message)
        raise OutboundError(message, Reply.HOST_UNREACHABLE, upstream_down=True)

    # ------------------------------------------------------------------ health

    def mark_down(self, name: str, why: str) -> None:
        """Passive health: a live dial failed; the member is down until a check passes."""
        state = self.states[name]
        if state.up:
            log.warning("outbound %r: member %r is down: %s", self.name, name, why)
        state.up, state.why = False, why
        state.failures = max(state.failures, self.health.failures)
        if self._wake is not None:
            self._wake.set()  # re-check now, not an interval from now

    def record(self, name: str, latency: float | None, why: str = "") -> None:
        state = self.states[name]
        if latency is not None:
            if not state.up:
                log.warning("outbound %r: member %r is up again", self.name, name)
            state.up, state.failures, state.latency, state.why = True, 0, latency, ""
            return
        state.failures += 1
        state.why = why
        if state.up and state.failures >= self.health.failures:
            state.up = False
            log.warning("outbound %r: member %r is down: %s", self.name, name, why)

    async def check(self, name: str) -> None:
        """One health check of one member: TCP connect to its first hop, or a request through it."""
        member = self.lookup(name)
        began = time.monotonic()
        try:
            async with asyncio.timeout(self.health.timeout):
                if self.health.target is not None:
                    sock, _ = await member.open_stream(self.health.target, direct_connect)
                else:
                    probe = probe_of(member, self.lookup)
                    if probe is None:
                        self.record(name, 0.0)
                        return
                    sock = await direct_connect(probe)
            sock.close()
        except (OSError, OutboundError, TimeoutError) as exc:
            self.record(name, None, str(exc) or type(exc).__name__)
            return
        self.record(name, time.monotonic() - began)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(name) for name in self.names))

    def start(self) -> None:
        """Start the periodic checks (once, from the first dial, on the running loop)."""
        if self._checker is None:
            self._wake = asyncio.Event()
            self._checker = asyncio.ensure_future(
                _check_forever(weakref.ref(self), self._wake, self.health.interval)
            )
            _CHECKERS.add(self._checker)

    def stop(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            self._checker = None

    def hops(self) -> tuple[str, ...]:
        return self.names

    def member_health(self) -> dict[str, tuple[bool, float | None]]:
        """Each member: up, and the latency of its last passing check (seconds)."""
        return {name: (state.up, state.latency) for name, state in self.states.items()}

    def describe(self) -> str:
        states = ", ".join(
            f"{name} {'up' if s.up else 'down'}"
            + (f" {s.latency * 1000:.0f}ms" if s.latency is not None else "")
            for name, s in self.states.items()
        )
        now = self.order(Address("example.invalid", 0), "")[0] if self.names else "-"
        return f"{self.kind} group of {', '.join(self.names)}; would use {now} now ({states})"


_CHECKERS: weakref.WeakSet[asyncio.Task[None]] = weakref.WeakSet()


def stop_checkers() -> None:
    """Stop the health checks running on this loop, those of replaced configurations included."""
    loop = asyncio.get_running_loop()
    for task in list(_CHECKERS):
        if task.get_loop() is loop:
            task.cancel()


async def _check_forever(group_ref: weakref.ref[Group], wake: asyncio.Event, interval: float) -> None:
    """Check every ``interval``, or at once when a live dial failed; ends when the group is dropped."""
    while True:
        group = group_ref()
        if group is None:
            return  # the configuration that held it was replaced
        await group.check_all()
        del group
        wake.clear()
        try:
            async with asyncio.timeout(interval):
                await wake.wait()
        except TimeoutError:
            pass


def _rendezvous(key: str, member: str) -> int:
    """Highest-random-weight hashing: a key keeps its member unless that member goes."""
    return int.from_bytes(hashlib.blake2b(f"{key}\0{member}".encode(), digest_size=8).digest(), "big")
