"""One forwarded HTTP exchange over the network: the I/O around :class:`~socksflow.httpforward.Forwarder`.

The HTTP door decides each absolute-form request as a session of its own (rules, limits, logs);
once its destination is dialled, :func:`exchange` moves the re-framed request and response
between the client's connection and the destination's until the response ends.  The client's
connection then waits for its next request (``ClientProtocol.serve_next``), which becomes the
next session.  The destination's connection is closed after each exchange.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from socksflow.httpforward import Closed, ExchangeDone, Forwarder, ToClient, ToUpstream
from socksflow.httpproxy import HttpError, ProxyRequest
from socksflow.protocol import NEED_DATA, ProtocolError
from socksflow.relay import Direction, Limiter, Pending, Transform

if TYPE_CHECKING:
    from socksflow.runner import ClientProtocol

MAX_UNREAD = 64 * 1024  # client bytes h11 holds unprocessed before reading from the client pauses


class Counts:
    """The bytes one exchange moved, for the session's ``bytes_up`` / ``bytes_down``."""

    __slots__ = ("bytes_down", "bytes_up")

    def __init__(self) -> None:
        self.bytes_up = 0
        self.bytes_down = 0


class Upstream(asyncio.Protocol):
    """The destination's side: collects what it sends and wakes the exchange."""

    __slots__ = ("chunks", "closed", "paused", "wake", "write_paused")

    def __init__(self, pending: Pending, wake: Callable[[], None]) -> None:
        self.chunks = pending.chunks
        self.closed = pending.eof or pending.lost  # a destination that closed before the exchange
        self.wake = wake
        self.write_paused = False

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.wake()

    def eof_received(self) -> bool:
        self.closed = True
        self.wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.wake()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.wake()


async def exchange(
    client: ClientProtocol,
    forwarder: Forwarder,
    request: ProxyRequest,
    pending: Pending,
    counts: Counts,
    limiters: Sequence[Limiter],
    idle: float,
    transform: Transform | None = None,
) -> None:
    """Forward ``request`` over ``pending``'s connection and its response back, re-framed by h11.

    Returns when the response has ended (or the exchange failed: the client then got a 502 if
    its response had not begun).  The destination's connection is closed on return.
    ``transform`` (the ``socksflow_relay_data`` chain) sees the messages as they are sent on;
    what it raises ends the exchange by propagating.
    """
    transport = pending.transport
    upstream = Upstream(pending, client.wake)
    transport.set_protocol(upstream)
    transport.resume_reading()
    forwarder.forward(request)
    told_closed = False
    try:
        while True:
            if upstream.chunks:
                data = b"".join(upstream.chunks)
                upstream.chunks.clear()
                forwarder.receive_upstream(data)
            if upstream.closed and not told_closed:
                told_closed = True  # a response without a length ends at the destination's EOF
                forwarder.receive_upstream(b"")
            try:
                event = forwarder.next_event()
            except HttpError as exc:
                client.write(exc.response)
                return
            except ProtocolError:
                client.write(forwarder.fail())
                return
            if isinstance(event, ToUpstream):
                data = event.data if transform is None else transform(Direction.UP, event.data)
                transport.write(data)
                counts.bytes_up += len(event.data)
                await _limit(limiters, Direction.UP, len(event.data), client, transport)
            elif isinstance(event, ToClient):
                data = event.data if transform is None else transform(Direction.DOWN, event.data)
                client.write(data)
                counts.bytes_down += len(event.data)
                await _limit(limiters, Direction.DOWN, len(event.data), client, transport)
            elif isinstance(event, ExchangeDone | Closed):
                return
            else:
                assert event is NEED_DATA
                if client.closed:
                    return
                # Flow control: a side whose peer cannot take more is not read.
                _reading(transport, not client.write_paused)
                client.reading(not upstream.write_paused and forwarder.buffered <= MAX_UNREAD)
                try:
                    async with asyncio.timeout(idle or None):
                        await client.wait_input()
                except TimeoutError:
                    client.write(forwarder.fail(504, "socksflow: the destination did not answer in time\n"))
                    return
    finally:
        transport.close()
        client.reading(True)


def _reading(transport: asyncio.Transport, on: bool) -> None:
    if transport.is_closing() or transport.is_reading() == on:
        return
    if on:
        transport.resume_reading()
    else:
        transport.pause_reading()


async def _limit(
    limiters: Sequence[Limiter],
    direction: Direction,
    nbytes: int,
    client: ClientProtocol,
    upstream: asyncio.Transport,
) -> None:
    """Charge the limiters; while they ask for a pause, neither side is read."""
    wait = max((limiter.delay(direction, nbytes) for limiter in limiters), default=0.0)
    if wait > 0:
        _reading(upstream, False)
        client.reading(False)
        await asyncio.sleep(wait)
