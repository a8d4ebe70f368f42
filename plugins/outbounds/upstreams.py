"""Upstream proxies as outbounds: SOCKS5, SOCKS4/4a, HTTP CONNECT (optionally over TLS) and SSH."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from socksflow import (
    UNSPECIFIED,
    Address,
    Command,
    Connector,
    OutboundError,
    Reply,
    Stream,
    clients,
    direct_connect,
    reply_for_error,
)

from .wire import SocketChannel, StreamChannel, bridge, run

log = logging.getLogger("socksflow.outbounds")


async def reach(name: str, server: Address, connect: Connector) -> Any:
    """A socket connected to the upstream ``server``; failing to reach it is ``upstream_down``."""
    try:
        return await connect(server)
    except OutboundError as exc:
        raise OutboundError(
            f"outbound {name!r}: cannot reach upstream {server}: {exc}", exc.reply, upstream_down=True
        ) from exc
    except OSError as exc:
        raise OutboundError(
            f"outbound {name!r}: cannot reach upstream {server}: {exc.strerror or exc}",
            reply_for_error(exc),
            upstream_down=True,
        ) from exc


def _logged(exc: OutboundError) -> OutboundError:
    if exc.upstream_down and exc.reply == Reply.GENERAL_FAILURE and "login" in str(exc):
        log.warning("%s", exc)  # the operator's credentials are wrong: say which outbound, never the secret
    return exc


class _Single:
    """What every single-hop upstream shares: no hops, the server is the health probe."""

    name: str
    kind: str
    server: Address
    remote_dns: bool

    def hops(self) -> tuple[str, ...]:
        return ()

    def probe(self) -> Address | None:
        return self.server

    def describe(self) -> str:
        return f"{self.kind} upstream {self.server}"

    async def over_socket(self, handshake: clients.Handshake, connect: Connector) -> Stream:
        """Reach the upstream and run ``handshake`` on the plain socket, which the relay then takes."""
        sock = await reach(self.name, self.server, connect)
        try:
            bound = await run(handshake, SocketChannel(sock), self.name)
        except OutboundError as exc:
            sock.close()
            raise _logged(exc) from None
        except BaseException:
            sock.close()
            raise
        return sock, bound


@dataclass
class UpstreamBind:
    """A BIND on an upstream: ``bound`` is where the peer connects; :meth:`peer` waits for it."""

    name: str
    sock: socket.socket
    bound: Address

    async def peer(self) -> tuple[socket.socket, Address]:
        """The upstream's second reply: the socket, now relaying to the peer, and the peer's address."""
        address = await run(clients.socks5_reply(), SocketChannel(self.sock), self.name)
        return self.sock, address

    def close(self) -> None:
        self.sock.close()


@dataclass
class Socks5Upstream(_Single):
    name: str
    server: Address
    username: bytes | None = None
    password: bytes | None = None
    remote_dns: bool = True
    kind: str = "socks5"

    async def open_stream(
        self, destination: Address, connect: Connector = direct_connect, user: str = ""
    ) -> Stream:
        handshake = clients.socks5(Command.CONNECT, destination, self.username, self.password)
        return await self.over_socket(handshake, connect)

    async def open_bind(self, destination: Address, connect: Connector = direct_connect) -> UpstreamBind:
        """BIND on this upstream: ``destination`` is the expected peer (see :class:`UpstreamBind`)."""
        handshake = clients.socks5(Command.BIND, destination, self.username, self.password)
        sock, bound = await self.over_socket(handshake, connect)
        if not bound.is_domain and bound.host.is_unspecified:  # type: ignore[union-attr]
            bound = Address(self.server.host, bound.port)  # "anywhere": where we reached the upstream
        return UpstreamBind(self.name, sock, bound)

    async def open_udp(
        self,
        receiver: Callable[[bytes, Address], None],
        connect: Connector = direct_connect,
        carrier: Callable[..., Any] | None = None,
    ) -> Any:
        """A UDP association through this upstream (see :mod:`.udp`): UDP ASSOCIATE follows the route."""
        from .udp import associate

        return await associate(
            self.name, self.server, (self.username, self.password), receiver, connect, carrier
        )


@dataclass
class Socks4Upstream(_Single):
    name: str
    server: Address
    user_id: bytes = b""
    remote_dns: bool = True
    kind: str = "socks4"

    async def open_stream(
        self, destination: Address, connect: Connector = direct_connect, user: str = ""
    ) -> Stream:
        return await self.over_socket(clients.socks4(destination, self.user_id), connect)


@dataclass
class HttpUpstream(_Single):
    name: str
    server: Address
    authorization: str | None = None
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None
    remote_dns: bool = True
    kind: str = "http"

    async def open_stream(
        self, destination: Address, connect: Connector = direct_connect, user: str = ""
    ) -> Stream:
        handshake = clients.http_connect(destination, self.authorization)
        if self.tls is None:
            return await self.over_socket(handshake, connect)
        sock = await reach(self.name, self.server, connect)
        try:
            reader, writer = await asyncio.open_connection(
                sock=sock, ssl=self.tls, server_hostname=self.server_hostname or str(self.server.host)
            )
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise OutboundError(
                f"outbound {self.name!r}: TLS to {self.server} failed: {exc}",
                Reply.GENERAL_FAILURE,
                upstream_down=True,
            ) from exc
        try:
            bound = await run(handshake, StreamChannel(reader, writer), self.name)
        except BaseException as exc:
            writer.close()
            if isinstance(exc, OutboundError):
                raise _logged(exc) from None
            raise
        return await bridge(reader, writer), bound

    def describe(self) -> str:
        return f"http{'s' if self.tls else ''} upstream {self.server}"


class _SshLink:
    """An SSH connection and the tunnels on it: once its outbound is retired (a reload replaced
    the configuration), it closes when the last tunnel ends."""

    def __init__(self) -> None:
        self.connection: Any = None
        self.tunnels = 0
        self.retired = False

    def opened(self) -> None:
        self.tunnels += 1

    def ended(self) -> None:
        self.tunnels -= 1
        if self.retired and self.tunnels == 0:
            self.close()

    def retire(self) -> None:
        self.retired = True
        if self.tunnels == 0:
            self.close()

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


@dataclass
class SshUpstream(_Single):
    """``ssh -D``'s role: direct-tcpip channels over one SSH connection, reconnected with back-off."""

    name: str
    server: Address
    username: str
    client_keys: list[str]
    known_hosts: str | None  # None: host keys are not checked (only when configured so)
    remote_dns: bool = True
    kind: str = "ssh"
    backoff_min: float = 0.5
    backoff_max: float = 30.0
    _link: _SshLink = field(default_factory=_SshLink, repr=False)
    _lock: asyncio.Lock | None = field(default=None, repr=False)
    _retry_at: float = field(default=0.0, repr=False)
    _backoff: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        # Dropped with its configuration (a reload): the connection stays while tunnels use it.
        weakref.finalize(self, self._link.retire)

    async def open_stream(
        self, destination: Address, connect: Connector = direct_connect, user: str = ""
    ) -> Stream:
        import asyncssh  # the optional 'ssh' extra

        connection = await self._connect(connect)
        try:
            reader, writer = await connection.open_connection(str(destination.host), destination.port)
        except asyncssh.ChannelOpenError as exc:
            prohibited = exc.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
            reply = Reply.NOT_ALLOWED if prohibited else Reply.CONNECTION_REFUSED
            raise OutboundError(f"outbound {self.name!r}: upstream refused: {exc.reason}", reply) from None
        except (OSError, asyncssh.Error) as exc:
            self._link.connection = None
            raise OutboundError(
                f"outbound {self.name!r}: SSH connection lost: {exc}",
                Reply.GENERAL_FAILURE,
                upstream_down=True,
            ) from exc
        self._link.opened()
        return await bridge(reader, writer, self._link.ended), UNSPECIFIED

    async def _connect(self, connect: Connector) -> Any:
        import asyncssh

        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            connection = self._link.connection
            if connection is not None and not connection.is_closed():
                return connection
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                raise OutboundError(
                    f"outbound {self.name!r}: reconnecting in {wait:.1f}s after a failure",
                    Reply.HOST_UNREACHABLE,
                    upstream_down=True,
                )
            sock = await reach(self.name, self.server, connect)
            try:
                connection = await asyncssh.connect(
                    str(self.server.host),
                    self.server.port,
                    sock=sock,
                    username=self.username,
                    client_keys=self.client_keys,
                    known_hosts=self.known_hosts,
                    agent_path=None,
                    password=None,
                    kbdint_auth=False,
                    keepalive_interval=30,
                )
            except (OSError, asyncssh.Error) as exc:
                sock.close()
                self._backoff = min(self.backoff_max, max(self.backoff_min, self._backoff * 2))
                self._retry_at = time.monotonic() + self._backoff
                login = isinstance(exc, (asyncssh.PermissionDenied, asyncssh.HostKeyNotVerifiable))
                what = "upstream login failed" if login else "SSH handshake failed"
                error = OutboundError(
                    f"outbound {self.name!r}: {what}: {exc}", Reply.GENERAL_FAILURE, upstream_down=True
                )
                raise _logged(error) from None
            self._backoff = 0.0
            self._link.connection = connection
            return connection

    def close(self) -> None:
        self._link.close()
