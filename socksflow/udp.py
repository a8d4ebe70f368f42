"""UDP ASSOCIATE (RFC 1928 §7): relaying datagrams between one client and the hosts it names.

An association owns a relay socket bound to the control connection's local IP (the address
the reply gives the client) and one outbound socket per kind of destination.  The request's
DST.ADDR/DST.PORT is where the client will send *from*: it is never routed or checked as a
destination; a non-zero DST.PORT fixes the client's port from the start.

Per datagram from the client: its source must be the client's IP (and port, once known);
the header is bounds-checked, FRAG != 0 is dropped; the destination goes through
``socksflow_udp_datagram`` and, for names, ``socksflow_resolve`` (cached on the session).
Replies are wrapped with the remote host's real IP and port.  Limiters from
``socksflow_relay_start`` (bandwidth) pace datagrams both ways.  The association ends with its
control connection, or after ``udp.idle`` without a datagram (the control connection is then
closed, so the client learns it).

The fast path: a datagram whose header was seen before is sent on straight from
``datagram_received`` — one dict look-up, no task, no parsing; when a plugin implements
``socksflow_udp_datagram`` the hook is still asked about every datagram, without a task
while it answers synchronously.  Everything else (new destinations, redirects, async answers,
look-ups) goes through a per-association worker that handles datagrams in arrival order,
except that a datagram whose destination name must be looked up waits for that look-up alone
(up to MAX_LOOKUPS names at once): a slow name delays only the datagrams sent to it, which
keep their order.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from socksflow.datagrams import NameParking, Pacer, RouteCache
from socksflow.decide import Decision, decide, final
from socksflow.decisions import Verdict
from socksflow.dial import reply_for_error
from socksflow.errors import PluginError, ResolveError
from socksflow.outbound import OutboundError, UdpOutbound, open_udp
from socksflow.protocol import (
    Address,
    IPAddress,
    ProtocolError,
    Reply,
    UdpHeader,
    parse_udp_header,
)
from socksflow.relay import Direction, Limiter
from socksflow.sockets import bound_socket, ip_text

if TYPE_CHECKING:
    from socksflow.config import UdpSettings
    from socksflow.runner import Runner

log = logging.getLogger("socksflow.udp")

MAX_DESTINATIONS = 1024  # remotes remembered per association (routes and reply headers)
MAX_BACKLOG = 256  # datagrams waiting for a hook or a look-up; more are dropped, as UDP may
MAX_REPORTED = 32  # distinct drop reasons logged at INFO per association; the rest at DEBUG
MAX_LOOKUPS = 32  # names being resolved at once per association; datagrams to more are dropped
MAX_PACED_BYTES = 256 * 1024  # per direction: datagrams waiting for a bandwidth limit
_HEADER_LENGTH = {0x01: 10, 0x04: 22}  # RSV FRAG ATYP ADDR PORT for IPv4 / IPv6; names: 7 + length

# Where outbound sockets bind, by (IP version, loopback destination): the kernel picks the
# source address by route; loopback destinations get a socket the network cannot reach.
_SOURCES: dict[tuple[int, bool], IPAddress] = {
    (4, True): ipaddress.IPv4Address("127.0.0.1"),
    (4, False): ipaddress.IPv4Address("0.0.0.0"),
    (6, True): ipaddress.IPv6Address("::1"),
    (6, False): ipaddress.IPv6Address("::"),
}

# What the worker gets with a datagram: nothing yet, the hook's pending answer, or its answer.
Answer = tuple[Verdict | None, str] | Awaitable[tuple[Verdict | None, str]] | None


async def handle(runner: Runner) -> None:
    """Serve a UDP ASSOCIATE request until its control connection closes or it goes idle."""
    session = runner.session
    association = Association(runner, session.config.udp)
    try:
        try:
            await association.open()
            async with asyncio.timeout(session.config.timeouts.connect):
                association.upstream = await open_udp(session, association.from_upstream)
        except OutboundError as exc:
            await runner.fail(exc.reply, f"UDP through the outbound failed: {exc}")
        except (OSError, TimeoutError) as exc:
            await runner.fail(reply_for_error(exc), f"cannot open the UDP relay: {exc.strerror or exc}")
        try:
            association.pace(runner.hooks.relay_start(session))
        except PluginError as exc:
            await runner.fail(Reply.GENERAL_FAILURE, "relay start failed: plugin error", exc)
        session.association = association
        session.bound = association.bound
        runner.send_reply(Reply.SUCCEEDED, association.bound)
        await runner.wait_client_closed()
        runner.set_reason("control connection closed")
    finally:
        association.close()


class Association(asyncio.DatagramProtocol):
    """One UDP association; as a protocol, it receives the client's datagrams on the relay socket.

    Counters for the access log: ``bytes_up``/``bytes_down`` (payload bytes relayed),
    ``datagrams_up``/``datagrams_down``, ``datagrams_dropped``.
    """

    def __init__(self, runner: Runner, settings: UdpSettings) -> None:
        self.runner = runner
        self.session = session = runner.session
        self.hooks = runner.hooks
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        client = session.client.host
        assert not isinstance(client, str) and session.request is not None
        self.client_ip = ip_text(client)  # as recvfrom spells it
        self.client_port = session.request.destination.port  # 0 until the first datagram
        self.client_addr: tuple[str, int] | None = None  # where replies go, once the port is known
        if self.client_port:
            self.client_addr = (self.client_ip, self.client_port)
        self.bound: Address | None = None
        self.relay: asyncio.DatagramTransport | None = None
        self.relay_paused = False
        self.outbound: dict[tuple[int, bool], _Outbound] = {}
        self.upstream: UdpOutbound | None = None  # the route's association, when it is not direct
        self.routes: RouteCache[_Route] = RouteCache(MAX_DESTINATIONS)
        self.backlog: collections.deque[tuple[UdpHeader, bytes, Answer]] = collections.deque()
        self.worker: asyncio.Task[None] | None = None
        self.parking: NameParking[_Parked] = NameParking(self.loop, self._look_up, MAX_LOOKUPS, MAX_BACKLOG)
        self.hooked = bool(self.hooks.implementations("socksflow_udp_datagram"))
        self.pacer: Pacer | None = None  # with limiters from socksflow_relay_start (bandwidth)
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
        self.relay, _ = await self.loop.create_datagram_endpoint(
            lambda: self, sock=bound_socket(local, 0, socket.SOCK_DGRAM)
        )
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
        self.parking.close()
        if self.pacer is not None:
            self.pacer.close()
        for _, _, answer in self.backlog:
            _discard(answer)
        self.backlog.clear()
        if self.relay is not None:
            self.relay.close()
        for outbound in self.outbound.values():
            outbound.transport.close()
        self.outbound.clear()
        if self.upstream is not None:
            self.upstream.close()
        self.routes.clear()

    def pace(self, limiters: Sequence[Limiter]) -> None:
        """Pace datagrams both ways by these limiters (from ``socksflow_relay_start``)."""
        self.pacer = Pacer(self.loop, limiters, MAX_PACED_BYTES) if limiters else None

    def _poll_idle(self) -> None:
        """Checked in quarters of ``udp.idle``: four silent quarters end the association."""
        if self.active:
            self.active = False
            self._idle_polls = 0
        else:
            self._idle_polls += 1
        if self._idle_polls >= 4:
            self.runner.end("idle timeout")  # wait_client_closed() returns, handle() cleans up
        else:
            self._timer = self.loop.call_later(self.settings.idle / 4, self._poll_idle)

    # ------------------------------------------------------------------ client → remote

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        if (addr[1] != self.client_port or addr[0] != self.client_ip) and not self._admit(addr):
            return
        if self.worker is None:  # else the queue decides, so datagrams keep their order
            atyp = data[3] if len(data) > 4 else 0
            length = _HEADER_LENGTH.get(atyp) or (7 + data[4] if atyp == 0x03 else 0)
            # A known key is a header that parsed before: right RSV, FRAG 0, and data is long enough.
            route = self.routes.route(data[:length])
            if route is not None:
                if not self.hooked:
                    self._send(route, memoryview(data)[length:])
                else:
                    self._decide_now(route, data)
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

    def _decide_now(self, route: _Route, data: bytes) -> None:
        """A datagram to a known destination: ask the hook without a task while it answers synchronously."""
        header = route.header
        session = self.session
        try:
            answer = self.hooks.udp_datagram(session, header.destination, data[header.offset :])
        except PluginError as exc:
            self._plugin_failed(header.destination, exc)
            return
        if inspect.isawaitable(answer):
            self._enqueue(header, data, answer)
            return
        decision = final(answer, header.destination)
        if decision is None:  # a rewrite: its judges, resolving and routing are the worker's
            self._enqueue(header, data, answer)
        elif self._allowed(header.destination, decision):
            if decision.as_asked:
                self._send(route, memoryview(data)[header.offset :])
            else:  # restricted to some addresses: the worker routes it
                self._enqueue(header, data, answer)

    def _queue(self, data: bytes) -> None:
        try:
            header = parse_udp_header(data)
        except ProtocolError as exc:
            self._drop(f"malformed header: {exc}")
            return
        if header.frag:
            self._drop("fragment (FRAG != 0): reassembly is not supported")
            return
        self._enqueue(header, data, None)

    def _enqueue(self, header: UdpHeader, data: bytes, answer: Answer) -> None:
        """Queue a datagram for the worker, with the hook's answer if it was asked already."""
        if len(self.backlog) >= MAX_BACKLOG:
            _discard(answer)
            self._drop("backlog full")
            return
        self.backlog.append((header, data, answer))
        if self.worker is None:
            self.worker = self.loop.create_task(self._drain())

    async def _drain(self) -> None:
        """Forward queued datagrams in order; returns once the queue is empty (idle means no task)."""
        try:
            while self.backlog:
                header, data, answer = self.backlog.popleft()
                await self._guarded(header.destination, self._forward(header, data, answer))
        finally:
            self.worker = None

    async def _forward(self, header: UdpHeader, data: bytes, answer: Answer) -> None:
        """Decide, resolve and send one datagram; remember the route of a destination sent to as asked."""
        session = self.session
        destination = header.destination
        addresses: tuple[IPAddress, ...] | None = None
        as_asked = True
        if self.hooked:
            payload = data[header.offset :]

            def ask(where: Address, after: str | None) -> Any:
                return self.hooks.udp_datagram(session, where, payload, after=after)

            try:
                if inspect.isawaitable(answer):
                    answer = await answer
                decision = await decide(ask, destination, answer)  # type: ignore[arg-type]
            except PluginError as exc:
                self._plugin_failed(destination, exc)
                return
            if not self._allowed(destination, decision):
                return
            destination, addresses, as_asked = decision.destination, decision.addresses, decision.as_asked
        if destination.port == 0:
            self._drop(f"to {destination}: port 0")
            return
        if addresses is None:
            if not destination.is_domain:
                addresses = (destination.host,)  # type: ignore[assignment]
            else:
                name: str = destination.host  # type: ignore[assignment]
                addresses = None if name in self.parking else session.resolved(name)
                if addresses is None:  # the worker goes on; the datagram waits for its name
                    refusal = self.parking.park(
                        name, destination.port, _Parked(header, data, destination, as_asked)
                    )
                    if refusal is not None:
                        self._drop(refusal)
                    return
        await self._deliver_to(_Parked(header, data, destination, as_asked), addresses)

    async def _deliver_to(self, parked: _Parked, addresses: tuple[IPAddress, ...]) -> None:
        """Send a datagram to the first of its destination's addresses; remember the route if as asked."""
        header, data, destination = parked.header, parked.data, parked.destination
        if not addresses:
            self._drop(f"to {destination}: no address")
            return
        route = await self._route(header, addresses[0], destination.port)
        if parked.as_asked:
            self.routes.add_route(data[: header.offset], route)
        self._send(route, memoryview(data)[header.offset :])

    async def _look_up(self, name: str, port: int, waiting: collections.deque[_Parked]) -> None:
        """Resolve ``name``, then send what waited for it, in order (new arrivals join the queue)."""
        try:
            addresses = await self.session.resolve(name, port)
        except (ResolveError, PluginError) as exc:
            while waiting:
                self._drop(f"to {waiting.popleft().destination}: cannot resolve: {exc}")
            return
        while waiting and not self._closed:
            parked = waiting.popleft()
            await self._guarded(parked.destination, self._deliver_to(parked, addresses))

    async def _guarded(self, destination: Address, forwarding: Awaitable[None]) -> None:
        """Forward one datagram; a failure drops it, and the association goes on."""
        try:
            await forwarding
        except Exception as exc:
            log.exception("session %s: UDP datagram to %s", self.session.id, destination)
            self._drop(f"internal error: {exc!r}")

    def _allowed(self, destination: Address, decision: Decision) -> bool:
        """Whether a datagram to ``destination`` may go on; a denied one is dropped."""
        if decision.allowed:
            return True
        self._drop(f"to {destination} denied by {decision.decided_by}: {decision.why() or 'no reason given'}")
        return False

    def _plugin_failed(self, destination: Address, error: PluginError) -> None:
        """A plugin raised on a datagram: that datagram is dropped (fail closed), the association goes on."""
        self._drop(f"to {destination}: {error}", error)
        session = self.session
        session.server.spawn(self.hooks.session_error(session, error))

    async def _route(self, header: UdpHeader, ip: IPAddress, port: int) -> _Route:
        """The socket and address to send to ``ip``:``port``; registers the remote for replies."""
        sockaddr = (ip_text(ip), port)
        self.routes.add_remote(sockaddr, ip)
        if self.upstream is not None:
            return _Route(header, _ViaUpstream(self.upstream), sockaddr)  # type: ignore[arg-type]
        key = (ip.version, ip.is_loopback)
        outbound = self.outbound.get(key)
        if outbound is None:
            outbound = _Outbound(self, bound_socket(_SOURCES[key], 0, socket.SOCK_DGRAM))
            await self.loop.create_datagram_endpoint(lambda: outbound, sock=outbound.sock)
            self.outbound[key] = outbound
        return _Route(header, outbound, sockaddr)

    def _send(self, route: _Route, payload: memoryview) -> None:
        if self.pacer is None:
            self._transmit(route, payload)
        else:
            self._paced(Direction.UP, len(payload), self._transmit, route, payload)

    def _paced(self, direction: Direction, size: int, send: Callable[..., None], *args: Any) -> None:
        refusal = self.pacer.admit(direction, size, send, *args)  # type: ignore[union-attr]
        if refusal is not None:
            self._drop(refusal)

    def _transmit(self, route: _Route, payload: memoryview) -> None:
        outbound = route.outbound
        if outbound.paused:
            self._drop("outbound socket congested")
            return
        if payload:
            outbound.transport.sendto(payload, route.sockaddr)
        else:  # asyncio's sendto (3.11) silently skips empty datagrams, which are valid UDP
            outbound.send_empty(route.sockaddr)
        self.bytes_up += len(payload)
        self.datagrams_up += 1
        self.active = True

    # ------------------------------------------------------------------ remote → client

    def from_upstream(self, data: bytes, source: Address) -> None:
        """A datagram that came back through the route's upstream, from ``source``."""
        self.reply(data, (str(source.host), source.port))

    def reply(self, data: bytes, addr: tuple) -> None:
        """A datagram from a remote host: wrap it with the host's address and pass it to the client."""
        sockaddr = addr[:2]
        header = self.routes.reply_header(sockaddr)
        if header is None:
            if not self.any_reply:
                self._drop(f"reply from {sockaddr[0]}:{sockaddr[1]}, to which the client has not sent")
                return
            header = self.routes.add_remote(sockaddr, ipaddress.ip_address(sockaddr[0].partition("%")[0]))
        if self.client_addr is None:
            self._drop("reply before the client's port is known")
            return
        if self.pacer is None:
            self._deliver(header, data)
        else:
            self._paced(Direction.DOWN, len(data), self._deliver, header, data)

    def _deliver(self, header: bytes, data: bytes) -> None:
        if self.relay_paused:
            self._drop("relay socket congested")
            return
        self.relay.sendto(header + data, self.client_addr)  # type: ignore[union-attr, arg-type]
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


class _Parked(NamedTuple):
    """A datagram on its way: its header and bytes, where it goes, whether that is as the client asked."""

    header: UdpHeader
    data: bytes
    destination: Address
    as_asked: bool


class _Route:
    """Where datagrams with one header go: the parsed header, the socket, the remote's address."""

    __slots__ = ("header", "outbound", "sockaddr")

    def __init__(self, header: UdpHeader, outbound: _Outbound, sockaddr: tuple[str, int]) -> None:
        self.header = header
        self.outbound = outbound
        self.sockaddr = sockaddr


class _Outbound(asyncio.DatagramProtocol):
    """A socket that sends to remote hosts and receives their replies."""

    __slots__ = ("association", "paused", "sock", "transport")

    def __init__(self, association: Association, sock: socket.socket) -> None:
        self.association = association
        self.sock = sock
        self.paused = False
        self.transport: asyncio.DatagramTransport = None  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[override]
        self.association.reply(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("session %s: UDP outbound socket: %s", self.association.session.id, exc)

    def send_empty(self, sockaddr: tuple[str, int]) -> None:
        try:
            self.sock.sendto(b"", sockaddr)
        except OSError as exc:  # a full buffer drops it, as it would any datagram
            self.error_received(exc)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False


class _ViaUpstream:
    """Looks like an :class:`_Outbound` to the send path; sends through an upstream's association."""

    __slots__ = ("paused", "transport", "upstream")

    def __init__(self, upstream: UdpOutbound) -> None:
        self.upstream = upstream
        self.paused = False
        self.transport = self

    def sendto(self, payload: bytes | memoryview, sockaddr: tuple[str, int]) -> None:
        self.upstream.send(Address(ipaddress.ip_address(sockaddr[0]), sockaddr[1]), bytes(payload))

    def send_empty(self, sockaddr: tuple[str, int]) -> None:
        self.sendto(b"", sockaddr)


def _discard(answer: Answer) -> None:
    """Close a pending hook answer that will never be awaited (no "never awaited" warning)."""
    if inspect.iscoroutine(answer):
        answer.close()
