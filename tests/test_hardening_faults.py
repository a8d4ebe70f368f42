"""Faults around the proxy: the far side breaks, the client vanishes, DNS dies, a plugin hangs,
file descriptors run out.  Each ends in a clean close or the phase's answer, the session ends
(the ``socksflow_server`` fixture fails on a leaked session or task), and service goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import threading
import time
import urllib.request

import pytest
from hardening import firehose_fixture, report, server_process_fixture  # noqa: F401 - fixtures
from helpers import connect_marked, recv_all, write_htpasswd

from socksflow import hookimpl
from socksflow.protocol import Address, Command, build_request
from socksflow.testing import SessionRecorder, Socks5Client, sockaddr, socks5_handshake, wrap_datagram

pytest_plugins = ["dns_servers"]


class OneShotTarget:
    """A listener that runs ``behaviour(conn)`` for the next connection, in a thread."""

    def __init__(self, behaviour) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.done = threading.Event()
        self.observed: list[object] = []

        def serve() -> None:
            conn, _ = self.listener.accept()
            with conn:
                self.observed.append(behaviour(conn))
            self.done.set()

        threading.Thread(target=serve, daemon=True).start()

    def close(self) -> None:
        self.listener.close()


# ---------------------------------------------------------------------------- the far side and the client


def test_upstream_reset_mid_transfer(socksflow_server):
    sent = b"".join(struct.pack("!I", i) for i in range(256 * 1024))  # 1 MiB, every offset distinct

    def send_then_reset(conn: socket.socket) -> None:
        conn.sendall(sent)
        time.sleep(0.2)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST

    target = OneShotTarget(send_then_reset)
    ends = SessionRecorder()
    server = socksflow_server(plugins=[ends])
    code, client = socks5_handshake(server.address, f"127.0.0.1:{target.port}")
    assert code == 0
    with client:
        received = recv_all(client.sock)
    assert sent.startswith(received) and len(received) > 0  # whatever arrived is intact; then a close
    assert ends.wait() and ends.outcomes[0][1] in ("relay error: Connection reset by peer", "closed")
    target.close()


def test_upstream_that_never_answers_is_closed_by_the_idle_timeout(socksflow_server):
    def swallow(conn: socket.socket) -> bytes:
        conn.settimeout(10)
        data = b""
        with contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                data += chunk
        return data  # ends when the proxy closes the connection

    target = OneShotTarget(swallow)
    ends = SessionRecorder()
    server = socksflow_server("timeouts: {idle: 1s}\n", plugins=[ends])
    code, client = socks5_handshake(server.address, f"127.0.0.1:{target.port}")
    assert code == 0
    with client:
        client.sock.sendall(b"hello?")
        started = time.monotonic()
        assert recv_all(client.sock) == b""
        waited = time.monotonic() - started
    assert 0.9 < waited < 3.5, waited
    assert target.done.wait(5) and target.observed == [b"hello?"]  # the target's side was closed too
    assert ends.wait() == [(0, "idle timeout")]
    target.close()


def test_client_vanishing_mid_transfer_releases_the_target(socksflow_server, firehose):
    ends = SessionRecorder()
    server = socksflow_server(plugins=[ends])
    code, client = socks5_handshake(server.address, f"127.0.0.1:{firehose.port}")
    assert code == 0
    received = 0
    while received < 4 * 1024 * 1024:
        received += len(client.sock.recv(1 << 20))
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # a reset, as when a laptop drops off the network
    assert firehose.ended[0].wait(10), "the target kept sending into a dead tunnel"
    assert isinstance(firehose.errors[0], ConnectionError)
    assert firehose.sent[0] < firehose.size
    assert ends.wait() and ends.outcomes[0][0] == 0


# ---------------------------------------------------------------------------- DNS


def test_dns_server_dying_mid_run(socksflow_server, echo_target, dnsmasq, monkeypatch):
    import dns_servers  # loaded as a plugin above: its dnsmasq takes its port from free_port()

    first = dnsmasq()
    config = (
        f"dns: {{servers: ['{first.address}'], timeout: 300ms, retries: 0,"
        " cache: {max_ttl: 0s, negative_ttl: 0s}}\n"
    )
    server = socksflow_server(config)

    def connect() -> tuple[int, float]:
        began = time.monotonic()
        code, client = socks5_handshake(server.address, Address("v4only.test", echo_target[1]))
        client.close()
        return code, time.monotonic() - began

    assert connect()[0] == 0
    first.stop()  # the DNS server dies
    for _ in range(3):
        code, took = connect()
        assert code == 0x04 and took < 3  # host unreachable, after the DNS timeout
    monkeypatch.setattr(dns_servers, "free_port", lambda: first.port)
    assert dnsmasq().port == first.port  # and comes back on the same address
    assert connect()[0] == 0


# ---------------------------------------------------------------------------- plugins that hang


class Hanging:
    """Never answers in ``self.hook`` for sessions from the client ports in ``victims``."""

    def __init__(self, hook: str) -> None:
        self.hook = hook
        self.victims: set[int] = set()

    async def maybe_hang(self, session, hook: str) -> None:
        if hook == self.hook and session.client.port in self.victims:
            await asyncio.Event().wait()

    @hookimpl
    async def socksflow_client_connected(self, session):
        await self.maybe_hang(session, "client_connected")

    @hookimpl
    async def socksflow_select_method(self, session, offered):
        await self.maybe_hang(session, "select_method")
        if self.hook == "subnegotiate" and 0x80 in offered:
            return 0x80

    @hookimpl
    async def socksflow_authenticate(self, session):
        await self.maybe_hang(session, "authenticate")

    @hookimpl
    async def socksflow_subnegotiate(self, session):
        await self.maybe_hang(session, "subnegotiate")

    @hookimpl
    async def socksflow_request(self, session):
        await self.maybe_hang(session, "request")

    @hookimpl
    async def socksflow_resolve(self, session, host):
        await self.maybe_hang(session, "resolve")
        return [Address.parse("127.0.0.1:0").host] if host == "target.test" else None

    @hookimpl
    async def socksflow_open_connection(self, session):
        await self.maybe_hang(session, "open_connection")

    @hookimpl
    async def socksflow_bind(self, session):
        await self.maybe_hang(session, "bind")

    @hookimpl
    async def socksflow_bind_peer(self, session):
        await self.maybe_hang(session, "bind_peer")

    @hookimpl
    async def socksflow_udp_datagram(self, session):
        await self.maybe_hang(session, "udp_datagram")

    @hookimpl
    async def socksflow_session_end(self, session):
        await self.maybe_hang(session, "session_end")


FAILED = b"\x00\x01\x00\x00\x00\x00\x00\x00"  # RSV ATYP 0.0.0.0:0 after VER REP
HANGS = {  # hook: (methods offered, the answer before the close)
    "client_connected": (b"\x00", b""),
    "select_method": (b"\x00", b"\x05\xff"),
    "authenticate": (b"\x02", b"\x05\x02\x01\x01"),
    "subnegotiate": (b"\x80", b"\x05\x80"),
    "request": (b"\x00", b"\x05\x00\x05\x01" + FAILED),
    "resolve": (b"\x00", b"\x05\x00\x05\x04" + FAILED),
    "open_connection": (b"\x00", b"\x05\x00\x05\x06" + FAILED),  # the connect timeout: TTL expired
}


@pytest.fixture
def users(tmp_path):
    return write_htpasswd(tmp_path / "users", {"carol": "pw"})


@pytest.mark.parametrize("hook", sorted(HANGS))
def test_a_hanging_decision_hook_fails_closed_with_the_phases_answer(
    socksflow_server, echo_target, users, hook
):
    hanging = Hanging(hook)
    methods = "[userpass]" if hook == "authenticate" else "[none]"
    server = socksflow_server(
        f"timeouts: {{hook: 500ms, connect: 500ms, handshake: 2s}}\nauth: {{methods: {methods}, users: {users}}}\n",
        plugins=[hanging],
    )
    offered, answer = HANGS[hook]
    victim = connect_marked((server.host, server.port), hanging.victims)
    login = b"\x01\x05carol\x02pw" if hook == "authenticate" else b""
    request = build_request(Command.CONNECT, Address("target.test", echo_target[1]))
    began = time.monotonic()
    with victim:
        with contextlib.suppress(OSError):  # the server may close before reading it all
            victim.sendall(b"\x05\x01" + offered + login + request)
        received = recv_all(victim)
    took = time.monotonic() - began
    assert received == answer
    assert took < 3.5, took  # the hook's (or the phase's) time limit, not forever
    credentials = {"username": "carol", "password": "pw"} if hook == "authenticate" else {}
    code, client = socks5_handshake(server.address, f"127.0.0.1:{echo_target[1]}", **credentials)
    with client:  # everyone else is served
        assert code == 0
        client.sock.sendall(b"ok")
        assert client.recv_exactly(2) == b"ok"


def test_a_hanging_bind_hook_answers_rep_01(socksflow_server):
    hanging = Hanging("bind")
    server = socksflow_server("timeouts: {hook: 500ms}\n", plugins=[hanging])
    with Socks5Client(server.address) as client:
        hanging.victims.add(client.sock.getsockname()[1])
        client.greet()
        assert client.bind()[0] == 0x01
        assert recv_all(client.sock) == b""


def test_a_hanging_bind_peer_hook_ends_the_wait_with_rep_01(socksflow_server):
    hanging = Hanging("bind_peer")
    server = socksflow_server("timeouts: {hook: 500ms}\nbind: {peer_check: any}\n", plugins=[hanging])
    with Socks5Client(server.address) as client:
        hanging.victims.add(client.sock.getsockname()[1])
        client.greet()
        code, listening = client.bind()
        assert code == 0
        with socket.create_connection(sockaddr(listening), timeout=5):
            assert client.second_reply()[0] == 0x01
        assert recv_all(client.sock) == b""


def test_a_hanging_datagram_hook_drops_the_datagram_only(socksflow_server):
    hanging = Hanging("udp_datagram")
    server = socksflow_server("timeouts: {hook: 500ms}\n", plugins=[hanging])
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as echo,
        Socks5Client(server.address) as client,
    ):
        udp.bind(("127.0.0.1", 0))
        echo.bind(("127.0.0.1", 0))
        echo.settimeout(2)
        hanging.victims.add(client.sock.getsockname()[1])
        client.greet()
        code, relay = client.udp_associate(f"127.0.0.1:{udp.getsockname()[1]}")
        assert code == 0
        udp.sendto(wrap_datagram(f"127.0.0.1:{echo.getsockname()[1]}", b"lost"), sockaddr(relay))
        with pytest.raises(TimeoutError):
            echo.recvfrom(100)
        hanging.victims.clear()  # the association itself is still there and works
        udp.sendto(wrap_datagram(f"127.0.0.1:{echo.getsockname()[1]}", b"found"), sockaddr(relay))
        assert echo.recvfrom(100)[0] == b"found"


def test_a_hanging_session_end_observer_delays_nothing(socksflow_server, echo_target):
    hanging = Hanging("session_end")
    server = socksflow_server("timeouts: {hook: 1s}\n", plugins=[hanging])
    began = time.monotonic()
    for _ in range(20):
        code, client = socks5_handshake(server.address, f"127.0.0.1:{echo_target[1]}")
        hanging.victims.add(client.sock.getsockname()[1])
        with client:
            assert code == 0
            client.sock.sendall(b"x")
            assert client.recv_exactly(1) == b"x"
    assert time.monotonic() - began < 5


# ---------------------------------------------------------------------------- file descriptors


def _open_tunnels(proxy, echo_target, count: int) -> list[Socks5Client]:
    tunnels = []
    for _ in range(count):
        code, client = socks5_handshake(proxy.address, f"127.0.0.1:{echo_target[1]}")
        assert code == 0
        tunnels.append(client)
    return tunnels


def _closed_promptly(address: tuple[str, int]) -> bool:
    """A new client is refused or closed at once (not left hanging in the listen queue)."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.settimeout(3)
        try:
            sock.sendall(b"\x05\x01\x00")
            return sock.recv(2) in (b"", b"\x05\x00")  # closed, or served if a descriptor was free
        except ConnectionError:
            return True
        except TimeoutError:
            return False


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_descriptor_exhaustion(server_process, echo_target, loop):
    """With ``ulimit -n 64``: new clients are closed, tunnels keep flowing, no spinning, recovery."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    rules = "timeouts: {handshake: 60s}\nmetrics: {listen: 127.0.0.1:0}\n"
    # One process: the descriptor limit, the descriptors counted and the CPU share are its own.
    proxy = server_process(rules, "--loop", loop, "--workers", "1", nofile=64)
    tunnels = _open_tunnels(proxy, echo_target, 5)
    flood = []
    for _ in range(80):  # more than the server has descriptors for
        with contextlib.suppress(OSError):
            flood.append(socket.create_connection(proxy.address, timeout=5))
    deadline = time.monotonic() + 10
    while proxy.fds() < 64 and time.monotonic() < deadline:
        time.sleep(0.05)
    # At the limit; the asyncio accept loop may be mid-way through freeing its spare descriptor
    # to shed a waiting client, so one below the limit counts too.
    assert proxy.fds() >= 63
    cpu_before, began = proxy.cpu_seconds(), time.monotonic()
    time.sleep(2)
    cpu_share = (proxy.cpu_seconds() - cpu_before) / (time.monotonic() - began)
    refused_cleanly = [_closed_promptly(proxy.address) for _ in range(5)]
    for number, tunnel in enumerate(tunnels):  # the tunnels that exist keep flowing
        message = f"still flowing {number}".encode()
        tunnel.sock.sendall(message)
        assert tunnel.recv_exactly(len(message)) == message
    for sock in flood:
        sock.close()
    deadline = time.monotonic() + 10
    while True:  # the server notices the closes, frees their descriptors and serves again
        with contextlib.suppress(OSError, AssertionError):
            code, client = socks5_handshake(proxy.address, f"127.0.0.1:{echo_target[1]}")
            with client:
                client.sock.sendall(b"back")
                if code == 0 and client.recv_exactly(4) == b"back":
                    break
        assert time.monotonic() < deadline, "service did not recover"
        time.sleep(0.1)
    for tunnel in tunnels:
        tunnel.close()
    proxy.wait_for_log("file descriptors are available again")
    metrics = re.search(r"metrics on (http://\S+)", proxy.stderr)
    assert metrics, proxy.stderr
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(metrics[1], timeout=10) as response:
        exposition = response.read().decode()
    assert re.search(r"^socksflow_descriptor_exhaustion_total [1-3]\.0$", exposition, re.M), exposition
    if loop == "asyncio":  # uvloop refuses the clients unseen: only the episode is known
        assert re.search(r"^socksflow_descriptor_refused_total [1-9]\d*\.0$", exposition, re.M), exposition
    report(f"emfile-{loop}", cpu_share_while_exhausted=round(cpu_share, 3), refused_cleanly=refused_cleanly)
    assert all(refused_cleanly), refused_cleanly
    assert cpu_share < 0.2, f"the accept loop spins: {cpu_share:.0%} of a core"
    assert proxy.stop() == 0
    # socksflow's own accept loop on both event loops: a line per episode, not a traceback per try
    # (asyncio) nor silence (uvloop)
    assert 1 <= proxy.stderr.count("cannot accept new clients: Too many open files") <= 3
    assert "file descriptors are available again" in proxy.stderr
    assert "Traceback" not in proxy.stderr
