"""BIND end to end: a raw client, real peers connecting from loopback addresses."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import time

import pytest

from socksflow import Address, Verdict, hookimpl
from socksflow.config import Config
from socksflow.errors import ConfigErrors
from socksflow.protocol import Command, Reply
from socksflow.testing import Socks5Client, StaticResolver, wait_until

WAIT = 3.0


def bind(server, expected: str) -> tuple[Socks5Client, int, Address]:
    """Greet and send BIND; return the client and the first reply."""
    client = Socks5Client(server.address, timeout=WAIT)
    assert client.greet() == 0
    code, bound = client.request(Command.BIND, expected)
    return client, code, bound


def peer_from(source: str, target: Address, port: int = 0) -> socket.socket:
    """A TCP connection to ``target`` from ``source``:``port``."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.bind((source, port))
    sock.connect((str(target.host), target.port))
    return sock


def assert_refused(sock: socket.socket) -> None:
    """The proxy accepted this connection and closed it without a byte."""
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(1) == b""
    sock.close()


def sessions(server) -> int:
    return server.call(lambda: len(server.server.sessions))


def listening(address: Address) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex((str(address.host), address.port)) == 0


def relay_both_ways(client: Socks5Client, peer: socket.socket) -> None:
    client.sock.sendall(b"from the client")
    assert peer.recv(100) == b"from the client"
    peer.sendall(b"from the peer")
    assert client.recv_exactly(13) == b"from the peer"


# ---------------------------------------------------------------------------- the exchange


def test_two_replies_and_data_both_ways(socksflow_server):
    server = socksflow_server(autoload=False)
    client, code, bound = bind(server, "127.0.0.1:0")
    assert code == Reply.SUCCEEDED
    assert bound.host == ipaddress.ip_address("127.0.0.1") and bound.port != 0
    with peer_from("127.0.0.1", bound) as peer:
        assert client.read_reply() == (Reply.SUCCEEDED, Address.from_sockaddr(peer.getsockname()))
        relay_both_ways(client, peer)
        assert not listening(bound)  # exactly one connection: the listener is gone
        peer.shutdown(socket.SHUT_WR)  # half-close is relayed as for CONNECT
        assert client.sock.recv(1) == b""
        client.sock.sendall(b"still open")
        assert peer.recv(100) == b"still open"
    client.close()
    assert wait_until(lambda: sessions(server) == 0)


def test_exact_reply_bytes(socksflow_server):
    server = socksflow_server(autoload=False)
    with Socks5Client(server.address, timeout=WAIT) as client:
        client.greet()
        client.sock.sendall(b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x00")
        first = client.recv_exactly(10)
        port = int.from_bytes(first[8:10], "big")
        assert first[:8] == b"\x05\x00\x00\x01\x7f\x00\x00\x01" and port
        with peer_from("127.0.0.1", Address(ipaddress.ip_address("127.0.0.1"), port)) as peer:
            peer_port = peer.getsockname()[1].to_bytes(2, "big")
            assert client.recv_exactly(10) == b"\x05\x00\x00\x01\x7f\x00\x00\x01" + peer_port


def test_wrong_peer_is_refused_and_the_wait_goes_on(socksflow_server):
    server = socksflow_server(autoload=False)
    client, code, bound = bind(server, "127.0.0.1:0")
    assert code == Reply.SUCCEEDED
    assert_refused(peer_from("127.0.0.2", bound))
    with peer_from("127.0.0.1", bound) as peer:
        assert client.read_reply() == (Reply.SUCCEEDED, Address.from_sockaddr(peer.getsockname()))
        relay_both_ways(client, peer)
    client.close()


def test_strict_check_includes_the_port(socksflow_server):
    server = socksflow_server("bind: {peer_check: strict}\n", autoload=False)
    expected = socket.socket()
    expected.settimeout(WAIT)
    expected.bind(("127.0.0.1", 0))
    port = expected.getsockname()[1]
    client, code, bound = bind(server, f"127.0.0.1:{port}")
    assert code == Reply.SUCCEEDED
    assert_refused(peer_from("127.0.0.1", bound))  # right IP, other port
    expected.connect((str(bound.host), bound.port))
    with expected:
        assert client.read_reply() == (Reply.SUCCEEDED, Address.parse(f"127.0.0.1:{port}"))
        relay_both_ways(client, expected)
    client.close()


def test_ip_check_ignores_the_port(socksflow_server):
    """DST.PORT is often the client's own control port (FTP): the default checks the IP only."""
    server = socksflow_server(autoload=False)
    client, _, bound = bind(server, "127.0.0.1:21")
    with peer_from("127.0.0.1", bound) as peer:
        assert client.read_reply()[0] == Reply.SUCCEEDED
        relay_both_ways(client, peer)
    client.close()


@pytest.mark.parametrize(
    ("config", "expected"), [("bind: {peer_check: any}\n", "127.0.0.1:0"), ("", "0.0.0.0:0")]
)
def test_any_peer_when_configured_or_when_the_request_names_none(socksflow_server, config, expected):
    server = socksflow_server(config, autoload=False)
    client, _, bound = bind(server, expected)
    with peer_from("127.0.0.2", bound) as peer:
        assert client.read_reply() == (Reply.SUCCEEDED, Address.from_sockaddr(peer.getsockname()))
        relay_both_ways(client, peer)
    client.close()


def test_expected_peer_named_by_domain(socksflow_server):
    server = socksflow_server(plugins=[StaticResolver({"peer.test": ["127.0.0.1"]})], autoload=False)
    client, code, bound = bind(server, "peer.test:0")
    assert code == Reply.SUCCEEDED
    assert_refused(peer_from("127.0.0.2", bound))
    with peer_from("127.0.0.1", bound):
        assert client.read_reply()[0] == Reply.SUCCEEDED
    client.close()
    _, code, _ = bind(server, "nowhere.test:0")
    assert code == Reply.HOST_UNREACHABLE  # no first success reply for a peer that cannot exist


def test_timeout_sends_ttl_expired_and_closes(socksflow_server):
    server = socksflow_server("bind: {timeout: 300ms}\n", autoload=False)
    client, code, bound = bind(server, "127.0.0.1:0")
    assert code == Reply.SUCCEEDED
    began = time.monotonic()
    assert client.recv_exactly(10) == b"\x05\x06\x00\x01" + bytes(6)
    assert 0.25 < time.monotonic() - began < WAIT
    assert client.sock.recv(1) == b""
    assert not listening(bound)
    client.close()
    assert wait_until(lambda: sessions(server) == 0)


def test_client_leaving_ends_the_wait(socksflow_server):
    server = socksflow_server(autoload=False)
    client, _, bound = bind(server, "127.0.0.1:0")
    client.close()
    assert wait_until(lambda: sessions(server) == 0)
    assert not listening(bound)


def test_server_shutdown_ends_the_wait(socksflow_server):
    server = socksflow_server(autoload=False)
    client, _, bound = bind(server, "127.0.0.1:0")
    server.stop()
    assert client.sock.recv(1) == b""
    assert not listening(bound)
    client.close()


def test_ipv6(socksflow_server):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    server = socksflow_server("listen: ['[::1]:0']\n", autoload=False)
    client, code, bound = bind(server, "[::1]:0")
    assert (code, str(bound.host)) == (Reply.SUCCEEDED, "::1")
    with peer_from("::1", bound) as peer:
        assert client.read_reply() == (Reply.SUCCEEDED, Address.from_sockaddr(peer.getsockname()))
        relay_both_ways(client, peer)
    client.close()


# ---------------------------------------------------------------------------- plugins and settings


def test_bind_hook_chooses_the_address_or_refuses(socksflow_server):
    class Where:
        @hookimpl
        def socksflow_bind(self, session):
            if session.destination.port == 666:
                return Verdict.deny("no BIND for you")
            return Address(ipaddress.ip_address("127.0.0.3"), 0)

    server = socksflow_server(plugins=[Where()], autoload=False)
    client, code, bound = bind(server, "127.0.0.1:666")
    assert code == Reply.NOT_ALLOWED
    client.close()
    client, code, bound = bind(server, "127.0.0.1:0")
    assert (code, str(bound.host)) == (Reply.SUCCEEDED, "127.0.0.3")
    with peer_from("127.0.0.1", bound) as peer:
        assert client.read_reply()[0] == Reply.SUCCEEDED
        relay_both_ways(client, peer)
    client.close()


def test_bind_peer_hook_refuses_then_accepts(socksflow_server):
    seen = []

    class Gate:
        @hookimpl
        def socksflow_bind_peer(self, peer):
            seen.append(peer)
            return Verdict.deny("first one is a scanner") if len(seen) == 1 else None

    server = socksflow_server(plugins=[Gate()], autoload=False)
    client, _, bound = bind(server, "127.0.0.1:0")
    assert_refused(peer_from("127.0.0.1", bound))
    with peer_from("127.0.0.1", bound) as peer:
        assert client.read_reply() == (Reply.SUCCEEDED, Address.from_sockaddr(peer.getsockname()))
    assert len(seen) == 2
    client.close()


def test_bind_peer_hook_failure_fails_closed(socksflow_server):
    class Broken:
        @hookimpl
        def socksflow_bind_peer(self, peer):
            raise RuntimeError("plugin bug")

    server = socksflow_server(plugins=[Broken()], autoload=False)
    client, _, bound = bind(server, "127.0.0.1:0")
    with peer_from("127.0.0.1", bound) as peer:
        assert client.read_reply()[0] == Reply.GENERAL_FAILURE
        assert_refused(peer)
    client.close()


def test_advertised_address(socksflow_server):
    server = socksflow_server("bind: {advertise: 192.0.2.9}\n", autoload=False)
    client, code, bound = bind(server, "0.0.0.0:0")
    assert (code, str(bound.host)) == (Reply.SUCCEEDED, "192.0.2.9")
    with peer_from("127.0.0.1", Address(ipaddress.ip_address("127.0.0.1"), bound.port)):
        assert client.read_reply()[0] == Reply.SUCCEEDED
    client.close()


def test_config():
    assert Config.from_text("").bind.timeout == 30.0
    assert Config.from_text("").bind.peer_check == "ip"
    config = Config.from_text("bind:\n  peer_check: exact\n  timeout: -1\n", "x.yaml")
    with pytest.raises(ConfigErrors) as info:
        config.raise_errors()
    assert str(info.value).splitlines() == [
        "x.yaml:2: bind.peer_check: 'exact' is not one of: strict, ip, any",
        "x.yaml:3: bind.timeout: -1 is negative",
    ]
