"""Shared targets for end-to-end tests: real servers on loopback, stopped after each use."""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import os
import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from helpers import require_tool, serve_tcp
from kdc import TOOLS, Kdc, start_kdc
from test_redisstate import redis_server  # noqa: F401 - a real redis-server, for any test module

BLOB_SIZE = 50 * 1024 * 1024


@dataclass
class HttpTarget:
    host: str
    port: int
    blob: bytes
    uploads: list[str]  # sha256 of every upload received

    @property
    def blob_sha256(self) -> str:
        return hashlib.sha256(self.blob).hexdigest()

    def url(self, path: str = "/", host: str | None = None) -> str:
        host = host or self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}{path}"


def _http_handler(target: HttpTarget) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            body = target.blob if self.path == "/blob" else b"hello from the target\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            view = memoryview(body)
            for start in range(0, len(body), 1 << 20):
                self.wfile.write(view[start : start + (1 << 20)])

        def do_POST(self) -> None:
            remaining = int(self.headers.get("Content-Length", "0"))
            digest = hashlib.sha256()
            while remaining:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                digest.update(chunk)
                remaining -= len(chunk)
            target.uploads.append(digest.hexdigest())
            body = digest.hexdigest().encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def _serve_http(host: str) -> Iterator[HttpTarget]:
    blob = _blob()
    target = HttpTarget(host, 0, blob, [])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(http.server.ThreadingHTTPServer):
        address_family = family
        daemon_threads = True
        request_queue_size = 1024

    server = Server((host, 0), _http_handler(target))
    target.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield target
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


_BLOB: list[bytes] = []


def _blob() -> bytes:
    if not _BLOB:
        _BLOB.append(os.urandom(BLOB_SIZE))
    return _BLOB[0]


@pytest.fixture(scope="session")
def http_target() -> Iterator[HttpTarget]:
    """An HTTP server on 127.0.0.1: GET / (a line), GET /blob (50 MB), POST (answers the sha256)."""
    yield from _serve_http("127.0.0.1")


@pytest.fixture(scope="session")
def http_target_v6() -> Iterator[HttpTarget]:
    """The same HTTP server on [::1]."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    yield from _serve_http("::1")


class EchoHandler(socketserver.BaseRequestHandler):
    """Echoes until the client half-closes, then closes (so half-close is observable)."""

    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture(scope="session")
def echo_target() -> Iterator[tuple[str, int]]:
    yield from serve_tcp(EchoHandler)


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A loopback port bound but not listening, held for the test: connections to it are refused.

    (A port merely released may be taken again by the next ephemeral bind, such as a listener's.)
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def echo(echo_target: tuple[str, int]) -> str:
    """``host:port`` of the echo server (it closes when its client half-closes, so tunnels end)."""
    return "{}:{}".format(*echo_target)


@pytest.fixture(scope="session")
def kdc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kdc]:
    """A real MIT KDC for the run (realm EXAMPLE.TEST, see tests/kdc.py), tickets for alice and bob.

    Its KRB5_* variables are this process's while it runs.  Skips without the KDC tools or the
    ``gssapi`` library; in CI (``CI`` set), fails instead.
    """
    if importlib.util.find_spec("gssapi") is None:
        if os.environ.get("CI"):
            pytest.fail("the gssapi library is not installed, and CI must install it (the test extra)")
        pytest.skip("the gssapi library is not installed (pip install 'socksflow[gssapi]')")
    for tool in TOOLS:
        require_tool(tool)
    with start_kdc(tmp_path_factory.mktemp("kdc")) as running, pytest.MonkeyPatch.context() as env:
        for name, value in running.env.items():
            env.setenv(name, value)
        yield running
