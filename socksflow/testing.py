"""Testing helpers for plugin authors (and socksflow's own tests): a pytest plugin.

Installed with socksflow (entry point ``pytest11``), so its fixtures need no import:

* ``socksflow_server`` — a factory: ``socksflow_server(config="...", plugins=[obj])`` starts a
  real server on ``127.0.0.1:0`` in a background thread and returns a :class:`RunningServer`
  (``.address``, ``.host``, ``.port``); every server is stopped after the test and must have
  left no session or task behind.  Use it from plain (blocking) tests.
* ``socksflow_async_server`` — the same server on the caller's event loop:
  ``async with socksflow_async_server(config="...", plugins=[obj]) as server:`` (an
  :class:`AsyncServer`), for tests that run their own loop (``asyncio.run``).  Leaving the
  block stops the server and fails if a task or session is left behind.

Both load the installed plugins (entry points) unless given ``autoload=False``, and write the
configuration to ``rules.yaml`` in the test's ``tmp_path``, so relative paths in it resolve there.

For ``socksflow run`` started as a subprocess: :func:`loop_args` gives the ``--loop`` option that
follows ``SOCKSFLOW_TEST_LOOP`` (asyncio unless it says uvloop, so a suite runs on both loops),
and :func:`parse_ready_line` reads the line the command prints once it serves.

Clients that expose every reply code: :class:`Socks5Client` (blocking) and
:class:`AsyncSocks5Client` speak SOCKS5 byte by byte for CONNECT, UDP ASSOCIATE and BIND;
:func:`socks5_handshake` greets and connects in one call; :func:`wrap_datagram` and
:func:`unwrap_datagram` add and remove the UDP relay header.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from socksflow import app, protocol
from socksflow.config import Config
from socksflow.errors import ResolveError
from socksflow.plugins import PluginManager, hookimpl
from socksflow.protocol import Address, Command, IPAddress, Method, Reply
from socksflow.server import Server

__all__ = [
    "AsyncServer",
    "AsyncSocks5Client",
    "ReadyLine",
    "RunningServer",
    "SessionRecorder",
    "Socks5Client",
    "StaticResolver",
    "loop_args",
    "loop_under_test",
    "parse_ready_line",
    "sockaddr",
    "socks5_handshake",
    "unwrap_datagram",
    "wait_until",
    "wrap_datagram",
]

T = TypeVar("T")
NO_ADDRESS = "0.0.0.0:0"
SETTLE_SECONDS = 1.0  # how long a stopped server's closing transports and sessions may take


# ---------------------------------------------------------------------------- servers


def _configured(
    config: str, plugins: Sequence[object], directory: Path | None, autoload: bool
) -> tuple[Config, PluginManager]:
    """Load ``config`` (listening on 127.0.0.1:0 unless it says otherwise) and configure the plugins."""
    text = config if "listen" in config else "listen: [127.0.0.1:0]\n" + config
    if directory is not None:
        path = directory / "rules.yaml"
        path.write_text(text, encoding="utf-8")
        loaded = Config.from_file(path)
    else:
        loaded = Config.from_text(text, "<test config>")
    loaded.raise_errors()
    loaded.plugins.autoload = autoload and loaded.plugins.autoload
    pm = app.build_plugin_manager(loaded)
    for plugin in plugins:
        if not pm.is_registered(plugin):  # e.g. a package's module, already loaded from its entry point
            pm.register(plugin)
    app.configure(pm, loaded)
    return loaded, pm


async def _stop_and_settle(server: Server, ignore: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """Stop ``server``; return the tasks still running once it had time to settle (not ``ignore``)."""
    await server.stop(timeout=2.0)
    current = asyncio.current_task()
    leftover: list[asyncio.Task[Any]] = []
    for _ in range(int(SETTLE_SECONDS / 0.02)):
        leftover = [t for t in asyncio.all_tasks() if t is not current and t not in ignore and not t.done()]
        if not leftover and not server.sessions:
            break
        await asyncio.sleep(0.02)
    return leftover


class _Addressed:
    """``address``, ``host`` and ``port`` of the first listener."""

    server: Server | None

    @property
    def address(self) -> Address:
        assert self.server is not None, "the server is not started"
        return self.server.addresses[0]

    @property
    def host(self) -> str:
        return str(self.address.host)

    @property
    def port(self) -> int:
        return self.address.port


class RunningServer(_Addressed):
    """A socksflow server running its own event loop in a daemon thread."""

    def __init__(
        self,
        config: str = "",
        plugins: Sequence[object] = (),
        *,
        directory: Path | None = None,
        autoload: bool = True,
        loop_factory: Any = None,
    ) -> None:
        self.config, self.pm = _configured(config, plugins, directory, autoload)
        self._loop_factory = loop_factory or default_loop_factory()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.leftover_tasks: list[asyncio.Task[Any]] = []

    def start(self) -> RunningServer:
        self._thread = threading.Thread(target=self._main, name="socksflow-test-server", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self.loop is None or self._thread is None:
            return
        if self._stopped is not None:
            self.loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout + 5)
        self.loop = None

    def call(self, function: Any, *args: Any) -> Any:
        """Run ``function(*args)`` (or await it, if it returns a coroutine) on the server's loop."""
        assert self.loop is not None

        async def invoke() -> Any:
            result = function(*args)
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(invoke(), self.loop).result(30)

    def __enter__(self) -> RunningServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        loop = self._loop_factory()
        self.loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to the test thread
            self._error = exc
        finally:
            self._ready.set()
            loop.close()

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        self.server = Server(self.config, self.pm)
        await self.server.start()
        self._ready.set()
        await self._stopped.wait()
        self.leftover_tasks = await _stop_and_settle(self.server, set())


class AsyncServer(_Addressed):
    """A socksflow server on the running event loop: ``async with AsyncServer(config) as server:``.

    Leaving the block stops the server; when the block itself raised nothing, a task started
    inside it (by the server or the test) that is still running, or a session still open,
    fails with :class:`AssertionError`.
    """

    def __init__(
        self,
        config: str = "",
        plugins: Sequence[object] = (),
        *,
        directory: Path | None = None,
        autoload: bool = True,
    ) -> None:
        self.config, self.pm = _configured(config, plugins, directory, autoload)
        self.server: Server | None = None
        self._before: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> AsyncServer:
        self._before = asyncio.all_tasks()
        self.server = Server(self.config, self.pm)
        await self.server.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        assert self.server is not None
        leftover = await _stop_and_settle(self.server, self._before)
        if exc_type is None:
            assert not leftover, f"tasks left running: {leftover}"
            assert not self.server.sessions, f"sessions left open: {self.server.sessions}"


def default_loop_factory() -> Any:
    """asyncio's loop, or uvloop's when ``SOCKSFLOW_TEST_LOOP=uvloop`` (to run a suite on both)."""
    if loop_under_test() == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def loop_under_test() -> str:
    """The event loop the tests run servers on: ``uvloop`` when ``SOCKSFLOW_TEST_LOOP=uvloop``, else ``asyncio``."""
    return "uvloop" if os.environ.get("SOCKSFLOW_TEST_LOOP") == "uvloop" else "asyncio"


def loop_args() -> list[str]:
    """``--loop`` for a ``socksflow run`` a test starts: the loop of :func:`loop_under_test`.

    The command's own default (``auto``: uvloop, a dependency wherever it builds) would leave
    asyncio untested; a ``--loop`` given after these arguments wins.
    """
    return ["--loop", loop_under_test()]


# "socksflow: listening on 127.0.0.1:1080, [::1]:1080 (uvloop, 2 workers)" (socksflow.workers.ready_line)
READY_LINE = re.compile(
    r"^socksflow: listening on (?P<addresses>\S.*) \((?P<loop>\w+), (?P<workers>\d+) workers?\)$"
)


@dataclass(frozen=True, slots=True)
class ReadyLine:
    """What ``socksflow run`` says once it serves: its listeners, its event loop, its processes."""

    addresses: tuple[Address, ...]
    loop: str
    workers: int

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` of the first listener, for the socket module."""
        return sockaddr(self.addresses[0])


def parse_ready_line(line: str) -> ReadyLine | None:
    """The ready line of ``socksflow run`` (its first line on standard output), or None if ``line`` is not one."""
    match = READY_LINE.match(line.strip())
    if match is None:
        return None
    try:
        addresses = tuple(Address.parse(text) for text in match["addresses"].split(", "))
    except ValueError:
        return None
    return ReadyLine(addresses, match["loop"], int(match["workers"]))


@pytest.fixture
def socksflow_server(tmp_path: Path) -> Iterator[Any]:
    """Factory fixture: ``socksflow_server(config="...", plugins=[...])`` → a started RunningServer."""
    servers: list[RunningServer] = []

    def start(config: str = "", plugins: Sequence[object] = (), **kwargs: Any) -> RunningServer:
        kwargs.setdefault("directory", tmp_path)
        server = RunningServer(config, plugins, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
    for server in servers:
        assert not server.leftover_tasks, f"tasks left running: {server.leftover_tasks}"
        assert server.server is not None and not server.server.sessions, "sessions left open"


@pytest.fixture
def socksflow_async_server(tmp_path: Path) -> Any:
    """Factory fixture: ``async with socksflow_async_server(config="...", plugins=[...]) as server:``."""
    return functools.partial(AsyncServer, directory=tmp_path)


# ---------------------------------------------------------------------------- names


class StaticResolver:
    """A ``socksflow_resolve`` plugin with fixed answers, so tests never ask the system resolver.

    ``table`` maps names to address strings; every name asked for is recorded in ``lookups``.
    A name not in the table raises NXDOMAIN (the client gets REP 0x04), or with
    ``pass_unknown=True`` is left to the next resolver (``localhost`` through /etc/hosts).
    """

    def __init__(self, table: dict[str, list[str]], *, pass_unknown: bool = False) -> None:
        self.table = table
        self.pass_unknown = pass_unknown
        self.lookups: list[str] = []

    @hookimpl
    def socksflow_resolve(self, host: str) -> list[IPAddress] | None:
        if host not in self.table and self.pass_unknown:
            return None
        self.lookups.append(host)
        if host not in self.table:
            raise ResolveError(f"{host}: NXDOMAIN")
        return [ipaddress.ip_address(address) for address in self.table[host]]


# ---------------------------------------------------------------------------- waiting on state


def wait_until(condition: Callable[[], object], timeout: float = 5.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes; whether it held.

    Wait for the state a test depends on, never for a guessed time.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return bool(condition())


class SessionRecorder:
    """A plugin that records every session as it ends (``socksflow_session_end``).

    ``sessions`` holds the session objects; ``outcomes`` their ``(reply, close_reason)``
    as the access log sees them.
    """

    def __init__(self) -> None:
        self.sessions: list[Any] = []
        self.outcomes: list[tuple[Reply | None, str]] = []

    @hookimpl
    def socksflow_session_end(self, session: Any) -> None:
        self.sessions.append(session)
        self.outcomes.append((session.reply, session.close_reason))

    def wait(self, count: int = 1, timeout: float = 10.0) -> list[tuple[Reply | None, str]]:
        """The outcomes, once ``count`` sessions have ended (or ``timeout`` passed)."""
        wait_until(lambda: len(self.outcomes) >= count, timeout)
        return self.outcomes


# ---------------------------------------------------------------------------- the exchanges
#
# Each exchange is written once, as a generator that yields ``bytes`` to send and an ``int``
# to receive exactly that many bytes (sent back in); the blocking and the asyncio client
# each drive it over their own connection.

Exchange = Generator[bytes | int, bytes, T]


def _greet(methods: Sequence[int]) -> Exchange[int]:
    yield protocol.build_greeting(list(methods))
    answer = yield 2
    assert answer[0] == 5, f"not a SOCKS5 method selection: {answer!r}"
    return answer[1]


def _login(username: bytes | str, password: bytes | str) -> Exchange[int]:
    user = username.encode() if isinstance(username, str) else username
    secret = password.encode() if isinstance(password, str) else password
    yield protocol.build_userpass(user, secret)
    answer = yield 2
    assert answer[0] == 1, f"not an RFC 1929 status: {answer!r}"
    return answer[1]


def _read_reply() -> Exchange[tuple[int, Address]]:
    head = yield 5  # the shortest reply (an empty domain name) has 7 bytes
    sizes = {protocol.AddressType.IPV4: 10, protocol.AddressType.IPV6: 22}
    size = sizes.get(head[3], 7 + head[4])
    data = head + (yield size - 5)
    parsed = protocol.parse_reply(data)
    assert parsed is not None, f"not a SOCKS5 reply: {data!r}"
    code, bound, _ = parsed
    return int(code), bound


def _request(command: Command, destination: Address | str) -> Exchange[tuple[int, Address]]:
    if isinstance(destination, str):
        destination = Address.parse(destination)
    yield protocol.build_request(command, destination)
    return (yield from _read_reply())


class Socks5Client:
    """A blocking SOCKS5 client that exposes every reply, for tests.

    ``sock`` is the connected socket: after a successful CONNECT (or BIND's second reply),
    send and receive the relayed bytes on it.
    """

    def __init__(self, proxy: Address | tuple[str, int], timeout: float = 10.0) -> None:
        if isinstance(proxy, Address):
            proxy = sockaddr(proxy)
        self.sock = socket.create_connection(proxy, timeout=timeout)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Socks5Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recv_exactly(self, n: int) -> bytes:
        """``n`` bytes; :class:`ConnectionError` if the server closes first."""
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {n} bytes: {data!r}")
            data += chunk
        return data

    def _run(self, exchange: Exchange[T]) -> T:
        step = next(exchange)
        while True:
            if isinstance(step, bytes):
                self.sock.sendall(step)
                received = b""
            else:
                received = self.recv_exactly(step)
            try:
                step = exchange.send(received)
            except StopIteration as done:
                return done.value

    def greet(self, methods: Sequence[int] = (Method.NO_AUTH,)) -> int:
        """Send the greeting; return the method the server chose (0xFF: none acceptable)."""
        return self._run(_greet(methods))

    def login(self, username: bytes | str, password: bytes | str) -> int:
        """RFC 1929: return the status byte (0 = success)."""
        return self._run(_login(username, password))

    def request(self, command: Command, destination: Address | str) -> tuple[int, Address]:
        """Send a request; return (reply code, BND address)."""
        return self._run(_request(command, destination))

    def read_reply(self) -> tuple[int, Address]:
        """Read one reply: (reply code, address)."""
        return self._run(_read_reply())

    def connect(self, destination: Address | str) -> tuple[int, Address]:
        """CONNECT: (reply code, the proxy's outbound address)."""
        return self.request(Command.CONNECT, destination)

    def udp_associate(self, source: Address | str = NO_ADDRESS) -> tuple[int, Address]:
        """UDP ASSOCIATE from ``source`` (default: not known yet): (reply code, relay address).

        Send datagrams made with :func:`wrap_datagram` to ``sockaddr(relay)`` while this
        connection stays open; closing it ends the association.
        """
        return self.request(Command.UDP_ASSOCIATE, source)

    def bind(self, peer: Address | str = NO_ADDRESS) -> tuple[int, Address]:
        """BIND for ``peer`` (default: any): the first reply, (reply code, listening address)."""
        return self.request(Command.BIND, peer)

    def second_reply(self) -> tuple[int, Address]:
        """BIND's second reply, when a peer connected or the wait ended: (reply code, peer address)."""
        return self.read_reply()


class AsyncSocks5Client:
    """The asyncio counterpart of :class:`Socks5Client`: ``client = await AsyncSocks5Client.open(proxy)``.

    Every method of :class:`Socks5Client` is here as a coroutine with the same answer;
    ``reader`` and ``writer`` carry the relayed bytes after a successful reply.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout

    @classmethod
    async def open(cls, proxy: Address | tuple[str, int], timeout: float = 10.0) -> AsyncSocks5Client:
        host, port = sockaddr(proxy) if isinstance(proxy, Address) else proxy
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, timeout)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()

    async def __aenter__(self) -> AsyncSocks5Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def recv_exactly(self, n: int) -> bytes:
        try:
            async with asyncio.timeout(self.timeout):
                return await self.reader.readexactly(n)
        except asyncio.IncompleteReadError as exc:
            raise ConnectionError(f"closed after {len(exc.partial)} of {n} bytes: {exc.partial!r}") from None

    async def _run(self, exchange: Exchange[T]) -> T:
        step = next(exchange)
        while True:
            if isinstance(step, bytes):
                self.writer.write(step)
                await self.writer.drain()
                received = b""
            else:
                received = await self.recv_exactly(step)
            try:
                step = exchange.send(received)
            except StopIteration as done:
                return done.value

    async def greet(self, methods: Sequence[int] = (Method.NO_AUTH,)) -> int:
        return await self._run(_greet(methods))

    async def login(self, username: bytes | str, password: bytes | str) -> int:
        return await self._run(_login(username, password))

    async def request(self, command: Command, destination: Address | str) -> tuple[int, Address]:
        return await self._run(_request(command, destination))

    async def read_reply(self) -> tuple[int, Address]:
        return await self._run(_read_reply())

    async def connect(self, destination: Address | str) -> tuple[int, Address]:
        return await self.request(Command.CONNECT, destination)

    async def udp_associate(self, source: Address | str = NO_ADDRESS) -> tuple[int, Address]:
        return await self.request(Command.UDP_ASSOCIATE, source)

    async def bind(self, peer: Address | str = NO_ADDRESS) -> tuple[int, Address]:
        return await self.request(Command.BIND, peer)

    async def second_reply(self) -> tuple[int, Address]:
        return await self.read_reply()


def socks5_handshake(
    proxy: Address | tuple[str, int],
    destination: Address | str,
    *,
    username: str | None = None,
    password: str | None = None,
) -> tuple[int, Socks5Client]:
    """Greet (with credentials if given), CONNECT, and return (reply code, client).

    A failed method selection or login is returned as ``Reply.GENERAL_FAILURE`` with the
    client closed by the server.
    """
    client = Socks5Client(proxy)
    method = client.greet([Method.USERPASS] if username is not None else [Method.NO_AUTH])
    if method == Method.NO_ACCEPTABLE:
        return Reply.GENERAL_FAILURE, client
    if method == Method.USERPASS and client.login(username or "", password or "") != 0:
        return Reply.GENERAL_FAILURE, client
    code, _ = client.connect(destination)
    return code, client


# ---------------------------------------------------------------------------- UDP datagrams


def sockaddr(address: Address) -> tuple[str, int]:
    """``(host, port)`` for the socket module, e.g. to ``sendto`` a UDP relay."""
    return str(address.host), address.port


def wrap_datagram(destination: Address | str, payload: bytes) -> bytes:
    """A datagram for the UDP relay: the RFC 1928 §7 header naming ``destination``, then ``payload``."""
    if isinstance(destination, str):
        destination = Address.parse(destination)
    return protocol.build_udp_header(destination) + payload


def unwrap_datagram(datagram: bytes) -> tuple[Address, bytes]:
    """Split a datagram from the UDP relay into (the address it came from, payload)."""
    header = protocol.parse_udp_header(datagram)
    return header.destination, bytes(datagram[header.offset :])
