"""UDP ASSOCIATE (RFC 1928 §7): relaying datagrams between one client and the hosts it names.

An association owns a relay socket bound to the control connection's local IP (the address
the reply gives the client) and one outbound socket per kind of destination.  The request's
DST.ADDR/DST.PORT is where the client will send *from*: it is never routed or checked as a
destination; a non-zero DST.PORT fixes the client's port from the start.

Per datagram from the client: its source must be the client's IP (and port, once known);
the header is bounds-checked, FRAG != 0 is dropped; the destination goes through
``socksflow_udp_datagram`` and, for names, ``socksflow_resolve`` (cached on the session).
Replies are wrapped with the remote host's real IP and port.  The association ends with its
control connection, or after ``udp.idle`` without a datagram (the control connection is then
closed, so the client learns it).

The fast path: when no plugin implements ``socksflow_udp_datagram``, a datagram whose header
was seen before is sent on straight from ``datagram_received`` — one dict look-up, no task,
no parsing.  Everything else (new destinations, hooks, look-ups) goes through a per-association
worker that handles datagrams in arrival order.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import socket
from typing import TYPE_CHECKING

from socksflow.dial import reply_for_error
from socksflow.errors import PluginError, ResolveError
from socksflow.protocol import (
    Address,
    IPAddress,
    ProtocolError,
    Reply,
    UdpHeader,
    build_udp_header,
    parse_udp_header,
)
from socksflow.stash import StashKey

if TYPE_CHECKING:
    from socksflow.config import UdpSettings
    from socksflow.session import Session

log = logging.getLogger("socksflow.udp")

MAX_DESTINATIONS = 1024  # remotes remembered per association (routes and reply headers)
MAX_BACKLOG = 256  # datagrams waiting for a hook or a look-up; more are dropped, as UDP may
MAX_REPORTED = 32  # distinct drop reasons logged at INFO per association; the rest at DEBUG
_HEADER_LENGTH = {0x01: 10, 0x04: 22}  # RSV FRAG ATYP ADDR PORT for IPv4 / IPv6; names: 7 + length

# Where outbound sockets bind, by (IP version, loopback destination): the kernel picks the
# source address by route; loopback destinations get a socket the network cannot reach.
_SOURCES: dict[tuple[int, bool], IPAddress] = {
    (4, True): ipaddress.IPv4Address("127.0.0.1"),
    (4, False): ipaddress.IPv4Address("0.0.0.0"),
    (6, True): ipaddress.IPv6Address("::1"),
    (6, False): ipaddress.IPv6Address("::"),
}

ASSOCIATIONS = StashKey[collections.Counter[str]]("UDP associations per client IP")

Route = tuple["asyncio.DatagramTransport", tuple[str, int], "_Outbound"]


async def handle(session: Session) -> None:
    """Serve a UDP ASSOCIATE request until its control connection closes or it goes idle."""
    settings = session.config.udp
    counts = session.server.stash.setdefault(ASSOCIATIONS, collections.Counter())
    client_ip = str(session.client.host)
    if counts[client_ip] >= settings.max_per_client:
        reason = f"{client_ip} already holds {counts[client_ip]} UDP associations (udp.max_per_client)"
        await session.fail(Reply.GENERAL_FAILURE, reason)
    counts[client_ip] += 1
    association = Association(session, settings)
    try:
        try:
            await association.open()
        except OSError as exc:
            await session.fail(reply_for_error(exc), f"cannot open the UDP relay: {exc.strerror or exc}")
        session.association = association
        session.bound = association.bound
        session.send_reply(Reply.SUCCEEDED, association.bound)
        await session.wait_client_closed()
        session.close_reason = session.close_reason or "control connection closed"
    finally:
        association.close()
        counts[client_ip] -= 1
        if not counts[client_ip]:
            del counts[client_ip]


class Association(asyncio.DatagramProtocol):
    """One UDP association; as a protocol, it receives the client's datagrams on the relay socket.

    Counters for the access log: ``bytes_up``/``bytes_down`` (payload bytes relayed),
    ``datagrams_up``/``datagrams_down``, ``datagrams_dropped``.
    """

    def __init__(self, session: Session, settings: UdpSettings) -> None:
        self.session = session
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        client = session.client.host
        assert not isinstance(client, str) and session.request is not None
        self.family = socket.AF_INET6 if client.version == 6 else socket.AF_INET
        self.client_ip = socket.inet_ntop(self.family, client.packed)  # as recvfrom spells it
        self.client_port = session.request.destination.port  # 0 until the first datagram
        self.client_addr: tuple[str, int] | None = None  # where replies go, once the port is known
        if self.client_port:
            self.client_addr = (self.client_ip, self.client_port)
        self.bound: Address | None = None
        self.relay: asyncio.DatagramTransport | None = None
        self.relay_paused = False
        self.outbound: dict[tuple[int, bool], _Outbound] = {}
        self.routes: dict[bytes, Route] = {}  # header bytes → where its datagrams go (fast path)
        self.reply_headers: dict[tuple[str, int], bytes] = {}  # remote → header for its replies
        self.backlog: collections.deque[tuple[UdpHeader, bytes]] = collections.deque()
        self.worker: asyncio.Task[None] | None = None
        self.hooked = bool(session.pm.impls("socksflow_udp_datagram"))
        self.any_reply = settings.replies_from == "any"
        self.bytes_up = self.bytes_down = 0
        self.datagrams_up = self.datagrams_down = self.datagrams_dropped = 0
        self.active = False
        self._idle_polls = 0
        self._timer: asyncio.TimerHandle | None = None
        self._reported: set[str] = set()
        self._closed = False

    # ------------------------------------------------------------------ lifetime

    async def open(self) -> None:
        """Bind the relay socket next to the control connection and start the idle clock."""
        local = self.session.local.host
        self.relay, _ = await self.loop.create_datagram_endpoint(lambda: self, sock=_bound_socket(local, 0))
        port = self.relay.get_extra_info("sockname")[1]
        self.bound = Address(self.settings.advertise or local, port)
        if self.settings.idle:
            self._timer = self.loop.call_later(self.settings.idle / 4, self._poll_idle)

    def close(self) -> None:
        """Close every socket and stop the worker; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self.worker is not None:
            self.worker.cancel()
        self.backlog.clear()
        if self.relay is not None:
            self.relay.close()
        for outbound in self.outbound.values():
            outbound.transport.close()
        self.outbound.clear()
        self.routes.clear()

    def _poll_idle(self) -> None:
        """Checked in quarters of ``udp.idle``: four silent quarters end the association."""
        if self.active:
            self.active = False
            self._idle_polls = 0
        else:
            self._idle_polls += 1
        if self._idle_polls >= 4:
            self.session.close_reason = "idle timeout"
            self.session.client_transport.close()  # wait_client_closed() returns, handle() cleans up
        else:
            self._timer = self.loop.call_later(self.settings.idle / 4, self._poll_idle)

    # ------------------------------------------------------------------ client → remote

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        if (addr[1] != self.client_port or addr[0] != self.client_ip) and not self._admit(addr):
            return
        if self.worker is None and not self.hooked:
            atyp = data[3] if len(data) > 4 else 0
            length = _HEADER_LENGTH.get(atyp) or (7 + data[4] if atyp == 0x03 else 0)
            # A known key is a header that parsed before: right RSV, FRAG 0, and data is long enough.
            route = self.routes.get(data[:length])
            if route is not None:
                self._send(route, memoryview(data)[length:])
                return
        self._queue(data)

    def _admit(self, addr: tuple[str, int]) -> bool:
        """Whether a datagram from ``addr`` is the client's; learns the client's port."""
        if addr[0] != self.client_ip:
            self._drop(f"datagram from {addr[0]}, not the client's IP")
            return False
        if self.client_port:
            self._drop(f"datagram from port {addr[1]}, not the client's port {self.client_port}")
            return False
        self.client_port = addr[1]
        self.client_addr = (addr[0], addr[1])
        return True

    def _queue(self, data: bytes) -> None:
        try:
            header = parse_udp_header(data)
        except ProtocolError as exc:
            self._drop(f"malformed header: {exc}")
            return
        if header.frag:
            self._drop("fragment (FRAG != 0): reassembly is not supported")
            return
        if len(self.backlog) >= MAX_BACKLOG:
            self._drop("backlog full")
            return
        self.backlog.append((header, data))
        if self.worker is None:
            self.worker = self.loop.create_task(self._drain())

    async def _drain(self) -> None:
        """Forward queued datagrams in order; returns once the queue is empty (idle means no task)."""
        try:
            while self.backlog:
                header, data = self.backlog.popleft()
                try:
                    await self._forward(header, data)
                except Exception as exc:  # one bad datagram must not stop the association
                    log.exception("session %s: UDP datagram to %s", self.session.id, header.destination)
                    self._drop(f"internal error: {exc!r}")
        finally:
            self.worker = None

    async def _forward(self, header: UdpHeader, data: bytes) -> None:
        """Decide, resolve and send one datagram; remember its route when no hook must see the next."""
        session = self.session
        destination = header.destination
        addresses: tuple[IPAddress, ...] | None = None
        if self.hooked:
            try:
                verdict, plugin = await session.pm.call_first(
                    "socksflow_udp_datagram", session.config.timeouts.hook,
                    session=session, destination=destination, payload=data[header.offset :],
                )  # fmt: skip
            except PluginError as exc:
                self._drop(f"to {destination}: {exc}", exc)
                return
            if verdict is not None:
                if not verdict.allowed:
                    why = verdict.reason or verdict.rule or "no reason given"
                    self._drop(f"to {destination} denied by {plugin}: {why}")
                    return
                destination = verdict.destination or destination
                addresses = verdict.addresses
        if destination.port == 0:
            self._drop(f"to {destination}: port 0")
            return
        if addresses is None:
            if destination.is_domain:
                try:
                    addresses = await session.resolve(destination.host, destination.port)  # type: ignore[arg-type]
                except (ResolveError, PluginError) as exc:
                    self._drop(f"to {destination}: cannot resolve: {exc}")
                    return
            else:
                addresses = (destination.host,)  # type: ignore[assignment]
        if not addresses:
            self._drop(f"to {destination}: no address")
            return
        route = await self._route(addresses[0], destination.port)
        if not self.hooked:
            if len(self.routes) >= MAX_DESTINATIONS:
                self.routes.clear()
            self.routes[data[: header.offset]] = route
        self._send(route, memoryview(data)[header.offset :])

    async def _route(self, ip: IPAddress, port: int) -> Route:
        """The socket and address to send to ``ip``:``port``; registers the remote for replies."""
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        sockaddr = (socket.inet_ntop(family, ip.packed), port)
        if sockaddr not in self.reply_headers:
            self._remember(sockaddr, ip)
        key = (ip.version, ip.is_loopback)
        outbound = self.outbound.get(key)
        if outbound is None:
            outbound = _Outbound(self)
            await self.loop.create_datagram_endpoint(lambda: outbound, sock=_bound_socket(_SOURCES[key], 0))
            self.outbound[key] = outbound
        return outbound.transport, sockaddr, outbound

    def _remember(self, sockaddr: tuple[str, int], ip: IPAddress) -> bytes:
        if len(self.reply_headers) >= MAX_DESTINATIONS:
            del self.reply_headers[next(iter(self.reply_headers))]
            self.routes.clear()  # a cached route must never outlive its remote's reply header
        header = build_udp_header(Address(ip, sockaddr[1]))
        self.reply_headers[sockaddr] = header
        return header

    def _send(self, route: Route, payload: memoryview) -> None:
        transport, sockaddr, outbound = route
        if outbound.paused:
            self._drop("outbound socket congested")
            return
        transport.sendto(payload, sockaddr)
        self.bytes_up += len(payload)
        self.datagrams_up += 1
        self.active = True

    # ------------------------------------------------------------------ remote → client

    def reply(self, data: bytes, addr: tuple) -> None:
        """A datagram from a remote host: wrap it with the host's address and pass it to the client."""
        sockaddr = addr[:2]
        header = self.reply_headers.get(sockaddr)
        if header is None:
            if not self.any_reply:
                self._drop(f"reply from {sockaddr[0]}:{sockaddr[1]}, to which the client has not sent")
                return
            header = self._remember(sockaddr, ipaddress.ip_address(sockaddr[0].partition("%")[0]))
        if self.client_addr is None or self.relay_paused:
            self._drop("reply before the client's port is known, or relay socket congested")
            return
        self.relay.sendto(header + data, self.client_addr)  # type: ignore[union-attr]
        self.bytes_down += len(data)
        self.datagrams_down += 1
        self.active = True

    # ------------------------------------------------------------------ flow control and errors

    def pause_writing(self) -> None:
        self.relay_paused = True

    def resume_writing(self) -> None:
        self.relay_paused = False

    def error_received(self, exc: Exception) -> None:
        log.debug("session %s: UDP relay socket: %s", self.session.id, exc)

    def _drop(self, reason: str, error: Exception | None = None) -> None:
        """Count a dropped datagram; each distinct reason is logged once at INFO, then at DEBUG."""
        self.datagrams_dropped += 1
        if reason in self._reported or len(self._reported) >= MAX_REPORTED:
            log.debug("session %s: UDP datagram dropped: %s", self.session.id, reason)
            return
        self._reported.add(reason)
        log.info(
            "session %s: UDP datagram dropped: %s", self.session.id, reason,
            exc_info=error.__cause__ if error is not None else None,
        )  # fmt: skip


class _Outbound(asyncio.DatagramProtocol):
    """A socket that sends to remote hosts and receives their replies."""

    __slots__ = ("association", "paused", "transport")

    def __init__(self, association: Association) -> None:
        self.association = association
        self.paused = False
        self.transport: asyncio.DatagramTransport = None  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[override]
        self.association.reply(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("session %s: UDP outbound socket: %s", self.association.session.id, exc)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False


def _bound_socket(ip: IPAddress, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind((str(ip), port))
    except BaseException:
        sock.close()
        raise
    return sock
