"""Listeners behind a load balancer (issue #16): the PROXY protocol header, before any SOCKS byte.

Real servers on loopback, a raw socket speaking for the balancer: the header's source is the
client for rules and the UDP source check; untrusted senders, missing and wrong headers are
closed before anything is answered; a LOCAL header (a health check) is closed cleanly.
"""

from __future__ import annotations

import socket

import pytest
from helpers import recv_all

from socksflow.protocol import Address, Reply
from socksflow.proxy_protocol import build_v1, build_v2
from socksflow.testing import SessionRecorder

GREETING = b"\x05\x01\x00"


def listener(versions: str = "v2", trusted: str = "127.0.0.1/32") -> str:
    return (
        f"listen: [{{address: 127.0.0.1:0, proxy_protocol: {versions}, trusted: [{trusted}]}}]\n"
        "rules: [{deny: {from: 127.0.0.3/32}}, {allow: all}]\n"
    )


def from_balancer(server, header: bytes, source: str = "127.0.0.1") -> socket.socket:  # type: ignore[no-untyped-def]
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect((server.host, server.port))
    sock.sendall(header)
    return sock


def client_at(ip: str, port: int = 40000) -> Address:
    return Address.parse(f"{ip}:{port}")


def connect_request(target: tuple[str, int]) -> bytes:
    host, port = target
    return b"\x05\x01\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big")


def closed_unanswered(sock: socket.socket) -> bool:
    """The server closed without sending a byte (a reset counts: nothing was read)."""
    try:
        return recv_all(sock) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("build", [build_v1, build_v2])
def test_the_header_source_is_the_client_for_rules(socksflow_server, echo_target, build):
    recorder = SessionRecorder()
    server = socksflow_server(listener("[v1, v2]"), plugins=[recorder])
    local = client_at("127.0.0.1", server.port)
    request = GREETING + connect_request(echo_target)
    with from_balancer(server, build(client_at("127.0.0.3"), local) + request) as denied:
        assert denied.recv(2) == b"\x05\x00"
        assert denied.recv(10)[:2] == bytes([5, Reply.NOT_ALLOWED])
    with from_balancer(server, build(client_at("127.0.0.2"), local) + request) as allowed:
        assert allowed.recv(2) == b"\x05\x00"
        assert allowed.recv(10)[:2] == bytes([5, Reply.SUCCEEDED])
        allowed.sendall(b"through the balancer")
        allowed.shutdown(socket.SHUT_WR)
        assert recv_all(allowed) == b"through the balancer"
    recorder.wait(2)
    assert sorted(str(session.client) for session in recorder.sessions) == [
        "127.0.0.2:40000",
        "127.0.0.3:40000",
    ]


def test_a_local_header_is_a_health_check_closed_cleanly(socksflow_server):
    recorder = SessionRecorder()
    server = socksflow_server(listener(), plugins=[recorder])
    with from_balancer(server, build_v2(None, None)) as check:
        assert recv_all(check) == b""  # FIN, not a reset, and no session
    with from_balancer(server, build_v2(client_at("127.0.0.2"), client_at("127.0.0.1")) + GREETING) as real:
        assert real.recv(2) == b"\x05\x00"
    recorder.wait(1)
    assert len(recorder.sessions) == 1


@pytest.mark.parametrize(
    ("trusted", "header"),
    [
        ("127.0.0.9/32", build_v2(client_at("127.0.0.2"), client_at("127.0.0.1")) + GREETING),  # untrusted
        ("127.0.0.1/32", GREETING),  # no header: never read as SOCKS
        ("127.0.0.1/32", build_v1(client_at("127.0.0.2"), client_at("127.0.0.1")) + GREETING),  # v1 on v2
        ("127.0.0.1/32", b"PROXY TCP4 127.0.0.2 127.0.0.1 40000\r\n" + GREETING),  # malformed
    ],
    ids=["untrusted-sender", "no-header", "v1-on-v2-listener", "malformed"],
)
def test_refused_before_any_socks_byte(socksflow_server, caplog, trusted, header):
    recorder = SessionRecorder()
    server = socksflow_server(listener(trusted=trusted), plugins=[recorder])
    with from_balancer(server, header) as sock:
        assert closed_unanswered(sock)
        port = sock.getsockname()[1]
    assert recorder.sessions == []
    assert f"refused 127.0.0.1:{port}: " in caplog.text  # the operator sees who and why


def test_an_incomplete_header_times_out(socksflow_server):
    server = socksflow_server(listener() + "timeouts: {handshake: 300ms}\n")
    header = build_v2(client_at("127.0.0.2"), client_at("127.0.0.1"))
    with from_balancer(server, header[:20]) as sock:
        assert closed_unanswered(sock)


def test_udp_datagrams_are_admitted_from_the_header_source(socksflow_server, tmp_path):
    server = socksflow_server(listener())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as target:
        target.bind(("127.0.0.1", 0))
        target.settimeout(10)
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as real,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as balancer_host,
        ):
            real.bind(("127.0.0.2", 0))
            balancer_host.bind(("127.0.0.1", 0))
            source = client_at("127.0.0.2", real.getsockname()[1])
            associate = b"\x05\x03\x00\x01" + socket.inet_aton("0.0.0.0") + b"\x00\x00"
            header = build_v2(source, client_at("127.0.0.1", server.port))
            with from_balancer(server, header + GREETING + associate) as control:
                assert control.recv(2) == b"\x05\x00"
                reply = control.recv(10)
                assert reply[:2] == bytes([5, Reply.SUCCEEDED])
                relay = (socket.inet_ntoa(reply[4:8]), int.from_bytes(reply[8:10], "big"))
                udp_header = b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1")
                udp_header += target.getsockname()[1].to_bytes(2, "big")
                balancer_host.sendto(udp_header + b"from the balancer's host", relay)  # not the client
                real.sendto(udp_header + b"from the client", relay)
                assert target.recvfrom(100)[0] == b"from the client"
                target.settimeout(0.5)
                with pytest.raises(TimeoutError):
                    target.recvfrom(100)
