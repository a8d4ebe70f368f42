"""Regression tests for the defects other SOCKS servers shipped, and socksflow's secure defaults.

Each pitfall of ``research/anchors.md`` §3 maps to the test that proves socksflow does not have
it.  Tests named here live in this module unless a file is given; where another suite already
pins the behaviour down, it is named instead of copied.

| §3 | pitfall (who had it) | test |
|---|---|---|
| 1 | a method the client did not offer is chosen; no ``05 FF`` (gost, mihomo, ssh -D) | ``test_only_an_offered_method_is_chosen`` |
| 2 | the request is served after a failed RFC 1929 check (sing, CVE-2023-43644) | ``test_request_after_a_failed_login_never_reaches_the_target``; ``test_engine_e2e.py::test_failed_login_closes_even_with_a_pipelined_request`` |
| 3 | RFC 1929 VER unchecked (Xray, mihomo, aioss); empty lengths; non-UTF-8 credentials | ``test_subnegotiation_version_and_odd_credentials`` |
| 4 | an empty stored password accepts any password (gost) | ``test_empty_password_never_matches`` |
| 5 | authentication cached by client IP (pproxy) | ``test_no_authentication_is_cached_by_address`` |
| 6 | GSSAPI-only clients get no ``05 FF`` | ``test_only_an_offered_method_is_chosen`` (``[0x01]``) |
| 7 | success replied before the dial (pproxy, mihomo, Xray, ssh -D) | ``test_no_success_reply_before_the_dial_succeeds``; ``test_engine_e2e.py::test_failure_reply_codes`` |
| 8 | BND.ADDR 0.0.0.0 or the listener's address (mitmproxy, ssh -D, mihomo) | ``test_connect_reply_names_the_outbound_socket``; ``test_engine_e2e.py::test_success_reply_carries_the_outbound_local_address`` |
| 9 | reading on after a failure reply | ``test_failure_reply_is_followed_by_a_close`` |
| 10 | bytes sent with the request lost | ``test_engine_e2e.py::test_pipelined_handshake_keeps_optimistic_data`` |
| 11 | IP rules bypassed by a name: ``localhost``, ``"127.0.0.1"`` as ATYP 0x03 (3proxy, gost) | ``test_ip_rules_hold_for_names_and_ip_literals_sent_as_names`` |
| 12 | a second look-up after the check (DNS rebinding) | ``test_acl_e2e.py::test_only_the_checked_addresses_are_dialled`` |
| 13 | incomplete forbidden sets (``::ffff:127.0.0.1``, ``0.0.0.0``, metadata) | ``test_acl_e2e.py::test_raw_ipv6_forms_of_local_addresses_are_denied``; ``test_ip_rules_hold_for_names_and_ip_literals_sent_as_names``; the shipped ``rules.yaml`` tests (``test_cli.py``) |
| 14 | no half-close (aioss) | ``test_engine_e2e.py::test_half_close_is_relayed`` |
| 15 | no handshake timeout: slowloris (aioss) | ``test_hardening_hostile.py::test_slowloris_is_closed_at_the_handshake_deadline`` |
| 16 | the UDP ASSOCIATE address routed as a destination (sing-box, 3proxy) | ``test_udp_associate_address_is_not_a_destination``; ``test_udp.py::test_the_request_address_is_the_clients_source_not_a_destination`` |
| 17 | a wildcard UDP relay address (txthinking/socks5, clash) | ``test_relay_addresses_are_never_wildcards`` |
| 18 | an open UDP relay: datagrams from anyone (aioss, meow-rs) | ``test_udp.py::test_datagrams_from_another_ip_are_dropped``, ``::test_datagrams_from_another_port_are_dropped``, ``::test_declared_port_is_enforced_from_the_first_datagram`` |
| 19 | only the first datagram authorized (aioss) | ``test_udp.py::test_each_datagram_to_a_known_destination_gets_its_own_verdict``; ``test_acl_e2e.py::test_udp_association_and_each_datagram`` |
| 20 | associations outlive their control connection (hysteria, meow-rs) | ``test_udp.py::test_association_ends_with_its_control_connection``, ``::test_idle_association_closes_its_control_connection``, ``::test_associations_per_client_are_capped`` |
| 21 | FRAG != 0 relayed; headers sliced unchecked (aioss 0.3.0) | ``test_udp.py::test_fragments_and_malformed_headers_are_dropped``; ``fuzz/targets.py::udp_header`` |
| 22 | domain sources in UDP replies; hostnames passed to ``sendto`` (gost, aioss) | ``test_udp.py::test_domain_destination_resolves_through_the_hook_and_replies_carry_the_ip`` |
| 23 | BIND: one reply only, no peer check | ``test_bind.py::test_two_replies_and_data_both_ways``, ``::test_wrong_peer_is_refused_and_the_wait_goes_on`` |
| 24 | Tor RESOLVE 0xF0/0xF1 treated as CONNECT (Xray) | ``test_unknown_commands_reach_nothing`` |
| 25 | private commands (gost MBIND 0xF2, UDP-TUN 0xF3) | ``test_unknown_commands_reach_nothing`` |
| 26 | SOCKS over TLS, HTTP on the SOCKS port | ``test_other_protocols_are_closed_without_an_answer`` |
| 27 | SOCKS6 | ``test_other_protocols_are_closed_without_an_answer`` |
| 28 | a PROXY protocol header accepted from anyone (gost) | ``test_other_protocols_are_closed_without_an_answer`` |

Secure defaults (issue 8): an open proxy on a non-loopback address is refused
(``test_open_proxy_is_refused_on_a_reachable_address`` and the tests after it), no credential
is ever logged (``test_no_credential_is_ever_logged``), a world-readable users file is reported
(``test_world_readable_users_file_is_reported``), and the shipped ``rules.yaml`` denies the safe
destinations (``test_cli.py``'s shipped-rules tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from hardening import server_process_fixture  # noqa: F401 - a fixture
from helpers import recv_all, write_htpasswd
from test_cli import socksflow_cmd

import socksflow
from socksflow import Command, Method, Reply, detect, hookimpl
from socksflow.protocol import Address, build_request
from socksflow.testing import Socks5Client, sockaddr, wrap_datagram

PASSWORD = "correct horse"
SECRET = "hunter2-Zq9-never-logged"  # a wrong password that must appear in no log line


class WatchedTarget:
    """A TCP server on loopback that records every connection it accepts and echoes."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[tuple[str, int]] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.listener.accept()
            except OSError:
                return
            self.accepted.append(peer)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(5)


@pytest.fixture
def target() -> Iterator[WatchedTarget]:
    watched = WatchedTarget()
    yield watched
    watched.close()


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return write_htpasswd(tmp_path / "users.htpasswd", {"alice": PASSWORD, "empty": ""})


def connect_request(host: str, port: int) -> bytes:
    return build_request(Command.CONNECT, Address(socksflow.protocol.parse_host(host), port))


# ---------------------------------------------------------------------------- §3.1–6: methods and authentication


@pytest.mark.parametrize(
    ("methods", "offered", "answer"),
    [
        ("[userpass]", [Method.NO_AUTH], b"\x05\xff"),
        ("[none]", [Method.USERPASS], b"\x05\xff"),
        ("[userpass]", [Method.GSSAPI], b"\x05\xff"),
        ("[none]", [Method.GSSAPI, 0x80, 0xFE], b"\x05\xff"),
        ("[userpass, none]", [Method.NO_AUTH], b"\x05\x00"),
        ("[userpass, none]", [Method.NO_AUTH, Method.USERPASS], b"\x05\x02"),
    ],
)
def test_only_an_offered_method_is_chosen(socksflow_server, users, methods, offered, answer):
    server = socksflow_server(f"auth: {{methods: {methods}, users: {users}}}\n")
    with Socks5Client(server.address) as client:
        client.sock.sendall(bytes((5, len(offered), *offered)))
        if answer == b"\x05\xff":
            assert recv_all(client.sock) == answer  # and the server closes
        else:
            assert client.recv_exactly(2) == answer


def test_a_plugin_choosing_an_unoffered_method_fails_closed(socksflow_server):
    class Pushy:
        @hookimpl
        def socksflow_select_method(self):
            return Method.USERPASS

    server = socksflow_server(plugins=[Pushy()])
    with Socks5Client(server.address) as client:
        client.sock.sendall(b"\x05\x01\x00")
        assert recv_all(client.sock) == b"\x05\xff"


def test_request_after_a_failed_login_never_reaches_the_target(socksflow_server, users, target):
    server = socksflow_server(f"auth: {{methods: [userpass], users: {users}}}\n")
    request = connect_request("127.0.0.1", target.port)
    for login in (b"\x01\x05alice\x05wrong", b"\x01\x05alice\x00", b"\x01\x07mallory\x05wrong"):
        with Socks5Client(server.address) as client:
            client.sock.sendall(b"\x05\x01\x02" + login + request + b"GET / HTTP/1.0\r\n\r\n")
            assert recv_all(client.sock) == b"\x05\x02\x01\x01"
    with Socks5Client(server.address) as client:  # the same request after a good login does connect
        client.sock.sendall(b"\x05\x01\x02" + b"\x01\x05alice\x0dcorrect horse" + request + b"ping")
        assert client.recv_exactly(4) == b"\x05\x02\x01\x00"
        code, _ = client.read_reply()
        assert code == Reply.SUCCEEDED
        assert client.recv_exactly(4) == b"ping"
    assert len(target.accepted) == 1


@pytest.mark.parametrize(
    "message",
    [
        b"\x05\x05alice\x0dcorrect horse",  # RFC 1929 VER must be 0x01, not the SOCKS version
        b"\x00\x05alice\x0dcorrect horse",
        b"\x01\x00\x0dcorrect horse",  # ULEN 0
        b"\x01\x05alice\x00",  # PLEN 0
        b"\x01\x04\xff\xfe\x80\x00\x0dcorrect horse",  # a username that is not UTF-8
        b"\x01\xff" + b"a" * 255 + b"\xff" + b"b" * 255,  # the longest message RFC 1929 allows
    ],
)
def test_subnegotiation_version_and_odd_credentials(socksflow_server, users, target, caplog, message):
    server = socksflow_server(f"auth: {{methods: [userpass], users: {users}}}\n")
    with Socks5Client(server.address) as client:
        client.sock.sendall(b"\x05\x01\x02" + message + connect_request("127.0.0.1", target.port))
        assert recv_all(client.sock) == b"\x05\x02\x01\x01"
    assert not target.accepted
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


@pytest.mark.parametrize("sent", ["", "anything", PASSWORD])
def test_empty_password_never_matches(socksflow_server, users, sent):
    """User ``empty`` is stored with the bcrypt hash of an empty password: nothing logs it in."""
    server = socksflow_server(f"auth: {{methods: [userpass], users: {users}}}\n")
    with Socks5Client(server.address) as client:
        assert client.greet([Method.USERPASS]) == Method.USERPASS
        assert client.login("empty", sent) == 1
        assert recv_all(client.sock) == b""


def test_no_authentication_is_cached_by_address(socksflow_server, users, target):
    server = socksflow_server(f"auth: {{methods: [userpass], users: {users}}}\n")
    with Socks5Client(server.address) as client:  # alice logs in from 127.0.0.1 ...
        client.greet([Method.USERPASS])
        assert client.login("alice", PASSWORD) == 0
        assert client.connect(f"127.0.0.1:{target.port}")[0] == Reply.SUCCEEDED
        with Socks5Client(server.address) as second:  # ... which lets nobody else from there in
            second.sock.sendall(b"\x05\x01\x00" + connect_request("127.0.0.1", target.port))
            assert recv_all(second.sock) == b"\x05\xff"
        with Socks5Client(server.address) as third:
            third.greet([Method.USERPASS])
            assert third.login("alice", "not the password") == 1
    assert len(target.accepted) == 1


# ---------------------------------------------------------------------------- §3.7–11: requests and replies


class SlowDial:
    """Holds the dial for a while, then lets the core dial (which the test makes fail)."""

    def __init__(self) -> None:
        self.started = threading.Event()

    @hookimpl
    async def socksflow_open_connection(self):
        self.started.set()
        await asyncio.sleep(0.5)


def test_no_success_reply_before_the_dial_succeeds(socksflow_server, refusing_port):
    dial = SlowDial()
    server = socksflow_server(plugins=[dial])
    with Socks5Client(server.address) as client:
        client.sock.sendall(b"\x05\x01\x00" + connect_request("127.0.0.1", refusing_port))
        assert client.recv_exactly(2) == b"\x05\x00"
        assert dial.started.wait(5)
        client.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):  # nothing while the dial is under way
            client.sock.recv(1)
        assert recv_all(client.sock) == b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"  # refused, then closed


@pytest.mark.parametrize("family", ["ipv4", "ipv6", "name"])
def test_connect_reply_names_the_outbound_socket(socksflow_server, family):
    if family == "ipv6" and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    host = "::1" if family == "ipv6" else "127.0.0.1"
    listener = socket.create_server((host, 0), family=socket.AF_INET6 if family == "ipv6" else socket.AF_INET)
    port = listener.getsockname()[1]
    server = socksflow_server()
    with Socks5Client(server.address) as client, listener:
        client.greet()
        code, bound = client.connect(
            Address("localhost" if family == "name" else ipaddress.ip_address(host), port)
        )
        peer, peer_address = listener.accept()
        assert code == Reply.SUCCEEDED
        assert not bound.host.is_unspecified and bound.port != 0
        assert (str(bound.host), bound.port) == peer_address[:2]
        assert bound != server.address  # not the listener's address either
        peer.close()


def test_failure_reply_is_followed_by_a_close(socksflow_server, refusing_port):
    server = socksflow_server()
    with Socks5Client(server.address) as client:
        client.sock.sendall(b"\x05\x01\x00" + connect_request("127.0.0.1", refusing_port) + b"x" * 100_000)
        started = time.monotonic()
        assert recv_all(client.sock) == b"\x05\x00\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"
        assert time.monotonic() - started < 10  # RFC 1928 §6: close within 10 s


class Names:
    """Names that resolve to this machine, as a rebinding attacker's DNS would answer."""

    TABLE: ClassVar[dict[str, str]] = {"rebind.test": "127.0.0.1", "v6.rebind.test": "::1", "mapped.rebind.test": "::ffff:127.0.0.1",
             "zero.rebind.test": "0.0.0.0", "metadata.test": "169.254.169.254"}  # fmt: skip

    @hookimpl
    def socksflow_resolve(self, host: str):
        answer = self.TABLE.get(host)
        return None if answer is None else [ipaddress.ip_address(answer)]


@pytest.mark.parametrize(
    "name",
    [
        "localhost", "LOCALHOST.", "127.0.0.1", "127.0.0.1.", "::1", "::ffff:127.0.0.1", "0.0.0.0",
        "2130706433", "0x7f.1", "127.1",  # what inet_aton (the system resolver) reads as 127.0.0.1
        "rebind.test", "v6.rebind.test", "mapped.rebind.test", "zero.rebind.test", "metadata.test",
    ],
)  # fmt: skip
def test_ip_rules_hold_for_names_and_ip_literals_sent_as_names(socksflow_server, target, name):
    rules = "rules:\n  - deny: {to: [special:loopback, special:link-local]}\n  - allow: all\n"
    server = socksflow_server(rules, plugins=[Names()])
    raw = name.encode()
    request = b"\x05\x01\x00\x03" + bytes((len(raw),)) + raw + struct.pack("!H", target.port)  # ATYP 0x03
    with Socks5Client(server.address) as client:
        client.sock.sendall(b"\x05\x01\x00" + request)
        assert recv_all(client.sock) == b"\x05\x00\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00"  # not allowed
    assert not target.accepted


@pytest.mark.parametrize("command", [0xF0, 0xF1, 0xF2, 0xF3, 0x00, 0x04, 0xFF])
def test_unknown_commands_reach_nothing(socksflow_server, target, command):
    server = socksflow_server()
    request = bytes((5, command, 0, 1, 127, 0, 0, 1)) + struct.pack("!H", target.port)
    with Socks5Client(server.address) as client:
        client.sock.sendall(b"\x05\x01\x00" + request)
        assert recv_all(client.sock) == b"\x05\x00\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00"
    assert not target.accepted


SOCKS4_REJECTED = b"\x00\x5b\x00\x00\x00\x00\x00\x00"
NOT_HTTP = detect.refusal(detect.HTTP)


@pytest.mark.parametrize(
    ("first_bytes", "answer"),
    [
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01alice\x00", SOCKS4_REJECTED),  # SOCKS4
        (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00localhost\x00", SOCKS4_REJECTED),  # SOCKS4a
        (b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", NOT_HTTP),  # HTTP on the SOCKS port
        (b"CONNECT 127.0.0.1:80 HTTP/1.1\r\n\r\n", NOT_HTTP),
        (b"PROXY TCP4 192.0.2.1 127.0.0.1 4000 1080\r\n\x05\x01\x00", NOT_HTTP),  # PROXY v1 reads as HTTP
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32), b""),  # a TLS ClientHello
        (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c", b""),  # PROXY protocol v2
        (b"\x06\x00\x00\x00", b""),  # SOCKS6
    ],
)
def test_other_protocols_get_their_own_no(socksflow_server, first_bytes, answer):
    """A SOCKS5-only port answers SOCKS4 and HTTP clients in their protocol (as Tor does), then closes."""
    server = socksflow_server()
    with Socks5Client(server.address) as client:
        client.sock.sendall(first_bytes)
        assert recv_all(client.sock) == answer


# ---------------------------------------------------------------------------- §3.16–17: UDP and BIND addresses


def test_udp_associate_address_is_not_a_destination(socksflow_server):
    """The request names the client's own (loopback) source: rules on destinations do not apply to it."""
    rules = "rules:\n  - deny: {to: [special:loopback], command: [udp]}\n  - allow: all\n"
    server = socksflow_server(rules)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, Socks5Client(server.address) as client:
        udp.bind(("127.0.0.1", 0))
        client.greet()
        code, relay = client.udp_associate(f"127.0.0.1:{udp.getsockname()[1]}")
        assert code == Reply.SUCCEEDED
        assert str(relay.host) == "127.0.0.1" and relay.port != 0


def test_relay_addresses_are_never_wildcards(socksflow_server, users):
    """Listening on 0.0.0.0 (port 0, reached only through 127.0.0.1): replies carry 127.0.0.1."""
    server = socksflow_server(
        f"listen: [0.0.0.0:0]\nauth: {{methods: [userpass], users: {users}}}\n"  # exposed: require a login
    )
    proxy = ("127.0.0.1", server.port)
    with socket.create_server(("127.0.0.1", 0)) as listener, Socks5Client(proxy) as client:
        client.greet([Method.USERPASS])
        assert client.login("alice", PASSWORD) == 0
        code, bound = client.connect(f"127.0.0.1:{listener.getsockname()[1]}")
        assert (code, str(bound.host)) == (Reply.SUCCEEDED, "127.0.0.1")
        listener.accept()[0].close()
    with Socks5Client(proxy) as client:
        client.greet([Method.USERPASS])
        client.login("alice", PASSWORD)
        code, relay = client.udp_associate()
        assert (code, str(relay.host)) == (Reply.SUCCEEDED, "127.0.0.1")
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as echo,
        ):
            echo.bind(("127.0.0.1", 0))
            udp.settimeout(5)
            udp.sendto(wrap_datagram(f"127.0.0.1:{echo.getsockname()[1]}", b"ping"), sockaddr(relay))
            echo.settimeout(5)
            assert echo.recvfrom(100)[0] == b"ping"
    with Socks5Client(proxy) as client:
        client.greet([Method.USERPASS])
        client.login("alice", PASSWORD)
        code, listening = client.bind()
        assert (code, str(listening.host)) == (Reply.SUCCEEDED, "127.0.0.1")


# ---------------------------------------------------------------------------- secure defaults


def refused_start(directory: Path, rules: str, *args: str) -> subprocess.CompletedProcess[str]:
    (directory / "rules.yaml").write_text(rules)
    return socksflow_cmd("run", "--listen", "0.0.0.0:0", *args, cwd=directory)


@pytest.mark.parametrize("rules", ["auth: {methods: [none]}\n", "rules:\n  - allow: {from: [0.0.0.0/0]}\n"])
def test_open_proxy_is_refused_on_a_reachable_address(tmp_path, rules):
    result = refused_start(tmp_path, rules)
    assert result.returncode == 1
    assert result.stdout == ""  # it never listened
    assert (
        "socksflow: refusing to serve 0.0.0.0:0 as an open proxy: other hosts can reach it" in result.stderr
    )
    assert "--allow-open-proxy" in result.stderr


@pytest.mark.parametrize(
    ("rules", "args", "logged"),
    [
        ("auth: {methods: [userpass], users: users}\n", (), "kept out by: auth: every client must log in"),
        ("rules:\n  - allow: {from: [127.0.0.0/8, 10.0.0.0/8, 'fd00::/8']}\n  - allow: {user: alice}\n", (),
         "kept out by: rules: every allow rule names users or groups, or clients on local networks only"),
        ("auth: {methods: [none]}\n", ("--allow-open-proxy",), "serves anyone who reaches it: an open proxy"),
        ("listen: {open_proxy: true}\n", (), "serves anyone who reaches it: an open proxy"),
    ],
)  # fmt: skip
def test_reachable_address_is_served_when_something_keeps_strangers_out(
    server_process, tmp_path, rules, args, logged
):
    write_htpasswd(tmp_path / "users", {"alice": PASSWORD})
    proxy = server_process(rules, *args, listen="0.0.0.0:0")
    host, port = proxy.address
    assert host == "0.0.0.0"
    with Socks5Client(("127.0.0.1", port)) as client:  # reached through loopback only
        assert client.greet([Method.USERPASS, Method.NO_AUTH]) in (Method.USERPASS, Method.NO_AUTH)
    assert proxy.stop() == 0
    assert logged in proxy.stderr


@pytest.mark.parametrize("listen", ["127.0.0.2:0", "[::1]:0"])
def test_loopback_addresses_need_no_guard(server_process, listen):
    if listen.startswith("[") and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    proxy = server_process("auth: {methods: [none]}\n", listen=listen)
    assert proxy.address[0].strip("[]") == Address.parse(listen).host.compressed
    assert proxy.stop() == 0
    assert "open proxy" not in proxy.stderr


def test_a_failing_exposure_hook_refuses_the_start(tmp_path):
    (tmp_path / "unsure.py").write_text(
        "def socksflow_exposure(config):\n    raise RuntimeError('cannot tell')\n"
    )
    result = refused_start(tmp_path, "plugins: {paths: [unsure.py]}\nauth: {methods: [none]}\n")
    assert result.returncode == 1
    assert "cannot tell who may use the proxy: plugin 'unsure' failed in socksflow_exposure" in result.stderr


def test_check_warns_about_an_open_proxy(tmp_path):
    (tmp_path / "rules.yaml").write_text("listen: [0.0.0.0:1080]\nauth: {methods: [none]}\n")
    result = socksflow_cmd("check", cwd=tmp_path)
    assert result.returncode == 0
    assert "warning: refusing to serve 0.0.0.0:1080 as an open proxy" in result.stderr


def test_no_credential_is_ever_logged(server_process, tmp_path, target):
    """Every log line of a run with failed, good and malformed logins, at debug level, access log on."""
    write_htpasswd(tmp_path / "users", {"alice": PASSWORD})
    rules = (
        "auth: {methods: [userpass], users: users}\n"
        "limits: [{auth_failures: {max: 3, within: 1m, block: 1m}}]\n"
        "log: {access: {format: json, file: access.log}}\n"
    )
    proxy = server_process(rules, log_level="debug")
    request = connect_request("127.0.0.1", target.port)
    logins = [  # the third failed check blocks the address: a log line of its own
        b"\x01\x05alice" + bytes((len(SECRET) * 5,)) + SECRET.encode() * 5,  # longer than bcrypt reads
        b"\x01\x05alice" + bytes((len(SECRET),)) + SECRET.encode(),
        b"\x05\x05alice" + bytes((len(SECRET),)) + SECRET.encode(),  # wrong VER
        b"\x01\x05alice" + bytes((len(SECRET) + 1,)) + SECRET.encode() + b"!",
    ]
    for login in logins:
        with Socks5Client(proxy.address) as client:
            client.sock.sendall(b"\x05\x01\x02" + login + request)
            recv_all(client.sock)
    assert proxy.stop() == 0
    access = (tmp_path / "access.log").read_text()
    assert "3 failed logins" in proxy.stderr and access.count("\n") == len(logins)
    for text in (proxy.stderr, access):
        for secret in (SECRET, PASSWORD, SECRET.encode().hex(), SECRET[:10]):
            assert secret not in text


def test_world_readable_users_file_is_reported(tmp_path):
    users = write_htpasswd(tmp_path / "users", {"alice": PASSWORD})
    (tmp_path / "rules.yaml").write_text("auth: {methods: [userpass], users: users}\n")
    quiet = socksflow_cmd("check", cwd=tmp_path)
    assert quiet.returncode == 0 and "readable by every user" not in quiet.stderr
    users.chmod(0o644)
    loud = socksflow_cmd("check", cwd=tmp_path)
    assert loud.returncode == 0
    assert (
        "WARNING socksflow.auth: users is readable by every user on this machine: chmod o-r it" in loud.stderr
    )
