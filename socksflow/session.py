"""What plugins see of one client connection: :class:`Session`, and :class:`AuthChannel`.

A session is a record: who the client is, what it asked, what was decided, what moved.  The
engine that fills it in is :mod:`socksflow.runner`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import TYPE_CHECKING, Protocol

from socksflow import resolution
from socksflow.decisions import ANONYMOUS, Identity, Verdict
from socksflow.protocol import Address, IPAddress, Reply, Request
from socksflow.relay import Direction
from socksflow.stash import Stash

if TYPE_CHECKING:
    from socksflow.config import Config
    from socksflow.forwarding import Counts
    from socksflow.hooks import Hooks
    from socksflow.relay import Tunnel
    from socksflow.server import Server
    from socksflow.udp import Association

MAX_REMEMBERED_NAMES = 1024  # per session (a UDP association may name many destinations)
_ids = itertools.count(1)


class _Client(Protocol):
    async def read(self, limit: int) -> bytes: ...
    def write(self, data: bytes) -> None: ...


class AuthChannel:
    """What a ``socksflow_subnegotiate`` plugin uses to talk to the client."""

    __slots__ = ("_client",)

    def __init__(self, client: _Client) -> None:
        self._client = client

    async def read(self, limit: int = 65536) -> bytes:
        """Up to ``limit`` bytes; ``b""`` when the client has closed."""
        return await self._client.read(limit)

    async def readexactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = await self._client.read(n - len(data))
            if not chunk:
                raise asyncio.IncompleteReadError(data, n)
            data += chunk
        return data

    def write(self, data: bytes) -> None:
        self._client.write(data)


class Session:
    """One client connection, from accept to close, as plugins see it.

    Stable attributes: ``id``, ``client``, ``local``, ``config``, ``stash``, ``protocol`` (the
    front door: ``"socks5"``, ``"socks4"``, ``"http"``, ``"unknown"``; ``""`` before the first
    byte), ``method``, ``identity``, ``request``, ``destination`` (after rewrites),
    ``addresses`` (what the destination resolved to), ``remote`` (the address actually
    connected to), ``bound``, ``verdict``, ``decided_by``, ``reply``, ``bytes_up``, ``bytes_down`` (payload bytes, TCP
    or UDP), ``datagrams_up``, ``datagrams_down`` (UDP ASSOCIATE), ``started``,
    ``duration``, ``close_reason``, ``authenticated`` (``None`` when no credentials were
    checked, else whether they were accepted) and ``timings`` (seconds spent in the phases
    that took place: ``"handshake"`` from accept to the request, ``"resolve"`` in DNS,
    ``"connect"`` dialling the destination).
    """

    # Slots: a tunnel's session lives as long as the tunnel, and an instance dict of 20 keys
    # or more is not key-shared.
    __slots__ = (
        "_hooks",
        "_resolved",
        "addresses",
        "association",
        "authenticated",
        "bound",
        "client",
        "close_reason",
        "config",
        "decided_by",
        "destination",
        "ended",
        "forwarded",
        "id",
        "identity",
        "local",
        "method",
        "protocol",
        "remote",
        "reply",
        "request",
        "server",
        "started",
        "stash",
        "timings",
        "tunnel",
        "verdict",
    )

    def __init__(self, server: Server, hooks: Hooks, client: Address, local: Address) -> None:
        self.id = f"{next(_ids):x}" if server.worker is None else f"w{server.worker}-{next(_ids):x}"
        self.server = server
        self.config: Config = server.config
        self._hooks = hooks
        self.client = client
        self.local = local
        self.stash = Stash()
        self.method: int | None = None
        self.protocol = ""  # the front door: "socks5", "socks4" or "http" (from the first byte)
        self.identity: Identity = ANONYMOUS
        self.request: Request | None = None
        self.destination: Address | None = None
        self.addresses: tuple[IPAddress, ...] | None = None
        self.remote: Address | None = None
        self.bound: Address | None = None
        self.verdict: Verdict | None = None
        self.decided_by = ""
        self.reply: Reply | None = None
        self.close_reason = ""
        self.authenticated: bool | None = None
        self.timings: dict[str, float] = {}
        self.started = time.time()
        self.ended: float | None = None
        self.tunnel: Tunnel | None = None  # CONNECT, BIND: where the byte counts come from
        self.association: Association | None = None  # UDP ASSOCIATE: likewise
        self.forwarded: Counts | None = None  # a forwarded HTTP request: likewise
        self._resolved: dict[str, tuple[IPAddress, ...]] | None = None  # made on the first look-up

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.client} -> {self.destination}>"

    @property
    def bytes_up(self) -> int:
        relay = self.tunnel or self.association or self.forwarded
        return relay.bytes_up if relay else 0

    @property
    def bytes_down(self) -> int:
        relay = self.tunnel or self.association or self.forwarded
        return relay.bytes_down if relay else 0

    @property
    def datagrams_up(self) -> int:
        return self.association.datagrams_up if self.association else 0

    @property
    def datagrams_down(self) -> int:
        return self.association.datagrams_down if self.association else 0

    @property
    def duration(self) -> float:
        return (self.ended or time.time()) - self.started

    @property
    def outcome(self) -> str | None:
        """``"deny"`` if a plugin refused the session, else ``"allow"`` once it made a request, else ``None``."""
        if self.verdict is not None and not self.verdict.allowed:
            return "deny"
        return "allow" if self.request is not None else None

    async def resolve(self, host: str | None = None, port: int | None = None) -> tuple[IPAddress, ...]:
        """The addresses ``host`` (default: the destination) resolves to, looked up once per session.

        Raises :class:`~socksflow.errors.ResolveError` when the name does not resolve.
        """
        if host is None:
            assert self.destination is not None
            if not self.destination.is_domain:
                return (self.destination.host,)  # type: ignore[return-value]
            host, port = self.destination.host, self.destination.port  # type: ignore[assignment]
        if self._resolved is None:
            self._resolved = {}
        cached = self._resolved.get(host)
        if cached is None:
            began = time.monotonic()
            try:
                cached = await resolution.resolve(self._hooks, self.config, self, host, port or 0)
            finally:
                self.timings["resolve"] = self.timings.get("resolve", 0.0) + time.monotonic() - began
            if len(self._resolved) >= MAX_REMEMBERED_NAMES:  # a UDP client spraying names starts over
                self._resolved.clear()
            self._resolved[host] = cached
        return cached

    def resolved(self, host: str) -> tuple[IPAddress, ...] | None:
        """What ``host`` resolved to in this session, if it was looked up already (no waiting)."""
        return self._resolved.get(host) if self._resolved is not None else None


__all__ = ["AuthChannel", "Direction", "Session"]
