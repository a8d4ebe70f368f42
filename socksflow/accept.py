"""Listening sockets, and an accept loop that stays calm when file descriptors run out.

asyncio's selector event loop retries ``accept()`` up to ``backlog`` times per wake-up after
EMFILE and logs a traceback for every try (tens of thousands of lines a second, a quarter of a
core) while new clients hang in the kernel's queue.  On selector loops socksflow accepts
itself: out of descriptors, it closes the descriptor it keeps spare, accepts each waiting client
and closes it at once (libuv's trick, which uvloop already uses), so clients are refused
cleanly and the loop only wakes when a client arrives.  Other event loops (uvloop) keep their
own accept loop, which drains the queue faster than Python can, but says nothing when it
refuses clients: there, :meth:`SpareDescriptor.watch` looks once a second.  Either way one log
line per episode says so, and :class:`SpareDescriptor` counts the episodes for the metrics.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable

from socksflow import sockets
from socksflow.protocol import Address

log = logging.getLogger("socksflow.server")

BACKLOG = 1024  # where /proc/sys/net/core/somaxconn cannot be read
SOMAXCONN = "/proc/sys/net/core/somaxconn"
ACCEPT_BATCH = 128  # connections accepted per wake-up, so one busy listener cannot starve the loop
RETRY_SECONDS = 0.5  # out of descriptors with no spare one to free: look again after this long
WATCH_SECONDS = 1.0  # on loops that accept on their own: how often to look for an episode
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def backlog() -> int:
    """The longest listen queue the kernel allows (``somaxconn``): a burst of connections (a
    handshake flood reconnecting) must not overflow it, or the kernel drops SYNs, good clients'
    among them, and each dropped SYN costs its client a second."""
    try:
        with open(SOMAXCONN, encoding="ascii") as file:
            return max(BACKLOG, int(file.read()))
    except (OSError, ValueError):
        return BACKLOG


def listening_socket(address: Address, reuse_port: bool) -> socket.socket:
    """A non-blocking TCP socket listening on ``address`` (IPv6 sockets take IPv6 only)."""
    sock = socket.create_server(
        (str(address.host), address.port),
        family=sockets.family(address),
        backlog=backlog(),
        reuse_port=reuse_port,
    )
    sock.setblocking(False)
    return sock


class SpareDescriptor:
    """One descriptor held in reserve, to be freed for a moment when the process runs out.

    Shared by a server's listeners, it also keeps the account of running out: ``episodes``
    (times the process ran out, each logged once) and ``refused`` (clients closed unserved;
    counted by :class:`Acceptor` only, uvloop drops them unseen).
    """

    def __init__(self) -> None:
        self.fd: int | None = None
        self.exhausted = False
        self.episodes = 0
        self.refused = 0
        self._watch: asyncio.TimerHandle | None = None
        self.reserve()

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Look every second whether the process ran out (for loops that accept on their own)."""
        try:
            probe = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in _OUT_OF_RESOURCES:
                self.ran_out(exc)
        else:
            os.close(probe)
            if self.exhausted:
                self.available()
        self._watch = loop.call_later(RETRY_SECONDS if self.exhausted else WATCH_SECONDS, self.watch, loop)

    def ran_out(self, error: OSError) -> None:
        """Out of descriptors: log it when an episode begins."""
        if not self.exhausted:
            self.exhausted = True
            self.episodes += 1
            log.error(
                "cannot accept new clients: %s (raise the limit: ulimit -n); refusing them until "
                "descriptors are free", error.strerror or error,
            )  # fmt: skip

    def available(self) -> None:
        """A client was accepted: the episode, if any, is over."""
        if self.exhausted:
            self.exhausted = False
            log.warning("file descriptors are available again: accepting new clients")

    def reserve(self) -> None:
        if self.fd is None:
            try:
                self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self.fd = None

    def close(self) -> None:
        """Stop watching, and close the spare descriptor."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self.release()

    def release(self) -> bool:
        """Close the spare descriptor; False if there was none."""
        if self.fd is None:
            return False
        os.close(self.fd)
        self.fd = None
        return True


class Acceptor:
    """Accepts on one listening socket of a selector event loop; the interface socksflow uses of
    :class:`asyncio.Server` (``sockets``, ``close()``)."""

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        spare: SpareDescriptor,
    ) -> None:
        self.sock = sock
        self.sockets = (sock,)
        self._factory = protocol_factory
        self._spare = spare
        self._loop = asyncio.get_running_loop()
        self._starting: set[asyncio.Task[None]] = set()
        self._closed = False
        self._loop.add_reader(sock.fileno(), self._accept)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._refuse_waiting(exc)
                else:
                    log.error("accept() on %s failed: %s", self.sock.getsockname(), exc.strerror or exc)
                return
            if self._spare.exhausted:
                self._spare.available()
            conn.setblocking(False)
            task = self._loop.create_task(self._start(conn))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _start(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError:  # the client reset the connection before its transport was made
            conn.close()

    def _refuse_waiting(self, error: OSError) -> None:
        self._spare.ran_out(error)
        if not self._spare.release():  # nothing to free: stop looking at the socket for a while
            self._loop.remove_reader(self.sock.fileno())
            self._loop.call_later(RETRY_SECONDS, self._resume)
            return
        try:
            for _ in range(ACCEPT_BATCH):
                conn, _ = self.sock.accept()
                conn.close()  # the client sees the connection closed, not a silent queue
                self._spare.refused += 1
        except OSError:
            pass
        finally:
            self._spare.reserve()

    def _resume(self) -> None:
        if not self._closed:
            self._loop.add_reader(self.sock.fileno(), self._accept)
