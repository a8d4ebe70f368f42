"""Front doors end to end: real clients (curl, ncat) speaking SOCKS4/4a and HTTP proxy to a mixed port.

Each test runs a real server with a ``mixed`` listener on 127.0.0.1:0 and the standard plugins, so
rules, login and the access log apply to every door as they do to SOCKS5.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess

import pytest
from helpers import recv_all, require_tool, write_htpasswd

from socksflow import Verdict, hookimpl

MIXED = "listen: [{address: 127.0.0.1:0, protocols: mixed}]\n"
REJECTED = b"\x00\x5b\x00\x00\x00\x00\x00\x00"
STATUS = "%{http_code} %{http_connect}"  # the status of a forwarded request, of a CONNECT
DENY_TWO = "rules:\n  - deny: {to: 127.0.0.2}\n  - allow: all\n"


def curl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [require_tool("curl"), "--silent", "--show-error", "--max-time", str(int(timeout)), *args],
        capture_output=True, timeout=timeout + 5,
    )  # fmt: skip


def proxy_options(door: str, server) -> list[str]:
    where = f"{server.host}:{server.port}"
    return {
        "socks4": ["--socks4", where],
        "socks4a": ["--socks4a", where],
        "socks5": ["--socks5", where],
        "http": ["-x", f"http://{where}"],
        "http-connect": ["-p", "-x", f"http://{where}"],
    }[door]


class Seen:
    """Records, for each request the hooks saw, the door and the destination."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []

    @hookimpl
    def socksflow_request(self, session, request) -> Verdict | None:
        self.requests.append((session.protocol, str(request.destination)))
        return None


@pytest.mark.parametrize("door", ["socks4", "socks4a", "http", "http-connect", "socks5"])
def test_50mb_download_is_intact_through_each_door(socksflow_server, http_target, door):
    seen = Seen()
    server = socksflow_server(MIXED, plugins=[seen])
    host = "localhost" if door == "socks4a" else None
    result = curl(*proxy_options(door, server), http_target.url("/blob", host))
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).hexdigest() == http_target.blob_sha256
    protocol = {"socks4a": "socks4", "http-connect": "http"}.get(door, door)
    destination = f"{'localhost' if host else '127.0.0.1'}:{http_target.port}"
    assert seen.requests == [(protocol, destination)]


def test_post_body_is_forwarded_by_the_http_door(socksflow_server, http_target, tmp_path):
    payload = http_target.blob[: 5 * 1024 * 1024]
    (tmp_path / "upload").write_bytes(payload)
    server = socksflow_server(MIXED)
    result = curl(
        "-x", f"http://{server.host}:{server.port}", "--data-binary", f"@{tmp_path / 'upload'}",
        http_target.url("/upload"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == hashlib.sha256(payload).hexdigest()


def test_denied_destination_gets_each_doors_refusal(socksflow_server, http_target):
    server = socksflow_server(MIXED + DENY_TWO)
    url = f"http://127.0.0.2:{http_target.port}/"
    for door in ("socks4", "socks4a"):
        assert curl(*proxy_options(door, server), url).returncode == 97  # proxy handshake error
    with socket.create_connection((server.host, server.port)) as raw:
        raw.sendall(b"\x04\x01" + http_target.port.to_bytes(2, "big") + bytes((127, 0, 0, 2)) + b"\0")
        assert recv_all(raw) == REJECTED
    result = curl("-i", *proxy_options("http", server), url)
    head = result.stdout.decode()
    assert head.startswith("HTTP/1.1 403 Forbidden\r\n"), head
    assert f"X-Socksflow-Reason: {server.config.file}:3\r\n" in head
    result = curl("-w", STATUS, *proxy_options("http-connect", server), url)
    assert result.returncode == 56 and result.stdout == b"000 403"  # curl: CONNECT refused


def test_reason_header_can_be_turned_off(socksflow_server, http_target):
    server = socksflow_server(MIXED + DENY_TWO + "doors: {http_reason_header: false}\n")
    result = curl("-i", *proxy_options("http", server), f"http://127.0.0.2:{http_target.port}/")
    assert result.stdout.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"Reason" not in result.stdout


def test_http_login_with_the_same_users_file(socksflow_server, http_target, tmp_path):
    users = write_htpasswd(tmp_path / "users", {"alice": "alice-secret"})
    server = socksflow_server(MIXED + f"auth: {{methods: [userpass], users: {users}}}\n")
    url = http_target.url("/")
    for door in ("http", "http-connect"):
        result = curl("-i", *proxy_options(door, server), url)
        assert b"HTTP/1.1 407 Proxy Authentication Required\r\n" in result.stdout, (door, result)
        assert b'Proxy-Authenticate: Basic realm="socksflow"\r\n' in result.stdout
        wrong = curl(
            "-w", STATUS, "-o", "/dev/null", "--proxy-user", "alice:wrong", *proxy_options(door, server), url
        )
        assert b"407" in wrong.stdout.split(), (door, wrong)
        right = curl("--proxy-user", "alice:alice-secret", *proxy_options(door, server), url)
        assert (right.returncode, right.stdout) == (0, b"hello from the target\n"), (door, right.stderr)
    # SOCKS4 cannot log in: a server that requires a login refuses it.
    assert curl(*proxy_options("socks4", server), url).returncode == 97


def test_socks4_userid_names_the_user_only_when_trusted(socksflow_server, echo_target):
    rules = "rules:\n  - deny: {user: mallory}\n  - allow: all\n"
    request = b"\x04\x01" + echo_target[1].to_bytes(2, "big") + bytes((127, 0, 0, 1)) + b"mallory\0"
    for trusted, answer in ((False, 0x5A), (True, 0x5B)):
        server = socksflow_server(MIXED + rules + f"doors: {{socks4_userid: {str(trusted).lower()}}}\n")
        with socket.create_connection((server.host, server.port)) as raw:
            raw.sendall(request)
            assert raw.recv(8)[1] == answer


@pytest.mark.parametrize("proxy_type", ["socks4", "socks5", "http"])
def test_ncat_through_each_door(socksflow_server, echo_target, proxy_type):
    server = socksflow_server(MIXED)
    result = subprocess.run(
        [require_tool("ncat"), "--proxy", f"{server.host}:{server.port}", "--proxy-type", proxy_type,
         "127.0.0.1", str(echo_target[1])],
        input=b"hello through " + proxy_type.encode(), capture_output=True, timeout=20,
    )  # fmt: skip
    assert result.stdout == b"hello through " + proxy_type.encode(), result.stderr


@pytest.mark.parametrize(
    ("first_bytes", "answer"),
    [
        (b"\x00\x01\x02", b""),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32), b""),  # a TLS ClientHello
        (b"\xff" * 100, b""),
        (b"GARBAGE\r\n\r\n", b"HTTP/1.1 400 Bad Request\r\n"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 400 Bad Request\r\n"),  # not a proxy request
        (b"\x04\x07\x00\x50\x7f\x00\x00\x01\x00", REJECTED),  # SOCKS4 command 7
    ],
)
def test_garbage_closes_cleanly(socksflow_server, first_bytes, answer):
    server = socksflow_server(MIXED)
    with socket.create_connection((server.host, server.port)) as raw:
        raw.sendall(first_bytes)
        assert recv_all(raw).startswith(answer) if answer else recv_all(raw) == b""


def test_a_listener_refuses_the_protocols_it_does_not_serve(socksflow_server):
    server = socksflow_server("listen: [{address: 127.0.0.1:0, protocols: [socks4]}]\n")
    with socket.create_connection((server.host, server.port)) as raw:
        raw.sendall(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = recv_all(raw)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert answer.endswith(b"socksflow: this is a SOCKS4 proxy port, not an HTTP proxy.\n")
    with socket.create_connection((server.host, server.port)) as raw:
        raw.sendall(b"\x05\x01\x00")
        assert recv_all(raw) == b"\x05\xff"


def test_rules_can_tell_the_doors_apart(socksflow_server, http_target):
    rules = "rules:\n  - deny: {protocol: socks4}\n  - allow: all\n"
    server = socksflow_server(MIXED + rules)
    url = http_target.url("/")
    assert curl(*proxy_options("socks4", server), url).returncode == 97
    for door in ("socks5", "http", "http-connect"):
        result = curl(*proxy_options(door, server), url)
        assert (result.returncode, result.stdout) == (0, b"hello from the target\n"), door


def test_failed_http_logins_count_towards_the_auth_failures_throttle(socksflow_server, http_target, tmp_path):
    users = write_htpasswd(tmp_path / "users", {"alice": "alice-secret"})
    server = socksflow_server(
        MIXED + f"auth: {{methods: [userpass], users: {users}}}\n"
        "limits:\n  - {match: {from: 127.0.0.1}, auth_failures: {max: 2, within: 1m, block: 1m}}\n"
    )
    url = http_target.url("/")
    for _ in range(2):
        wrong = curl(
            "-w",
            STATUS,
            "-o",
            "/dev/null",
            "--proxy-user",
            "alice:wrong",
            *proxy_options("http", server),
            url,
        )
        assert wrong.stdout.split()[0] == b"407"
    blocked = curl("-w", STATUS, "--proxy-user", "alice:alice-secret", *proxy_options("http", server), url)
    assert blocked.returncode != 0 and b"hello" not in blocked.stdout  # blocked, right password or not


def test_socks4_bind_two_replies_then_relay(socksflow_server):
    server = socksflow_server(MIXED)
    with socket.create_connection((server.host, server.port), timeout=10) as client:
        client.sendall(
            b"\x04\x02\x00\x00" + bytes((127, 0, 0, 1)) + b"\0"
        )  # BIND, the peer will be 127.0.0.1
        first = recv_exactly(client, 8)
        assert first[:2] == b"\x00\x5a"
        bound = ("127.0.0.1", int.from_bytes(first[2:4], "big"))
        with socket.create_connection(bound, timeout=10) as peer:
            second = recv_exactly(client, 8)
            assert second[:2] == b"\x00\x5a" and second[4:] == bytes((127, 0, 0, 1))
            assert int.from_bytes(second[2:4], "big") == peer.getsockname()[1]
            peer.sendall(b"from the peer")
            assert recv_exactly(client, 13) == b"from the peer"
            client.sendall(b"to the peer")
            assert recv_exactly(peer, 11) == b"to the peer"


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def test_the_access_log_names_each_door(socksflow_server, tmp_path, echo_target):
    server = socksflow_server(MIXED + "log: {access: {format: json, file: access.log}}\n")
    port = echo_target[1].to_bytes(2, "big")
    for first_bytes in (b"\x04\x01" + port + bytes((127, 0, 0, 1)) + b"\0", b"\x07garbage", b"\x05\x01\x00"):
        with socket.create_connection((server.host, server.port)) as raw:
            raw.sendall(first_bytes)
            raw.recv(10)
    server.stop()
    lines = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    assert sorted(line["protocol"] for line in lines) == ["socks4", "socks5", "unknown"]


def test_an_ipv6_mixed_listener(socksflow_server, http_target_v6):
    server = socksflow_server("listen: [{address: '[::1]:0', protocols: mixed}]\n")
    proxy = f"[::1]:{server.port}"
    for door in (["-x", f"http://{proxy}"], ["-p", "-x", f"http://{proxy}"], ["--socks5", proxy]):
        result = curl(*door, http_target_v6.url("/"))
        assert (result.returncode, result.stdout) == (0, b"hello from the target\n"), (door, result.stderr)
