"""Outbounds: how an allowed session reaches its destination, directly or through upstream proxies.

An outbound opens a stream to a destination and answers with a connected socket and the bound
address the last hop reported.  Outbounds compose: ``open_stream`` takes a *connector*, the way
to reach the proxy the outbound speaks to, so a chain is each hop dialling through the previous
one, and a group hands the connector to the member it picked.

The core owns the interface, ``direct`` and ``reject`` (mechanism); the ``outbounds`` standard
plugin owns the upstream kinds, chains and groups, and the rules' ``via:`` picks one (policy).
Plugins add kinds with :func:`register_kind`.

Failures raise :class:`OutboundError`, which carries the SOCKS reply the client gets: an
upstream's own reply code unchanged, a failure to reach an upstream mapped from the errno
(0x03/0x04/0x05/0x06), a failed upstream login 0x01.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from socksflow.dial import dial, reply_for_error
from socksflow.protocol import Address, Reply
from socksflow.stash import StashKey

if TYPE_CHECKING:
    from socksflow.config import Node

Stream = tuple[socket.socket, Address]
"""A connected non-blocking socket and the bound address the last hop reported (SOCKS BND)."""

Connector = Callable[[Address], Awaitable[socket.socket]]
"""How an outbound reaches the address it speaks to (its proxy, or the destination for direct)."""

UNSPECIFIED = Address(ipaddress.IPv4Address(0), 0)


class OutboundError(Exception):
    """A stream could not be opened; ``reply`` is what the client gets.

    ``upstream_down`` is true when the outbound itself failed (its proxy unreachable, its login
    refused) rather than the destination behind it: a group then marks the member down and
    tries the next one.
    """

    def __init__(self, message: str, reply: Reply, *, upstream_down: bool = False) -> None:
        super().__init__(message)
        self.reply = Reply(reply)
        self.upstream_down = upstream_down


@runtime_checkable
class Outbound(Protocol):
    """One way out.  ``open_udp`` and ``open_bind`` are optional; an outbound without them
    refuses those commands with 0x07."""

    name: str
    kind: str

    async def open_stream(self, destination: Address, connect: Connector, user: str = "") -> Stream:
        """A stream to ``destination``, reaching the first hop through ``connect``.

        ``user`` is the session's login, for groups that balance by user.  Raises
        :class:`OutboundError`.
        """
        ...

    def hops(self) -> tuple[str, ...]:
        """The names of the outbounds this one uses (chain hops, group members), for checks."""
        ...

    def describe(self) -> str:
        """One line for ``socksflow explain``: the kind, and what it would use now."""
        ...


async def direct_connect(address: Address) -> socket.socket:
    """Connect from this host: a name is resolved here, every address tried (Happy Eyeballs)."""
    if address.is_domain:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise OutboundError(f"cannot resolve {address.host}: {exc}", Reply.HOST_UNREACHABLE) from exc
        targets = [Address.from_sockaddr(info[4]) for info in infos]
    else:
        targets = [address]
    return await dial(targets)


@dataclass
class Direct:
    """Connect straight to the destination (the default)."""

    name: str = "direct"
    kind: str = "direct"

    async def open_stream(
        self, destination: Address, connect: Connector = direct_connect, user: str = ""
    ) -> Stream:
        try:
            sock = await connect(destination)
        except OSError as exc:
            raise OutboundError(f"connect to {destination} failed: {exc}", reply_for_error(exc)) from exc
        return sock, Address.from_sockaddr(sock.getsockname())

    def hops(self) -> tuple[str, ...]:
        return ()

    def describe(self) -> str:
        return "direct"


@dataclass
class Reject:
    """Refuse every session routed here with ``reply``."""

    name: str
    reply: Reply = Reply.NOT_ALLOWED
    kind: str = "reject"

    async def open_stream(
        self, destination: Address, connect: Connector = direct_connect, user: str = ""
    ) -> Stream:
        raise OutboundError(f"outbound {self.name!r} rejects {destination}", self.reply)

    def hops(self) -> tuple[str, ...]:
        return ()

    def describe(self) -> str:
        return f"reject with 0x{self.reply:02x}"


class Registry:
    """The outbounds of one configuration, by name; ``direct`` is always there."""

    def __init__(self, outbounds: dict[str, Outbound] | None = None) -> None:
        self._outbounds: dict[str, Outbound] = {"direct": Direct()}
        self._outbounds.update(outbounds or {})

    def __contains__(self, name: str) -> bool:
        return name in self._outbounds

    def __getitem__(self, name: str) -> Outbound:
        return self._outbounds[name]

    def get(self, name: str | None) -> Outbound:
        """The outbound called ``name``; ``None`` means direct."""
        return self._outbounds[name or "direct"]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._outbounds)


OUTBOUNDS = StashKey[Registry]("outbounds")
"""Where the plugin that owns ``outbounds:`` keeps the configuration's registry (``config.stash``)."""

ROUTE = StashKey[str]("outbounds.route")
"""What a session's dial went through (``session.stash``): ``corp``, or ``pool,pool=b`` for a group."""


class UdpOutbound(Protocol):
    """A UDP association through an outbound: what ``open_udp`` answers."""

    def send(self, destination: Address, payload: bytes) -> None:
        """Send one datagram to ``destination``."""
        ...

    def close(self) -> None: ...


Receiver = Callable[[bytes, Address], None]
"""Gets each datagram that came back through an outbound, with the address that sent it."""


async def open_udp(session: Any, receiver: Receiver) -> UdpOutbound | None:
    """The UDP association of ``session``'s route, or ``None`` when it goes direct.

    Raises :class:`OutboundError` (0x07 when the outbound cannot carry UDP).
    """
    opener = _opener(session, "open_udp", "UDP")
    return None if opener is None else await opener(receiver)


class BindOutbound(Protocol):
    """A BIND through an outbound: what ``open_bind`` answers."""

    bound: Address  # where the peer is to connect: the first reply's address

    async def peer(self) -> tuple[socket.socket, Address]:
        """Wait for the second reply: the connected socket and the peer's address."""
        ...

    def close(self) -> None: ...


async def open_bind(session: Any) -> BindOutbound | None:
    """The BIND of ``session``'s route, or ``None`` when it goes direct (as :func:`open_udp`)."""
    opener = _opener(session, "open_bind", "BIND")
    return None if opener is None else await opener(session.destination)


def carries(outbound: object, method: str) -> bool:
    """Whether ``outbound`` has ``method`` (``open_udp``, ``open_bind``) that works: an outbound
    made of others (a chain) answers through its own ``carries``."""
    answer = getattr(outbound, "carries", None)
    return answer(method) if answer is not None else hasattr(outbound, method)


def _opener(session: Any, method: str, command: str) -> Callable[..., Awaitable[Any]] | None:
    """The route's ``method``; ``None`` when the session goes direct; 0x07 when it has none."""
    verdict = session.verdict
    name = verdict.outbound if verdict is not None else None
    registry = session.config.stash.get(OUTBOUNDS)
    if name is None or name == "direct" or registry is None:
        return None
    outbound = registry.get(name)
    opener = getattr(outbound, method, None)
    if opener is None or not carries(outbound, method):
        raise OutboundError(f"outbound {name!r} cannot carry {command}", Reply.COMMAND_NOT_SUPPORTED)
    return opener


class BuildContext(Protocol):
    """What a kind's factory gets besides its own node: other outbounds, by name, once built."""

    def lookup(self, name: str) -> Outbound: ...


KindFactory = Callable[[str, "Node", "dict[str, Node]", BuildContext], Outbound]
"""``factory(name, kind_node, fields, context)``: build one outbound from its section entry."""

_KINDS: dict[str, KindFactory] = {}


def register_kind(kind: str, factory: KindFactory) -> None:
    """Make ``kind:`` usable in ``outbounds:`` (a plugin calls this when it is imported)."""
    _KINDS[kind] = factory


def kinds() -> dict[str, KindFactory]:
    """The registered kinds, by name."""
    return dict(_KINDS)


__all__ = [
    "OUTBOUNDS",
    "ROUTE",
    "BindOutbound",
    "Connector",
    "Direct",
    "Outbound",
    "OutboundError",
    "Receiver",
    "Registry",
    "Reject",
    "Stream",
    "UdpOutbound",
    "carries",
    "direct_connect",
    "kinds",
    "open_bind",
    "open_udp",
    "register_kind",
]
