"""``socksflow run --workers N``: N processes sharing the listening ports with SO_REUSEPORT.

The parent validates the configuration and loads the plugins once, reserves each listening
port (so ``:0`` means the same port for every worker), forks the workers, prints the ready
line (:func:`ready_line`) when all of them listen, passes SIGTERM/SIGINT/SIGHUP/SIGUSR1 on, and restarts a worker that
dies unexpectedly.  The workers share a :class:`~socksflow.sharedstate.SharedTable` made before
the fork, so the limits hold for the server as a whole; what a dead worker held is given back.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from socksflow import sockets
from socksflow.config import Config
from socksflow.protocol import Address
from socksflow.sharedstate import SharedTable

log = logging.getLogger("socksflow.workers")

RESTART_BACKOFF_SECONDS = 1.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
FORWARDED_SIGNALS = (*STOP_SIGNALS, signal.SIGUSR1)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
READY_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Group:
    """What the workers of one server share: a name for their private sockets, their count, and
    the table of limit state (made before the fork, so it is the same memory in every worker)."""

    name: str
    workers: int
    table: SharedTable


def ready_line(addresses: Iterable[Address], loop: str, workers: int) -> str:
    """The line ``socksflow run`` prints on standard output once every listener accepts.

    ``socksflow: listening on 127.0.0.1:1080, [::1]:1080 (uvloop, 2 workers)``, or ``(asyncio,
    1 worker)`` for one process.  The first address comes right after "listening on " and ends at
    a comma or a space, so a script reading the port (``listening on (\\S+):(\\d+)``, with no
    ``$``) needs nothing after it; :func:`socksflow.testing.parse_ready_line` reads all of it.
    """
    where = ", ".join(str(address) for address in addresses)
    return f"socksflow: listening on {where} ({loop}, {workers} worker{'' if workers == 1 else 's'})"


def reserve_ports(config: Config) -> list[socket.socket]:
    """Bind (without listening) each address with SO_REUSEPORT and fix ``:0`` to the port got."""
    reserved = []
    addresses = []
    for address in config.listen:
        sock = socket.socket(sockets.family(address), socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((str(address.host), address.port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen on {address}: {os.strerror(exc.errno or 0)}") from None
        reserved.append(sock)
        addresses.append(Address(address.host, sock.getsockname()[1]))
    if config.listen_override is not None:  # what a reload keeps: the ports the workers really use
        config.override_listen(tuple(addresses), config.listen_protocols, config.listen_proxy)
    else:
        config.listen = tuple(addresses)
    return reserved


def supervise(config: Config, count: int, serve: Callable[[int, int, Group], int], loop: str) -> int:
    """Run ``serve(number, ready_fd, group)`` in ``count`` forked workers until a stop signal; the exit code.

    ``loop`` names the workers' event loop in the ready line.
    """
    reserved = reserve_ports(config)
    group = Group(f"{os.getpid()}-{secrets.token_hex(4)}", count, SharedTable(count))
    workers: dict[int, int] = {}  # pid -> worker number
    stopping: list[int] = []
    signals = _SignalPipe()

    def spawn(number: int, ready_fd: int | None) -> None:
        # Signals are held across the fork: the child must never run the supervisor's handler,
        # and the supervisor must know the child's pid before it forwards a signal to it.
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
        pid = os.fork()
        if pid == 0:
            signals.leave_in_child()
            # Stop signals stay held until the worker's loop has its handlers (cli._serve
            # unblocks them): one that arrives while a worker starts stops it gracefully.
            for signum in STOP_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGUSR1,))
            _die_with_parent()
            for sock in reserved:
                sock.close()
            code = 1
            try:
                code = serve(number, ready_fd if ready_fd is not None else -1, group)
            finally:
                os._exit(code)
        workers[pid] = number
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)

    def forward(signum: int, _frame: object) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping.append(signum)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    read_fd, write_fd = os.pipe()
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    for number in range(count):
        spawn(number, write_fd)
    os.close(write_fd)
    if not _await_ready(read_fd, count):
        forward(signal.SIGTERM, None)
        _reap_all(workers)
        print("socksflow: the workers did not start (see the log above)", file=sys.stderr)
        return 1
    print(ready_line(config.listen, loop, count), flush=True)
    log.info("%d workers running (pids %s)", count, " ".join(map(str, workers)))
    exit_code = 0
    with signals:
        while workers:
            exited = _exited()  # before the first wait too: a worker may have exited already
            if exited is None:  # no child left at all
                break
            if not exited:
                signals.wait()  # a signal, forwarded by the time this returns, or a worker's exit
                continue
            for pid, status in exited:
                number = workers.pop(pid, None)
                if number is None:
                    continue
                code = os.waitstatus_to_exitcode(status)
                released = group.table.release_worker(number)
                if released:
                    log.info("worker %d held %d sessions in shared limits: released", number, released)
                if stopping:
                    exit_code = exit_code or code
                    continue
                log.error("worker %d (pid %d) exited with %d: restarting it", number, pid, code)
                time.sleep(RESTART_BACKOFF_SECONDS)
                if not stopping:  # a stop signal during the back-off was not sent to this worker yet
                    spawn(number, None)
    for sock in reserved:
        sock.close()
    return exit_code


class _SignalPipe:
    """Wake the supervisor for every signal, SIGCHLD included, without losing one.

    A Python signal handler runs between bytecodes of the main thread.  A signal that lands after
    the last such check but before a blocking call (``os.wait()``) is entered left its handler
    waiting until the call returned — until a worker exited: a SIGHUP or SIGTERM sent right
    after the ready line was then not passed on.  Here every signal also writes a byte to a pipe
    (``signal.set_wakeup_fd``) that :meth:`wait` selects on, so the wait returns, the handlers
    run, and only then is anything waited on again.
    """

    read_fd: int | None = None
    write_fd: int | None = None

    def __enter__(self) -> _SignalPipe:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self._previous_wakeup = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        self._previous_sigchld = signal.signal(signal.SIGCHLD, _wake)  # a handler: exits write a byte too
        return self

    def wait(self) -> None:
        """Until a signal arrives (or arrived since the last call); its handler has run on return."""
        assert self.read_fd is not None, "wait() outside the with block"
        select.select([self.read_fd], [], [])
        with contextlib.suppress(BlockingIOError):
            while os.read(self.read_fd, 512):
                pass

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGCHLD, self._previous_sigchld)
        signal.set_wakeup_fd(self._previous_wakeup)
        self._close()

    def leave_in_child(self) -> None:
        """In a worker just forked: none of this (its event loop sets its own wakeup fd)."""
        if self.read_fd is not None:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            self._close()

    def _close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            if fd is not None:
                os.close(fd)
        self.read_fd = self.write_fd = None


def _wake(_signum: int, _frame: object) -> None:
    """SIGCHLD's handler: the byte it writes to the wakeup pipe is the point."""


def _exited() -> list[tuple[int, int]] | None:
    """``(pid, wait status)`` of each child that has exited, without blocking; None if none is left."""
    found: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return found or None
        if pid == 0:
            return found
        found.append((pid, status))


def _die_with_parent() -> None:
    """Ask Linux to send this worker SIGTERM if the supervisor dies, so none is orphaned."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _await_ready(read_fd: int, count: int) -> bool:
    """True once every worker wrote its ready byte; False if one died first."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    ready = 0
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while ready < count and time.monotonic() < deadline:
            data = pipe.read(count - ready)
            if not data:  # every write end closed: a worker exited before it was ready
                return False
            ready += len(data)
    return ready == count


def _reap_all(workers: dict[int, int]) -> None:
    for pid in list(workers):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        workers.pop(pid, None)
