"""UDP through a SOCKS5 upstream: the client side of the upstream's own UDP association.

The upstream answers UDP ASSOCIATE with the address of its relay (BND); every datagram goes
there with a SOCKS UDP header naming its destination, and what comes back from the relay
carries the header of the host that sent it.  The association lives as long as its control
connection, which is held open here.

The engine (``socksflow/udp.py``) opens it through :func:`socksflow.outbound.open_udp` when the
rule that allowed a UDP ASSOCIATE routes it here, and sends every datagram through it.
A SOCKS5 upstream carries UDP, and so does a chain of them (each hop's association carried by
the previous hop's); other kinds refuse with 0x07.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable

from socksflow import (
    UNSPECIFIED,
    Address,
    Command,
    Connector,
    ProtocolError,
    build_udp_header,
    clients,
    direct_connect,
    parse_udp_header,
)

from .wire import SocketChannel, run

log = logging.getLogger("socksflow.outbounds")

Receiver = Callable[[bytes, Address], None]


class UpstreamUdp(asyncio.DatagramProtocol):
    """One UDP association through an upstream: :meth:`send` datagrams, ``receiver`` gets replies.

    Its datagrams leave from its own socket, or, for a hop of a chain, through the association
    of the hop before (the *carrier*): each hop's header is wrapped inside the previous one's.
    """

    def __init__(self, name: str, control: socket.socket, relay: Address, receiver: Receiver) -> None:
        self.name = name
        self.control = control
        self.relay = relay
        self.relay_sockaddr = (str(relay.host), relay.port)
        self.receiver = receiver
        self.transport: asyncio.DatagramTransport | None = None
        self.carrier: UpstreamUdp | None = None
        self.dropped = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, destination: Address, payload: bytes) -> None:
        """Send ``payload`` to ``destination`` through the upstream's relay."""
        datagram = build_udp_header(destination) + payload
        if self.carrier is not None:
            self.carrier.send(self.relay, datagram)
        elif self.transport is not None:
            self.transport.sendto(datagram, self.relay_sockaddr)

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[override]
        self.carried(data, Address.from_sockaddr(addr))

    def carried(self, data: bytes, source: Address) -> None:
        """A datagram from ``source``: only the upstream's relay may answer this association."""
        if source != self.relay:
            self.dropped += 1
            return
        try:
            header = parse_udp_header(data)
        except ProtocolError:
            self.dropped += 1
            return
        if header.frag:
            self.dropped += 1
            return
        self.receiver(data[header.offset :], header.destination)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.carrier is not None:
            self.carrier.close()
        self.control.close()


async def associate(
    name: str,
    server: Address,
    credentials: tuple[bytes | None, bytes | None],
    receiver: Receiver,
    connect: Connector = direct_connect,
    carrier: Callable[[Receiver], Awaitable[UpstreamUdp]] | None = None,
) -> UpstreamUdp:
    """Open a UDP association on the SOCKS5 upstream ``server``, its control connection reached
    through ``connect``, its datagrams sent from a socket here or through ``carrier(receiver)``."""
    from .upstreams import reach

    control = await reach(name, server, connect)
    try:
        local = Address.from_sockaddr(control.getsockname())
        expected = Address(local.host, 0) if carrier is None else UNSPECIFIED  # a chain's: not known here
        bound = await run(
            clients.socks5(Command.UDP_ASSOCIATE, expected, *credentials), SocketChannel(control), name
        )
        relay = bound
        if bound.is_domain or bound.host.is_unspecified:  # type: ignore[union-attr]
            # "0.0.0.0": the relay listens where the control connection went (common practice)
            host = server.host if not server.is_domain else ipaddress.ip_address(control.getpeername()[0])
            relay = Address(host, bound.port)
        association = UpstreamUdp(name, control, relay, receiver)
        if carrier is not None:
            association.carrier = await carrier(association.carried)
            return association
        family = socket.AF_INET6 if local.atyp.name == "IPV6" else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind((str(local.host), 0))  # the address the upstream saw on the control connection
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: association, sock=sock)
    except BaseException:
        control.close()
        raise
    return association
