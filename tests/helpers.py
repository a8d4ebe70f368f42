"""Helpers shared by the test modules."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest


def require_tool(name: str) -> str:
    """The tool's path, or a visible skip (in CI, where every tool is installed, a failure)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed, and CI must install it (.ci/run)")
        pytest.skip(f"{name} is not installed")
    return path


def write_htpasswd(path: Path, passwords: dict[str, str]) -> Path:
    """An ``htpasswd -B`` file (bcrypt at cost 4, to keep tests fast), readable by its owner only."""
    import bcrypt

    lines = [
        f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
        for user, pw in passwords.items()
    ]
    path.write_text("".join(lines), encoding="utf-8")
    path.chmod(0o600)
    return path


def recv_all(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything until the peer closes (a reset counts as the close)."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def connect_marked(address: tuple[str, int], marked: set[int], timeout: float = 10) -> socket.socket:
    """A client socket whose local port is added to ``marked`` before it connects.

    A plugin keyed on the client's port then sees the mark even in the first hook,
    which may run before ``connect`` returns here.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    marked.add(sock.getsockname()[1])
    sock.settimeout(timeout)
    sock.connect(address)
    return sock


def serve_tcp(
    handler: type[socketserver.BaseRequestHandler], host: str = "127.0.0.1"
) -> Iterator[tuple[str, int]]:
    """Run a threaded TCP server on ``host`` for the ``with``/``yield from`` block; its address."""

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        request_queue_size = 1024  # many sessions connect at once: no SYN retries

    server = Server((host, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address
    finally:
        server.shutdown()
        server.server_close()
