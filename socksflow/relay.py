"""Moving bytes between the client and the destination: the fast path.

Each side of a tunnel is an :class:`asyncio.Protocol` that writes what it reads straight
into the other side's transport.  Flow control is the transports' own: when one side's
write buffer passes its high-water mark, reading from the other side pauses, so memory
per tunnel stays bounded.  Half-close is relayed, and so is a reset (RST for RST).  Only tunnels that need it pay for
per-chunk plugin hooks or limiters: :func:`half_class` picks the cheapest protocol class.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import socket
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from socksflow.hooks import Hooks
    from socksflow.session import Session

WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class Direction(enum.Enum):
    """Which way bytes flow: UP is client → destination, DOWN is destination → client."""

    UP = "up"
    DOWN = "down"


class Limiter(Protocol):
    """Rate limits handed to a tunnel once, at relay start (see ``socksflow_relay_start``)."""

    def delay(self, direction: Direction, nbytes: int) -> float:
        """Account ``nbytes`` moved in ``direction``; return seconds to pause that direction."""


Transform = Callable[[Direction, bytes], bytes]


def chunk_transform(hooks: Hooks, session: Session) -> Transform | None:
    """The ``socksflow_relay_data`` chain for a tunnel, or ``None`` (the fast path) when no plugin has one.

    Each implementation gets the chunk as the previous one left it.  A plugin that raises
    ends the tunnel (see :meth:`Tunnel.fault`).
    """
    if not hooks.implementations("socksflow_relay_data"):
        return None
    return functools.partial(hooks.relay_data, session)


class Half(asyncio.Protocol):
    """One side of a tunnel: reads from its own transport, writes to the peer's."""

    __slots__ = ("_blocks", "active", "count", "eof", "peer", "transport", "tunnel")

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.peer: Half = None  # type: ignore[assignment]
        self.count = 0
        self.active = False
        self.eof = False
        self._blocks = 0  # reasons reading is paused: peer's buffer full, limiter wait

    @property
    def direction(self) -> Direction:
        """Of the bytes this side reads (asked per chunk only by plugin hooks and limiters: no slot)."""
        return Direction.UP if self.tunnel.client is self else Direction.DOWN

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)
        self.count += len(data)
        self.active = True

    def eof_received(self) -> bool:
        self.eof = True
        self.tunnel.half_closed(self)
        return True  # keep the transport: the other direction may still flow

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.lost(self, exc)

    # Flow control: called by asyncio on *this* transport's write buffer, which the peer fills.
    def pause_writing(self) -> None:
        self.peer.block()

    def resume_writing(self) -> None:
        self.peer.unblock()

    def block(self) -> None:
        self._blocks += 1
        if self._blocks == 1 and not self.transport.is_closing():
            self.transport.pause_reading()

    def unblock(self) -> None:
        self._blocks -= 1
        if self._blocks == 0 and not self.transport.is_closing():
            self.transport.resume_reading()


class Pending(asyncio.Protocol):
    """Holds what a new upstream connection delivers until its tunnel starts.

    The SOCKS reply must reach the client before any byte of the destination's, and a
    destination may send (or close) the moment it accepts, before the reply is written.
    """

    __slots__ = ("chunks", "eof", "error", "lost", "transport")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.eof = False
        self.lost = False
        self.error: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.error = exc


class TransformingHalf(Half):
    """A half that passes every chunk through the per-chunk plugin hooks."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        self.count += len(data)
        self.active = True
        try:
            out = self.tunnel.transform(self.direction, data)  # type: ignore[misc]
        except Exception as exc:  # a plugin fault: fail closed, this tunnel ends
            self.tunnel.fault(exc)
            return
        if out:
            self.peer.transport.write(out)


class LimitedHalf(TransformingHalf):
    """A half that asks its limiters how long to pause after each chunk."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        if self.tunnel.transform is None:
            Half.data_received(self, data)
        else:
            TransformingHalf.data_received(self, data)
        wait = 0.0
        direction = self.direction
        for limiter in self.tunnel.limiters:
            wait = max(wait, limiter.delay(direction, len(data)))
        if wait > 0:
            self.block()
            asyncio.get_running_loop().call_later(wait, self.unblock)


def reset(transport: asyncio.Transport) -> None:
    """Abort ``transport`` with a TCP reset (RST), not a FIN: SO_LINGER 0, then close at once."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    transport.abort()


def _closed(tunnel: Tunnel) -> None:
    """A closed tunnel's ``on_close``: it was called once already."""


def half_class(transform: Transform | None, limiters: Sequence[Limiter]) -> type[Half]:
    if limiters:
        return LimitedHalf
    if transform is not None:
        return TransformingHalf
    return Half


class Tunnel:
    """Two halves relaying between a client transport and an upstream transport.

    A tunnel with a ``transform`` or ``limiters`` is a :class:`FilteringTunnel`, which holds them
    (:func:`new_tunnel` picks); the plain one (most of them, and every idle one counts) has no
    slots for them.
    """

    __slots__ = ("_lost", "client", "error", "failure", "idle_polls", "on_close", "upstream")

    transform: Transform | None = None
    limiters: tuple[Limiter, ...] = ()

    def __init__(self, on_close: Callable[[Tunnel], None], half: type[Half] = Half) -> None:
        self.client = half(self)
        self.upstream = half(self)
        self.client.peer = self.upstream
        self.upstream.peer = self.client
        self.on_close = on_close
        self._lost = 0
        self.error: Exception | None = None  # the error a connection was lost with
        self.failure: Exception | None = None  # the transform's, which ended the tunnel
        self.idle_polls = 0

    @property
    def bytes_up(self) -> int:
        return self.client.count

    @property
    def bytes_down(self) -> int:
        return self.upstream.count

    def start(
        self, client: asyncio.Transport, upstream: Pending, early_data: bytes, client_eof: bool
    ) -> None:
        """Take over both connections; ``early_data`` arrived with the request (optimistic data)."""
        for half, transport in ((self.client, client), (self.upstream, upstream.transport)):
            half.transport = transport
            transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
            transport.set_protocol(half)
        if early_data:
            self.client.data_received(early_data)
        for chunk in upstream.chunks:
            self.upstream.data_received(chunk)
        if upstream.lost:  # its connection_lost has been and gone: replay it
            self.lost(self.upstream, upstream.error)
        else:
            upstream.transport.resume_reading()
            if upstream.eof:
                self.upstream.eof_received()
        client.resume_reading()
        if client_eof:
            self.client.eof_received()

    def half_closed(self, half: Half) -> None:
        peer = half.peer.transport
        if half.peer.eof or not peer.can_write_eof():
            self.close()
        else:
            peer.write_eof()

    def lost(self, half: Half, exc: Exception | None) -> None:
        if exc is not None and self.error is None:
            self.error = exc
        self._lost += 1
        if self._lost == 1 and half.peer.transport is not None:
            if isinstance(exc, ConnectionResetError):
                reset(half.peer.transport)  # a cut-off transfer must not look complete (FIN) to the peer
            else:
                half.peer.transport.close()  # flushes what is buffered, then closes
        elif self._lost == 2:
            on_close, self.on_close = self.on_close, _closed
            on_close(self)
            # Nothing calls the halves any more: without these cycles (halves ↔ tunnel ↔ the
            # runner's callback ↔ its session) refcounting frees the session's objects now, not a
            # full collection later that has to walk every session that ended since.
            self.client.tunnel = self.upstream.tunnel = None  # type: ignore[assignment]
            self.client.peer = self.upstream.peer = None  # type: ignore[assignment]

    def close(self) -> None:
        self.client.transport.close()
        self.upstream.transport.close()

    def abort(self) -> None:
        self.client.transport.abort()
        self.upstream.transport.abort()

    def fault(self, error: Exception) -> None:
        """The per-chunk transform raised: remember why and close both sides now (fail closed)."""
        if self.failure is None:
            self.failure = error
        self.abort()

    def poll_idle(self) -> int:
        """How many polls in a row saw no byte move (the idle sweeper calls this)."""
        if self.client.active or self.upstream.active:
            self.idle_polls = 0
        else:
            self.idle_polls += 1
        self.client.active = self.upstream.active = False
        return self.idle_polls


class FilteringTunnel(Tunnel):
    """A tunnel whose chunks pass through plugin hooks or limiters (see :func:`half_class`)."""

    __slots__ = ("limiters", "transform")

    def __init__(
        self, on_close: Callable[[Tunnel], None], transform: Transform | None, limiters: Sequence[Limiter]
    ) -> None:
        self.transform = transform
        self.limiters = tuple(limiters)
        super().__init__(on_close, half_class(transform, limiters))


def new_tunnel(
    on_close: Callable[[Tunnel], None], transform: Transform | None = None, limiters: Sequence[Limiter] = ()
) -> Tunnel:
    """A tunnel with the cheapest halves for ``transform`` and ``limiters``: a plain one when neither."""
    if transform is None and not limiters:
        return Tunnel(on_close)
    return FilteringTunnel(on_close, transform, limiters)
