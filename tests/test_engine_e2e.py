"""The core engine end to end: a real server on loopback, real clients, exact reply bytes."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import ipaddress
import socket
import socketserver
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import recv_all, require_tool, serve_tcp

import socksflow
from socksflow import Reply, ResolveError, Verdict
from socksflow.protocol import Address, Method
from socksflow.testing import Socks5Client, socks5_handshake, wait_until


def reply_bytes(code: int, bound: bytes = b"\x01\x00\x00\x00\x00\x00\x00") -> bytes:
    return bytes((5, code, 0)) + bound


# ---------------------------------------------------------------------------- real clients


def curl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [require_tool("curl"), "--silent", "--show-error", "--max-time", str(int(timeout)), *args],
        capture_output=True, timeout=timeout + 5,
    )  # fmt: skip


def test_curl_socks5_downloads_50mb_intact(socksflow_server, http_target):
    server = socksflow_server()
    result = curl("--socks5", f"{server.host}:{server.port}", http_target.url("/blob"))
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).hexdigest() == http_target.blob_sha256


def test_curl_socks5_uploads_20mb_intact(socksflow_server, http_target, tmp_path):
    payload = http_target.blob[: 20 * 1024 * 1024]
    (tmp_path / "upload").write_bytes(payload)
    server = socksflow_server()
    result = curl(
        "--socks5", f"{server.host}:{server.port}", "--data-binary", f"@{tmp_path / 'upload'}",
        http_target.url("/upload"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == hashlib.sha256(payload).hexdigest()


def test_curl_socks5_hostname_resolves_through_the_proxy(socksflow_server, http_target):
    server = socksflow_server()
    result = curl("--socks5-hostname", f"{server.host}:{server.port}", http_target.url("/", "localhost"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello from the target\n"


def test_curl_ipv6_target_through_ipv6_listener(socksflow_server, http_target_v6):
    server = socksflow_server("listen: ['[::1]:0']\n")
    assert server.host == "::1"
    result = curl("--socks5", f"[::1]:{server.port}", "--globoff", http_target_v6.url("/"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello from the target\n"


def test_ipv6_listeners_take_ipv6_clients_only(socksflow_server):
    # So no client ever arrives as an IPv4-mapped address (::ffff:a.b.c.d) that rules and
    # limits written for IPv4 networks would not match; the same holds with --workers.
    server = socksflow_server("listen: ['[::1]:0']\n")
    for listener in server.call(lambda: list(server.server._listeners)):
        for sock in listener.sockets:
            assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1


def test_curl_proxy_user(socksflow_server, http_target, tmp_path):
    bcrypt = pytest.importorskip("bcrypt")
    users = tmp_path / "users.htpasswd"
    users.write_text("alice:" + bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode() + "\n")
    users.chmod(0o600)
    server = socksflow_server(f"auth: {{methods: [userpass], users: {users}}}\n")
    ok = curl(
        "--socks5", f"{server.host}:{server.port}", "--proxy-user", "alice:s3cret", http_target.url("/")
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == b"hello from the target\n"
    bad = curl(
        "--socks5", f"{server.host}:{server.port}", "--proxy-user", "alice:wrong", http_target.url("/")
    )
    assert bad.returncode == 97, bad  # CURLE_PROXY: the SOCKS5 login was refused
    none = curl("--socks5", f"{server.host}:{server.port}", http_target.url("/"))
    assert none.returncode == 97, none  # no acceptable method


def test_pysocks(socksflow_server, echo_target):
    socks = pytest.importorskip("socks")
    server = socksflow_server()
    sock = socks.socksocket()
    sock.set_proxy(socks.SOCKS5, server.host, server.port, rdns=True)
    sock.settimeout(10)
    sock.connect(echo_target)
    sock.sendall(b"through pysocks")
    assert sock.recv(100) == b"through pysocks"
    sock.close()


def test_python_socks_asyncio(socksflow_server, echo_target):
    proxy_module = pytest.importorskip("python_socks.async_.asyncio")
    server = socksflow_server()

    async def main() -> bytes:
        proxy = proxy_module.Proxy.from_url(f"socks5://{server.host}:{server.port}", rdns=True)
        sock = await proxy.connect(dest_host="localhost", dest_port=echo_target[1], timeout=10)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"through python-socks")
        data = await reader.readexactly(20)
        writer.close()
        await writer.wait_closed()
        return data

    assert asyncio.run(main()) == b"through python-socks"


def test_httpx_socksio(socksflow_server, http_target):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("socksio")
    server = socksflow_server()
    with httpx.Client(proxy=f"socks5://{server.host}:{server.port}", timeout=10) as client:
        response = client.get(http_target.url("/"))
    assert response.status_code == 200
    assert response.content == b"hello from the target\n"


# ---------------------------------------------------------------------------- reply codes


def test_success_reply_carries_the_outbound_local_address(socksflow_server):
    listener = socket.create_server(("127.0.0.1", 0))
    server = socksflow_server()
    with Socks5Client(server.address) as client:
        assert client.greet() == Method.NO_AUTH
        code, bound = client.connect(f"127.0.0.1:{listener.getsockname()[1]}")
        peer, peer_address = listener.accept()
        assert code == Reply.SUCCEEDED
        assert (str(bound.host), bound.port) == peer_address  # BND = the proxy's outbound socket
        peer.close()
    listener.close()


class Deny:
    @socksflow.hookimpl
    def socksflow_request(self, request):
        if request.destination.port == 9:
            return Verdict.deny("port 9 is closed to you")
        return None


class Unreachable:
    @socksflow.hookimpl
    def socksflow_open_connection(self, session):
        if session.destination.port == 3:
            raise OSError(errno.ENETUNREACH, "Network is unreachable")
        return None


class Resolver:
    @socksflow.hookimpl
    async def socksflow_resolve(self, host):
        if host == "nowhere.test":
            raise ResolveError("NXDOMAIN")
        if host == "empty.test":
            return []
        return None


@pytest.mark.parametrize(
    ("destination", "code"),
    [
        ("127.0.0.1:9", Reply.NOT_ALLOWED),
        ("127.0.0.1:3", Reply.NETWORK_UNREACHABLE),
        ("nowhere.test:80", Reply.HOST_UNREACHABLE),
        ("empty.test:80", Reply.HOST_UNREACHABLE),
        ("closed", Reply.CONNECTION_REFUSED),
    ],
)
def test_failure_reply_codes(socksflow_server, refusing_port, destination, code):
    if destination == "closed":
        destination = f"127.0.0.1:{refusing_port}"
    server = socksflow_server(plugins=[Deny(), Unreachable(), Resolver()])
    with Socks5Client(server.address) as client:
        client.greet()
        client.sock.sendall(
            socksflow.protocol.build_request(socksflow.Command.CONNECT, Address.parse(destination))
        )
        assert recv_all(client.sock) == reply_bytes(code)  # the reply, then the server closes


@pytest.mark.parametrize(
    ("timeouts", "least"),
    [("{connect: 1s}", 0.9), ("{handshake: 400ms, connect: 1500ms}", 1.4)],
    ids=["connect", "connect-outlives-the-handshake-deadline"],
)
def test_connect_timeout_is_reply_0x06(socksflow_server, timeouts, least):
    # A listener whose accept queue is full drops SYNs: a real connect that never completes.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    time.sleep(0.2)
    server = socksflow_server(f"timeouts: {timeouts}\n")
    started = time.monotonic()
    with Socks5Client(server.address) as client:
        client.greet()
        code, _ = client.connect(f"127.0.0.1:{listener.getsockname()[1]}")
    assert code == Reply.TTL_EXPIRED
    assert least < time.monotonic() - started < 5
    for filler in fillers:
        filler.close()
    listener.close()


def test_sessions_ended_while_waiting_for_the_client_or_the_dial_end_once(socksflow_server):
    # Until a session needs a Task, the runner steps its coroutine itself: ending the session
    # must cancel it where it waits (for the client's bytes, or for the dial), as Task.cancel() does.
    ended: list[str] = []

    class Record:
        @socksflow.hookimpl
        def socksflow_session_end(self, session):
            ended.append(session.close_reason)

    listener = socket.socket()  # a full accept queue: a dial that never completes
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = [socket.socket() for _ in range(4)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
    server = socksflow_server("timeouts: {connect: 30s}\n", plugins=[Record()])
    sessions = lambda: server.call(lambda: list(server.server.sessions))  # noqa: E731
    with Socks5Client(server.address) as silent, Socks5Client(server.address) as dialling:
        silent.sock.sendall(b"\x05\x01")  # half a greeting
        dialling.greet()
        destination = Address.parse(f"127.0.0.1:{listener.getsockname()[1]}")
        dialling.sock.sendall(socksflow.protocol.build_request(socksflow.Command.CONNECT, destination))
        assert wait_until(
            lambda: sum(s.request is not None for s in sessions()) == 1 and len(sessions()) == 2
        )
        for session in sessions():
            assert server.call(server.server.end_session, session, "closed by the test")
        assert recv_all(silent.sock) == b""
        assert recv_all(dialling.sock) == b""
        assert wait_until(lambda: len(ended) == 2 and not sessions())
    assert ended == ["closed by the test"] * 2
    for sock in (*fillers, listener):
        sock.close()


def test_unknown_command_and_address_type(socksflow_server):
    server = socksflow_server()
    with Socks5Client(server.address) as client:
        client.greet()
        client.sock.sendall(b"\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50")
        assert recv_all(client.sock) == reply_bytes(Reply.COMMAND_NOT_SUPPORTED)
    with Socks5Client(server.address) as client:
        client.greet()
        client.sock.sendall(b"\x05\x01\x00\x05\x7f\x00\x00\x01\x00\x50")
        assert recv_all(client.sock) == reply_bytes(Reply.ADDRESS_TYPE_NOT_SUPPORTED)


def test_socks4_on_a_socks5_only_port_is_rejected_the_socks4_way(socksflow_server):
    server = socksflow_server()
    with Socks5Client(server.address) as client:
        client.sock.sendall(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00")  # a SOCKS4 CONNECT
        assert recv_all(client.sock) == b"\x00\x5b\x00\x00\x00\x00\x00\x00"


def test_unknown_first_byte_is_closed_without_an_answer(socksflow_server):
    server = socksflow_server()
    with Socks5Client(server.address) as client:
        client.sock.sendall(b"\x06\x01\x00")
        assert recv_all(client.sock) == b""


def test_no_acceptable_method(socksflow_server):
    server = socksflow_server()
    with Socks5Client(server.address) as client:
        client.sock.sendall(b"\x05\x01\x01")  # GSSAPI only
        assert recv_all(client.sock) == b"\x05\xff"


def test_failed_login_closes_even_with_a_pipelined_request(socksflow_server, echo_target, tmp_path):
    bcrypt = pytest.importorskip("bcrypt")
    users = tmp_path / "users"
    users.write_text("bob:" + bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=4)).decode() + "\n")
    server = socksflow_server(f"auth: {{methods: [userpass], users: {users}}}\n")
    request = socksflow.protocol.build_request(
        socksflow.Command.CONNECT, Address.parse(f"127.0.0.1:{echo_target[1]}")
    )
    with Socks5Client(server.address) as client:
        client.sock.sendall(b"\x05\x01\x02" + b"\x01\x03bob\x05wrong" + request + b"payload")
        assert recv_all(client.sock) == b"\x05\x02\x01\x01"  # method, failure status, then closed
    with Socks5Client(server.address) as client:  # an empty password never matches
        client.sock.sendall(b"\x05\x01\x02" + b"\x01\x03bob\x00")
        assert recv_all(client.sock) == b"\x05\x02\x01\x01"
    with Socks5Client(server.address) as client:  # RFC 1929 VER must be 1
        client.sock.sendall(b"\x05\x01\x02" + b"\x05\x03bob\x05right")
        assert recv_all(client.sock) == b"\x05\x02\x01\x01"
    with Socks5Client(server.address) as client:
        client.sock.sendall(b"\x05\x01\x02" + b"\x01\x03bob\x05right" + request + b"payload")
        assert client.recv_exactly(4) == b"\x05\x02\x01\x00"
        code, _ = client.read_reply()
        assert code == Reply.SUCCEEDED
        assert client.recv_exactly(7) == b"payload"


# ---------------------------------------------------------------------------- framing and relay


def test_handshake_one_byte_at_a_time(socksflow_server, echo_target):
    server = socksflow_server()
    request = socksflow.protocol.build_request(
        socksflow.Command.CONNECT, Address.parse(f"localhost:{echo_target[1]}")
    )
    with Socks5Client(server.address) as client:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in b"\x05\x02\x00\x02":
            client.sock.send(bytes([byte]))
            time.sleep(0.005)
        assert client.recv_exactly(2) == b"\x05\x00"
        for byte in request:
            client.sock.send(bytes([byte]))
            time.sleep(0.005)
        code, _ = client.read_reply()
        assert code == Reply.SUCCEEDED
        client.sock.sendall(b"echo")
        assert client.recv_exactly(4) == b"echo"


def test_pipelined_handshake_keeps_optimistic_data(socksflow_server, echo_target):
    server = socksflow_server()
    request = socksflow.protocol.build_request(
        socksflow.Command.CONNECT, Address.parse(f"127.0.0.1:{echo_target[1]}")
    )
    with Socks5Client(server.address) as client:
        client.sock.sendall(b"\x05\x01\x00" + request + b"sent before the reply")
        assert client.recv_exactly(2) == b"\x05\x00"
        code, _ = client.read_reply()
        assert code == Reply.SUCCEEDED
        assert client.recv_exactly(21) == b"sent before the reply"


def test_half_close_is_relayed(socksflow_server, echo_target):
    server = socksflow_server()
    code, client = socks5_handshake(server.address, f"127.0.0.1:{echo_target[1]}")
    assert code == Reply.SUCCEEDED
    payload = bytes(range(256)) * 4096  # 1 MiB
    sender = threading.Thread(
        target=lambda: (client.sock.sendall(payload), client.sock.shutdown(socket.SHUT_WR))
    )
    sender.start()
    echoed = recv_all(client.sock)  # the echo server sees EOF, finishes echoing, closes
    sender.join()
    assert echoed == payload
    client.close()


def test_200_concurrent_sessions(socksflow_server, echo_target):
    server = socksflow_server()

    async def one(i: int) -> bytes:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        request = socksflow.protocol.build_request(
            socksflow.Command.CONNECT, Address.parse(f"127.0.0.1:{echo_target[1]}")
        )
        writer.write(b"\x05\x01\x00" + request)
        assert await reader.readexactly(2) == b"\x05\x00"
        assert (await reader.readexactly(10))[:2] == b"\x05\x00"
        message = f"session {i}".encode()
        writer.write(message)
        data = await reader.readexactly(len(message))
        writer.close()
        await writer.wait_closed()
        return data

    async def main() -> list[bytes]:
        return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(main())
    assert results == [f"session {i}".encode() for i in range(200)]


def test_handshake_timeout_closes_silent_clients(socksflow_server):
    server = socksflow_server("timeouts: {handshake: 500ms}\n")
    with Socks5Client(server.address) as client:
        started = time.monotonic()
        client.sock.sendall(b"\x05\x01")  # half a greeting, then silence
        assert recv_all(client.sock) == b""
        assert 0.4 < time.monotonic() - started < 3


def test_idle_tunnels_are_closed(socksflow_server, echo_target):
    server = socksflow_server("timeouts: {idle: 1s}\n")
    code, client = socks5_handshake(server.address, f"127.0.0.1:{echo_target[1]}")
    assert code == Reply.SUCCEEDED
    started = time.monotonic()
    assert recv_all(client.sock) == b""
    assert 0.9 < time.monotonic() - started < 4
    client.close()


def test_proxychains4_with_remote_dns(socksflow_server, http_target, tmp_path):
    proxychains = require_tool("proxychains4")
    seen = []

    class Recorder:
        @socksflow.hookimpl
        def socksflow_request(self, request):
            seen.append(request.destination)

        @socksflow.hookimpl
        def socksflow_resolve(self, host):
            return [ipaddress.ip_address("127.0.0.1")] if host == "target.socksflow.test" else None

    server = socksflow_server(plugins=[Recorder()])
    conf = tmp_path / "proxychains.conf"
    conf.write_text(
        f"strict_chain\nproxy_dns\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n[ProxyList]\nsocks5 {server.host} {server.port}\n"
    )
    result = subprocess.run(
        [proxychains, "-q", "-f", str(conf), require_tool("curl"), "--silent", "--max-time", "20",
         http_target.url("/blob", "target.socksflow.test")],
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).hexdigest() == http_target.blob_sha256
    assert seen == [Address("target.socksflow.test", http_target.port)]  # the name went to the proxy


def test_destination_that_speaks_and_closes_at_once(socksflow_server):
    # Its bytes and its FIN can arrive before the tunnel takes over: the reply must still come
    # first, then every byte, then the close (regression: this once hung the session).
    listener = socket.create_server(("127.0.0.1", 0))

    def greet_and_close() -> None:
        for _ in range(50):
            peer, _ = listener.accept()
            peer.sendall(b"220 hello\r\n")
            peer.close()

    thread = threading.Thread(target=greet_and_close, daemon=True)
    thread.start()
    server = socksflow_server()
    for _ in range(50):
        code, client = socks5_handshake(server.address, f"127.0.0.1:{listener.getsockname()[1]}")
        assert code == Reply.SUCCEEDED
        assert recv_all(client.sock) == b"220 hello\r\n"
        client.close()
    thread.join(10)
    listener.close()


class Resetter(socketserver.BaseRequestHandler):
    """Sends a little, then resets the connection (SO_LINGER 0)."""

    def handle(self) -> None:
        self.request.sendall(b"partial")
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        time.sleep(0.1)
        self.request.close()


def test_a_destination_reset_resets_the_client(socksflow_server):
    server = socksflow_server()
    with contextlib.contextmanager(serve_tcp)(Resetter) as target:
        code, client = socks5_handshake(server.address, f"127.0.0.1:{target[1]}")
        assert code == Reply.SUCCEEDED
        assert client.recv_exactly(7) == b"partial"
        with pytest.raises(ConnectionResetError):  # not b"": the client can tell a cut-off transfer
            client.sock.recv(100)
        client.close()


def test_a_client_reset_resets_the_destination(socksflow_server):
    seen: list[object] = []
    arrived = threading.Event()

    class Reader(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            arrived.set()
            try:
                seen.append(self.request.recv(100))
                seen.append(self.request.recv(100))
            except ConnectionResetError as exc:
                seen.append(exc)

    server = socksflow_server()
    with contextlib.contextmanager(serve_tcp)(Reader) as target:
        code, client = socks5_handshake(server.address, f"127.0.0.1:{target[1]}")
        assert code == Reply.SUCCEEDED
        client.sock.sendall(b"hi")
        assert arrived.wait(5)
        time.sleep(0.1)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.sock.close()
        assert wait_until(lambda: len(seen) == 2)
    assert seen[0] == b"hi" and isinstance(seen[1], ConnectionResetError)


def test_the_listen_queue_is_as_long_as_the_kernel_allows(socksflow_server):
    """Issue #13: a reconnect burst overflowed a 1 024-long queue and the kernel dropped good SYNs."""
    ss = require_tool("ss")
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    server = socksflow_server()
    shown = subprocess.run(
        [ss, "-ltnH", f"sport = :{server.port}"], capture_output=True, text=True, timeout=10
    )
    (line,) = shown.stdout.splitlines()
    assert int(line.split()[2]) == max(1024, somaxconn)  # a listener's Send-Q is its backlog
