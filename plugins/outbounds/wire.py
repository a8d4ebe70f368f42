"""Running the sans-I/O handshakes of :mod:`socksflow.clients` over a socket or a stream.

Over a plain socket the handshake reads exactly what the proxy's answer holds, so the socket is
handed to the relay afterwards with nothing lost.  Over TLS or SSH there is no socket to hand
on: :func:`bridge` gives the relay one end of a socket pair and pumps the other to the stream.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Protocol

from socksflow import Address, OutboundError, Reply, clients

CHUNK = 256 * 1024


class Channel(Protocol):
    async def send(self, data: bytes) -> None: ...
    async def receive(self, size: int) -> bytes: ...
    async def receive_head(self, limit: int) -> bytes: ...


class SocketChannel:
    """A connected non-blocking socket; the head of an HTTP answer is found by peeking."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def receive(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = await self.loop.sock_recv(self.sock, size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return bytes(data)

    async def receive_head(self, limit: int) -> bytes:
        while True:
            await self._readable()
            try:
                peeked = self.sock.recv(limit, socket.MSG_PEEK)
            except BlockingIOError:
                continue
            if not peeked:
                raise EOFError
            end = peeked.find(b"\r\n\r\n")
            if end >= 0:
                return await self.receive(end + 4)
            if len(peeked) >= limit:
                raise OutboundError(
                    "upstream answer head too long", Reply.GENERAL_FAILURE, upstream_down=True
                )
            await asyncio.sleep(0.005)  # the rest of the head is on its way: peeking again at once would spin

    async def _readable(self) -> None:
        ready = self.loop.create_future()
        self.loop.add_reader(self.sock.fileno(), lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            self.loop.remove_reader(self.sock.fileno())


class StreamChannel:
    """An asyncio (or asyncssh) stream pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def receive(self, size: int) -> bytes:
        try:
            return await self.reader.readexactly(size)
        except asyncio.IncompleteReadError:
            raise EOFError from None

    async def receive_head(self, limit: int) -> bytes:
        try:
            return await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            raise EOFError from None
        except asyncio.LimitOverrunError:
            raise OutboundError(
                "upstream answer head too long", Reply.GENERAL_FAILURE, upstream_down=True
            ) from None


async def run(handshake: clients.Handshake, channel: Channel, name: str) -> Address:
    """Drive ``handshake`` over ``channel``; the bound address the proxy reported."""
    try:
        step = next(handshake)
        while True:
            if isinstance(step, clients.Send):
                await channel.send(step.data)
                answer = b""
            elif isinstance(step, clients.Receive):
                answer = await channel.receive(step.size)
            else:
                answer = await channel.receive_head(step.limit)
            step = handshake.send(answer)
    except StopIteration as done:
        return done.value
    except EOFError:
        raise OutboundError(
            f"outbound {name!r}: upstream closed the connection during the handshake",
            Reply.GENERAL_FAILURE,
            upstream_down=True,
        ) from None
    except OutboundError as exc:
        raise OutboundError(f"outbound {name!r}: {exc}", exc.reply, upstream_down=exc.upstream_down) from None
    except OSError as exc:
        raise OutboundError(f"outbound {name!r}: {exc}", Reply.GENERAL_FAILURE, upstream_down=True) from exc


_pumps: set[asyncio.Task[None]] = set()


async def bridge(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ended: Callable[[], None] | None = None
) -> socket.socket:
    """A socket whose peer end is pumped both ways to the stream, for the relay to take over;
    ``ended`` is called once both directions are done."""
    ours, theirs = await _tcp_pair()
    pair_reader, pair_writer = await asyncio.open_connection(sock=ours)
    pumps = [
        asyncio.ensure_future(_pump(source, sink))
        for source, sink in ((reader, pair_writer), (pair_reader, writer))
    ]
    for task in pumps:
        _pumps.add(task)
        task.add_done_callback(_pumps.discard)
    done = asyncio.gather(*pumps)
    done.add_done_callback(lambda _: (writer.close(), pair_writer.close(), ended and ended()))
    return theirs


async def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected loopback TCP sockets: the relay reads the peer address of what it gets, which
    a Unix socket pair has not."""
    loop = asyncio.get_running_loop()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        theirs = socket.socket()
        theirs.setblocking(False)
        try:
            accepted = loop.sock_accept(listener)
            await loop.sock_connect(theirs, listener.getsockname())
            ours, _ = await accepted
        except BaseException:
            theirs.close()
            raise
    ours.setblocking(False)
    for sock in (ours, theirs):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ours, theirs


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(CHUNK):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()  # half-close: the other direction may still be moving
            return
    except Exception:
        pass
    sink.close()
