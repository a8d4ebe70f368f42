"""socksflow behind a real HAProxy (issue #16): send-proxy-v2 and send-proxy (v1), on loopback.

HAProxy (``mode tcp``) listens on a socket the test binds and hands over (``bind fd@N``), so no
port is picked and reused; it runs in the foreground and is stopped by PID.  Its servers are
socksflow listeners with ``proxy_protocol`` that trust 127.0.0.1 (HAProxy's source address).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import recv_all, require_tool
from test_proxied import closed_unanswered

from socksflow.protocol import Address, Reply
from socksflow.proxy_protocol import build_v2
from socksflow.testing import SessionRecorder, wait_until

GREETING = b"\x05\x01\x00"
RULES = "rules: [{deny: {from: 127.0.0.3/32}}, {allow: all}]\n"


class Haproxy:
    """One HAProxy process: a frontend on ``address``, one backend server per (address, option)."""

    def __init__(self, directory: Path, servers: list[tuple[int, str]]) -> None:
        self.front = socket.socket()
        self.front.bind(("127.0.0.1", 0))
        self.front.listen(64)
        self.address = self.front.getsockname()
        self.stats = directory / "haproxy.sock"
        lines = [
            "global",
            f"  stats socket {self.stats} level admin",
            "defaults",
            "  mode tcp",
            "  timeout connect 5s",
            "  timeout client 30s",
            "  timeout server 30s",
            "frontend socks",
            f"  bind fd@{self.front.fileno()}",
            "  default_backend socksflow",
            "backend socksflow",
            "  balance leastconn",
        ]
        for index, (port, option) in enumerate(servers):
            lines.append(f"  server s{index} 127.0.0.1:{port} {option} check check-send-proxy inter 100ms")
        config = directory / "haproxy.cfg"
        config.write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen(
            [require_tool("haproxy"), "-db", "-f", str(config)],
            pass_fds=[self.front.fileno()],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        if not wait_until(self.stats.exists, timeout=10):
            self.stop()
            raise RuntimeError(f"haproxy did not start: {self.process.stdout.read().decode()}")  # type: ignore[union-attr]

    def show_stat(self) -> list[dict[str, str]]:
        """``show stat`` from the stats socket, one dict per row."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats))
            sock.sendall(b"show stat\n")
            text = recv_all(sock).decode()
        header, *rows = [line for line in text.splitlines() if line]
        names = header.lstrip("# ").split(",")
        return [dict(zip(names, row.split(","), strict=False)) for row in rows]

    def server_status(self) -> dict[str, tuple[str, str]]:
        """Each backend server's (status, last check status)."""
        return {
            row["svname"]: (row["status"], row["check_status"])
            for row in self.show_stat()
            if row["pxname"] == "socksflow" and row["svname"] not in {"BACKEND", "FRONTEND"}
        }

    def stop(self) -> None:
        self.front.close()
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """Factory: ``haproxy([(port, "send-proxy-v2"), ...])`` → a running Haproxy, stopped after the test."""
    require_tool("haproxy")
    started: list[Haproxy] = []

    def start(servers: list[tuple[int, str]]) -> Haproxy:
        directory = tmp_path / f"haproxy{len(started)}"
        directory.mkdir()
        started.append(Haproxy(directory, servers))
        return started[-1]

    yield start
    for balancer in started:
        balancer.stop()


def listener(versions: str) -> str:
    return (
        f"listen: [{{address: 127.0.0.1:0, proxy_protocol: {versions}, trusted: [127.0.0.1/32]}}]\n" + RULES
    )


def connect_via(front: tuple[str, int], source: str, target: tuple[str, int]) -> tuple[socket.socket, bytes]:
    """A client bound to ``source`` asks for a CONNECT through ``front``: the socket and the reply's first 2 bytes."""
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(front)
    host, port = target
    sock.sendall(GREETING + b"\x05\x01\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big"))
    try:
        answer = recv_all_exactly(sock, 12)
    except ConnectionError:
        answer = b""
    return sock, answer[2:4]


def recv_all_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


def echoed(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    return recv_all(sock)


@pytest.mark.parametrize(("option", "versions"), [("send-proxy-v2", "v2"), ("send-proxy", "v1")])
def test_rules_see_the_client_behind_haproxy(socksflow_server, haproxy, echo_target, option, versions):
    recorder = SessionRecorder()
    server = socksflow_server(listener(versions), plugins=[recorder])
    balancer = haproxy([(server.port, option)])
    assert wait_until(lambda: balancer.server_status().get("s0", ("",))[0] == "UP", timeout=10)
    denied, reply = connect_via(balancer.address, "127.0.0.3", echo_target)
    with denied:
        assert reply == bytes([5, Reply.NOT_ALLOWED])  # the header's 127.0.0.3, not haproxy's 127.0.0.1
    allowed, reply = connect_via(balancer.address, "127.0.0.2", echo_target)
    with allowed:
        assert reply == bytes([5, Reply.SUCCEEDED])
        assert echoed(allowed, b"via haproxy " + option.encode()) == b"via haproxy " + option.encode()
    assert wait_until(lambda: len([s for s in recorder.sessions if s.request is not None]) == 2)
    clients = sorted(str(s.client.host) for s in recorder.sessions if s.request is not None)
    assert clients == ["127.0.0.2", "127.0.0.3"]


def test_health_checks_with_check_send_proxy_keep_servers_up(socksflow_server, haproxy, echo_target):
    recorder = SessionRecorder()
    servers = [socksflow_server(listener("v2"), plugins=[recorder]) for _ in range(2)]
    balancer = haproxy([(server.port, "send-proxy-v2") for server in servers])
    time.sleep(1)  # ten check intervals: every check a LOCAL header, none may mark a server down
    assert balancer.server_status() == {"s0": ("UP", "L4OK"), "s1": ("UP", "L4OK")}
    assert recorder.sessions == []  # a health check is no session
    for source in ("127.0.0.2", "127.0.0.4"):
        sock, reply = connect_via(balancer.address, source, echo_target)
        with sock:
            assert reply == bytes([5, Reply.SUCCEEDED])
            assert echoed(sock, b"up") == b"up"


def test_a_v1_balancer_in_front_of_a_v2_only_listener_is_refused(socksflow_server, haproxy, echo_target):
    recorder = SessionRecorder()
    server = socksflow_server(listener("v2"), plugins=[recorder])
    balancer = haproxy([(server.port, "send-proxy")])
    sock, reply = connect_via(balancer.address, "127.0.0.2", echo_target)
    with sock:
        assert reply == b""  # closed: a v1 line is not what this listener reads
    assert recorder.sessions == []


def test_forged_and_missing_headers_are_refused(socksflow_server, haproxy, echo_target):
    """Beside a working balancer: a header from an untrusted host, and a client without one."""
    server = socksflow_server(listener("v2"))
    balancer = haproxy([(server.port, "send-proxy-v2")])
    forged = build_v2(Address.parse("127.0.0.2:40000"), Address.parse(f"127.0.0.1:{server.port}"))
    for source, first_bytes in (("127.0.0.5", forged + GREETING), ("127.0.0.1", GREETING)):
        with socket.socket() as sock:
            sock.settimeout(10)
            sock.bind((source, 0))
            sock.connect((server.host, server.port))
            sock.sendall(first_bytes)
            assert closed_unanswered(sock)
    sock, reply = connect_via(balancer.address, "127.0.0.2", echo_target)
    with sock:
        assert reply == bytes([5, Reply.SUCCEEDED])


def test_curl_through_haproxy(socksflow_server, haproxy, http_target):
    curl = require_tool("curl")
    server = socksflow_server(listener("[v1, v2]"))
    balancer = haproxy([(server.port, "send-proxy-v2")])
    host, port = balancer.address
    result = subprocess.run(
        [curl, "-sS", "--max-time", "20", "--socks5-hostname", f"{host}:{port}", http_target.url("/")],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello from the target\n"


def greeted_via(front: tuple[str, int], source: str) -> socket.socket | None:
    """A client at ``source`` whose greeting was answered through ``front`` (it holds a session), or None."""
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(front)
    sock.sendall(GREETING)
    try:
        if recv_all_exactly(sock, 2) == b"\x05\x00":
            return sock
    except (ConnectionError, TimeoutError):
        pass
    sock.close()
    return None


def test_three_instances_behind_haproxy_share_one_limit_in_redis(socksflow_server, haproxy, redis_server):
    config = listener("v2") + f"state: {{redis: '{redis_server.url}'}}\nlimits: [{{max_sessions: 6}}]\n"
    servers = [socksflow_server(config) for _ in range(3)]
    balancer = haproxy([(server.port, "send-proxy-v2") for server in servers])
    held = []
    try:
        held = [greeted_via(balancer.address, "127.0.0.2") for _ in range(9)]
        assert sum(sock is not None for sock in held) == 6  # per client address, across all instances
        other = greeted_via(balancer.address, "127.0.0.4")  # another client: its own limit
        assert other is not None
        held.append(other)
        serving = [server for server in servers if server.server is not None and server.server.sessions]
        assert len(serving) > 1  # leastconn spread the sessions: the limit is the instances' shared one
    finally:
        for sock in held:
            if sock is not None:
                sock.close()
