"""``socksflow run --workers 2``: one set of limits for the server as a whole (issue #16).

Each test starts the real command with two workers sharing the port (SO_REUSEPORT spreads the
connections between them by a hash of each connection) and drives it with real clients.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import serve_tcp, write_htpasswd
from test_cli import Proxy

from socksflow.protocol import Method, Reply
from socksflow.testing import Socks5Client, wait_until

MiB = 1 << 20


class Workers(Proxy):
    """``socksflow run --workers 2`` (test_cli's Proxy), knowing its workers."""

    def pids(self) -> set[int]:
        pid = self.process.pid
        return set(map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split()))


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[[str], Workers]]:
    started: list[Workers] = []

    def start(rules: str) -> Workers:
        (tmp_path / "rules.yaml").write_text("timeouts: {shutdown: 1s}\n" + rules)
        started.append(Workers("--workers", "2", cwd=tmp_path))
        return started[-1]

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)


def greeted(address: tuple[str, int]) -> Socks5Client | None:
    """A client whose greeting was answered (it holds a session), or None if it was refused."""
    client = Socks5Client(address)
    try:
        client.greet()
        return client
    except (ConnectionError, OSError, ValueError, AssertionError):
        client.close()
        return None


def test_max_sessions_holds_across_workers_and_a_dead_workers_sessions_are_given_back(workers):
    server = workers("limits: [{max_sessions: 10}]\n")  # per address, counted from accept
    held = [greeted(server.address) for _ in range(30)]
    admitted = [client for client in held if client is not None]
    assert len(admitted) == 10  # not 10 per worker
    victim = min(server.pids())
    os.kill(victim, signal.SIGKILL)  # it held some of the 10: the supervisor gives them back
    assert wait_until(lambda: len(server.pids()) == 2 and victim not in server.pids(), timeout=15)

    def alive(client: Socks5Client) -> bool:
        client.sock.settimeout(0.2)
        try:
            return client.sock.recv(1) != b""
        except TimeoutError:
            return True
        except OSError:
            return False

    survivors = sum(alive(client) for client in admitted)
    assert survivors < 10  # SO_REUSEPORT gave the victim some (all on one worker: a 2^-9 chance)
    again = [greeted(server.address) for _ in range(20)]
    assert sum(client is not None for client in again) == 10 - survivors
    for client in admitted + [c for c in again if c is not None]:
        client.close()
    assert server.stop()[0] == 0


def test_failed_logins_block_the_address_in_every_worker(workers, tmp_path):
    write_htpasswd(tmp_path / "users", {"alice": "alice-secret"})
    server = workers(
        "auth: {methods: [userpass], users: users}\nrules: [{allow: all}]\n"
        "limits: [{auth_failures: {max: 5, within: 1m, block: 1m}}]\n"
    )
    for _ in range(5):
        with Socks5Client(server.address) as client:
            assert client.greet([Method.USERPASS]) == Method.USERPASS
            assert client.login("alice", "guess") == 1
    # Ten new connections land on both workers (all on one: a 2^-9 chance); none gets a greeting.
    for _ in range(10):
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"\x05\x01\x02")
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(2) == b""
    _, stderr = server.stop()
    assert stderr.count("5 failed logins within 60s") == 1  # logged once, by the worker that blocked


def test_a_users_bandwidth_is_shared_by_its_tunnels_in_every_worker(workers, tmp_path):
    size = 2 * MiB  # per tunnel: 4 tunnels at 2 MiB/s in all take about 4 s

    class Sender(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(bytes(size))

    write_htpasswd(tmp_path / "users", {"alice": "alice-secret"})
    with contextlib.contextmanager(serve_tcp)(Sender) as target:
        server = workers(
            "auth: {methods: [userpass], users: users}\nrules: [{allow: all}]\n"
            "limits: [{match: {user: alice}, bandwidth: {down: 2MiB/s, burst: 64KiB}}]\n"
        )
        digests: list[str] = []

        def download() -> None:
            with Socks5Client(server.address) as client:
                client.greet([Method.USERPASS])
                assert client.login("alice", "alice-secret") == 0
                assert client.connect(f"127.0.0.1:{target[1]}")[0] == Reply.SUCCEEDED
                digests.append(hashlib.sha256(client.recv_exactly(size)).hexdigest())

        began = time.monotonic()
        threads = [threading.Thread(target=download) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        elapsed = time.monotonic() - began
        assert server.stop()[0] == 0
    assert digests == [hashlib.sha256(bytes(size)).hexdigest()] * 4
    rate = 4 * size / elapsed
    assert 0.85 * 2 * MiB <= rate <= 1.15 * 2 * MiB, f"{rate / MiB:.2f} MiB/s in all"
