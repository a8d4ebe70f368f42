"""Testing helpers for plugin authors (and socksflow's own tests): a pytest plugin.

Fixtures:

* ``socksflow_server`` — a factory: ``socksflow_server(config="...", plugins=[obj])`` starts a
  real server on ``127.0.0.1:0`` in a background thread and returns a :class:`RunningServer`
  (``.address``, ``.host``, ``.port``); every server is stopped after the test and must have
  left no session or task behind.

Client helpers (blocking, for use from tests): :func:`socks5_handshake` and
:class:`Socks5Client` speak SOCKS5 byte by byte and return the reply codes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from socksflow import app, protocol
from socksflow.config import Config
from socksflow.protocol import Address, Command, Method, Reply
from socksflow.server import Server

__all__ = ["RunningServer", "Socks5Client", "socks5_handshake"]


class RunningServer:
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
        text = config if "listen" in config else "listen: [127.0.0.1:0]\n" + config
        if directory is not None:
            path = directory / "rules.yaml"
            path.write_text(text, encoding="utf-8")
            self.config = Config.from_file(path)
        else:
            self.config = Config.from_text(text, "<test config>")
        self.config.raise_errors()
        self.config.plugins.autoload = autoload and self.config.plugins.autoload
        self.pm = app.build_plugin_manager(self.config)
        for plugin in plugins:
            self.pm.register(plugin)
        app.configure(self.pm, self.config)
        self._loop_factory = loop_factory or default_loop_factory()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.leftover_tasks: list[asyncio.Task[Any]] = []

    @property
    def address(self) -> Address:
        assert self.server is not None
        return self.server.addresses[0]

    @property
    def host(self) -> str:
        return str(self.address.host)

    @property
    def port(self) -> int:
        return self.address.port

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
        await self.server.stop(timeout=2.0)
        current = asyncio.current_task()
        for _ in range(50):  # let closing transports and finished sessions settle
            self.leftover_tasks = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
            if not self.leftover_tasks and not self.server.sessions:
                break
            await asyncio.sleep(0.02)


def default_loop_factory() -> Any:
    """asyncio's loop, or uvloop's when ``SOCKSFLOW_TEST_LOOP=uvloop`` (to run a suite on both)."""
    if os.environ.get("SOCKSFLOW_TEST_LOOP") == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


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


# ---------------------------------------------------------------------------- a raw client


class Socks5Client:
    """A blocking SOCKS5 client that exposes every reply, for tests."""

    def __init__(self, proxy: Address | tuple[str, int], timeout: float = 10.0) -> None:
        if isinstance(proxy, Address):
            proxy = (str(proxy.host), proxy.port)
        self.sock = socket.create_connection(proxy, timeout=timeout)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Socks5Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recv_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {n} bytes: {data!r}")
            data += chunk
        return data

    def greet(self, methods: Sequence[int] = (Method.NO_AUTH,)) -> int:
        """Send the greeting; return the method the server chose."""
        self.sock.sendall(protocol.build_greeting(list(methods)))
        answer = self.recv_exactly(2)
        assert answer[0] == 5, answer
        return answer[1]

    def login(self, username: bytes | str, password: bytes | str) -> int:
        """RFC 1929: return the status byte (0 = success)."""
        user = username.encode() if isinstance(username, str) else username
        secret = password.encode() if isinstance(password, str) else password
        self.sock.sendall(protocol.build_userpass(user, secret))
        answer = self.recv_exactly(2)
        assert answer[0] == 1, answer
        return answer[1]

    def request(self, command: Command, destination: Address | str) -> tuple[int, Address]:
        """Send a request; return (reply code, bound address)."""
        if isinstance(destination, str):
            destination = Address.parse(destination)
        self.sock.sendall(protocol.build_request(command, destination))
        return self.read_reply()

    def read_reply(self) -> tuple[int, Address]:
        data = self.recv_exactly(4)
        atyp = data[3]
        rest = {1: 4 + 2, 4: 16 + 2}.get(atyp)
        if rest is None:
            length = self.recv_exactly(1)
            data += length
            rest = length[0] + 2
        data += self.recv_exactly(rest)
        parsed = protocol.parse_reply(data)
        assert parsed is not None
        code, bound, _ = parsed
        return int(code), bound

    def connect(self, destination: Address | str) -> tuple[int, Address]:
        return self.request(Command.CONNECT, destination)


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
