"""A listener behind a load balancer: the PROXY protocol header, read before any SOCKS byte.

:class:`ProxiedProtocol` owns a connection on a listener with ``proxy_protocol`` until the
header is read.  A connection from outside ``trusted`` is closed before anything is read; one
whose first bytes are not a complete valid header (of the versions the listener accepts)
within the handshake timeout is closed too.  A ``LOCAL`` header (a health check) is answered
with a clean close.  A ``PROXY`` header hands the connection to a
:class:`~socksflow.runner.ClientProtocol` whose client is the header's source, and feeds it
the bytes that followed the header.  Listeners without ``proxy_protocol`` never see this class.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from socksflow.protocol import NEED_DATA, Address
from socksflow.proxy_protocol import Command, HeaderReader, ProxyHeader, ProxyProtocolError
from socksflow.runner import ClientProtocol

if TYPE_CHECKING:
    from socksflow.config import ProxyProtocolSettings
    from socksflow.server import Server

log = logging.getLogger("socksflow.proxied")


class ProxiedProtocol(asyncio.Protocol):
    """A load balancer's connection until its PROXY header is read; then a ClientProtocol's."""

    __slots__ = ("_deadline", "_reader", "peer", "protocols", "server", "settings", "transport")

    def __init__(self, server: Server, protocols: frozenset[str], settings: ProxyProtocolSettings) -> None:
        self.server = server
        self.protocols = protocols
        self.settings = settings
        self._reader = HeaderReader(settings.versions)
        self._deadline: asyncio.TimerHandle | None = None
        self.peer: Address | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        sockaddr = transport.get_extra_info("peername")
        if sockaddr is None:  # reset before its transport was made
            transport.abort()
            return
        self.peer = peer = Address.from_sockaddr(sockaddr)
        if not self.settings.trusts(peer.host):  # type: ignore[arg-type]
            log.warning("refused %s: not a trusted sender of PROXY protocol headers", peer)
            transport.abort()
            return
        self._deadline = self.server.loop.call_later(
            self.server.config.timeouts.handshake, self._refuse, "no complete PROXY protocol header in time"
        )

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.receive_data(data)
        try:
            header = reader.next_event()
        except ProxyProtocolError as exc:
            self._refuse(str(exc))
            return
        if header is NEED_DATA:
            return
        assert isinstance(header, ProxyHeader)
        self._cancel_deadline()
        if header.command is Command.LOCAL:  # the balancer's health check: nothing to serve
            log.debug("PROXY protocol LOCAL header from %s: health check, closed", self.peer)
            self.transport.close()
            return
        client = ClientProtocol(self.server, self.protocols)
        self.transport.set_protocol(client)
        client.connection_made(self.transport, header.source)
        rest = reader.trailing_data
        if rest and not client.closed:
            client.data_received(rest)

    def eof_received(self) -> bool:
        self._refuse("closed before a complete PROXY protocol header")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()

    def _refuse(self, reason: str) -> None:
        self._cancel_deadline()
        log.warning("refused %s: %s", self.peer, reason)
        self.transport.abort()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
