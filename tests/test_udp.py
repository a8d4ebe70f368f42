"""UDP ASSOCIATE end to end: raw clients and PySocks against UDP targets on loopback."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import dns.message
import dns.rrset
import pytest
import socks
from socksflow_plugins import limits as limits_plugin

from socksflow import Address, Direction, Verdict, hookimpl
from socksflow.config import Config
from socksflow.errors import ConfigErrors
from socksflow.protocol import Command, Reply, build_udp_header
from socksflow.testing import SessionRecorder, Socks5Client, StaticResolver, wait_until

WAIT = 3.0  # seconds to wait for a datagram that must arrive


class UdpTarget:
    """A UDP server on loopback that answers through ``respond`` and records what it received."""

    def __init__(self, host: str = "127.0.0.1", respond: Callable[[bytes], bytes] = bytes) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.1)
        self.address = Address.from_sockaddr(self.sock.getsockname())
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self._respond = respond
        self._running = True
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def sockaddr(self) -> tuple[str, int]:
        return str(self.address.host), self.address.port

    def _serve(self) -> None:
        while self._running:
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            self.received.append((data, addr[:2]))
            self.sock.sendto(self._respond(data), addr)

    def payloads(self) -> list[bytes]:
        return [data for data, _ in self.received]

    def stop(self) -> None:
        self._running = False
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[UdpTarget]:
    target = UdpTarget()
    yield target
    target.stop()


@pytest.fixture
def echo6() -> Iterator[UdpTarget]:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    target = UdpTarget("::1")
    yield target
    target.stop()


def udp_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(WAIT)
    return sock


def associate(server, declared: str = "0.0.0.0:0") -> tuple[Socks5Client, Address]:
    """A control connection with a granted association; returns it and the relay address."""
    control = Socks5Client(server.address)
    assert control.greet() == 0
    code, bound = control.request(Command.UDP_ASSOCIATE, declared)
    assert code == Reply.SUCCEEDED
    return control, bound


def relay_of(bound: Address) -> tuple[str, int]:
    return str(bound.host), bound.port


def exchange(sock: socket.socket, bound: Address, destination: Address, payload: bytes) -> bytes:
    """Send one datagram through the relay; return the raw datagram that comes back."""
    sock.sendto(build_udp_header(destination) + payload, relay_of(bound))
    data, source = sock.recvfrom(65535)
    assert source[:2] == relay_of(bound), "replies must come from the address in the reply"
    return data


def server_sessions(server) -> int:
    return server.call(lambda: len(server.server.sessions))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------------------- the basics


def test_reply_and_relayed_datagram_are_exact(socksflow_server, echo):
    server = socksflow_server(autoload=False)
    control, bound = associate(server)
    assert bound.host == server.address.host and bound.port != 0  # the control connection's IP, no wildcard
    with udp_socket() as sock:
        answer = exchange(sock, bound, echo.address, b"hello")
    port = echo.address.port
    assert answer == b"\x00\x00\x00\x01\x7f\x00\x00\x01" + struct.pack("!H", port) + b"hello"
    assert echo.payloads() == [b"hello"]
    control.close()


def test_pysocks_udp(socksflow_server, echo):
    server = socksflow_server(autoload=False)
    with socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.set_proxy(socks.SOCKS5, server.host, server.port)
        sock.settimeout(WAIT)
        sock.bind(("127.0.0.1", 0))  # PySocks declares this port in its request
        for payload in (b"one", b"two"):
            sock.sendto(payload, echo.sockaddr)
            assert sock.recvfrom(1024) == (payload, echo.sockaddr)


def test_the_request_address_is_the_clients_source_not_a_destination(socksflow_server, echo):
    """DST.ADDR of UDP ASSOCIATE is where the client sends from: never dialled, routed or checked."""
    seen = []

    class Observer:
        @hookimpl
        def socksflow_request(self, request):
            seen.append(request)

    server = socksflow_server(plugins=[Observer()], autoload=False)
    control, bound = associate(server, "192.0.2.1:0")  # an address the proxy cannot reach
    with udp_socket() as sock:
        assert exchange(sock, bound, echo.address, b"x").endswith(b"x")
    assert [(r.command, str(r.destination)) for r in seen] == [(Command.UDP_ASSOCIATE, "192.0.2.1:0")]
    control.close()


def test_domain_destination_resolves_through_the_hook_and_replies_carry_the_ip(socksflow_server, echo):
    names = StaticResolver({"echo.test": ["127.0.0.1"]})
    server = socksflow_server(plugins=[names], autoload=False)
    control, bound = associate(server)
    destination = Address("echo.test", echo.address.port)
    with udp_socket() as sock:
        first = exchange(sock, bound, destination, b"a")
        second = exchange(sock, bound, destination, b"b")
    header = b"\x00\x00\x00\x01\x7f\x00\x00\x01" + struct.pack("!H", echo.address.port)
    assert (first, second) == (header + b"a", header + b"b")
    assert names.lookups == ["echo.test"]  # cached on the session
    control.close()


def test_names_remembered_per_association_are_bounded(socksflow_server, echo, monkeypatch):
    monkeypatch.setattr("socksflow.session.MAX_REMEMBERED_NAMES", 4)  # the session's look-ups
    monkeypatch.setattr("socksflow.udp.MAX_DESTINATIONS", 4)  # the association's routes
    names = [f"n{i}.test" for i in range(6)]
    resolver = StaticResolver({name: ["127.0.0.1"] for name in names})
    server = socksflow_server(plugins=[resolver], autoload=False)
    control, bound = associate(server)
    with udp_socket() as sock:
        for name in [*names, names[0], names[5]]:
            assert exchange(sock, bound, Address(name, echo.address.port), b"x").endswith(b"x")
    # The fifth name found four remembered: they were forgotten, so n0 is looked up again; n5 is not.
    assert resolver.lookups == [*names, names[0]]
    control.close()


class SlowNames:
    """Resolves ``slow*.test`` after a second and ``fast.test`` at once, all to 127.0.0.1."""

    @hookimpl
    async def socksflow_resolve(self, host):
        if host.startswith("slow"):
            await asyncio.sleep(1.0)
        return [Address.parse("127.0.0.1:0").host] if host.endswith(".test") else None


def test_a_slow_look_up_delays_only_the_datagrams_to_its_name(socksflow_server, echo):
    server = socksflow_server("timeouts: {hook: 5s}\n", plugins=[SlowNames()], autoload=False)
    control, bound = associate(server)
    port = echo.address.port
    with udp_socket() as sock:
        began = time.monotonic()
        for name, payload in (("slow.test", b"slow 1"), ("fast.test", b"fast"), ("slow.test", b"slow 2")):
            sock.sendto(build_udp_header(Address(name, port)) + payload, relay_of(bound))
        sock.sendto(build_udp_header(echo.address) + b"by address", relay_of(bound))
        arrivals = []
        for _ in range(4):
            data, _ = sock.recvfrom(65535)
            arrivals.append((data[10:], time.monotonic() - began))
    control.close()
    # Not behind the slow name (in either order: different destinations), then the slow ones in order.
    assert sorted(payload for payload, _ in arrivals[:2]) == [b"by address", b"fast"]
    assert [payload for payload, _ in arrivals[2:]] == [b"slow 1", b"slow 2"]
    assert all(took < 0.5 for _, took in arrivals[:2]), arrivals
    assert all(took >= 0.9 for _, took in arrivals[2:]), arrivals


def test_names_looked_up_at_once_per_association_are_bounded(socksflow_server, echo, monkeypatch):
    monkeypatch.setattr("socksflow.udp.MAX_LOOKUPS", 2)
    ended = SessionRecorder()
    server = socksflow_server("timeouts: {hook: 5s}\n", plugins=[SlowNames(), ended], autoload=False)
    control, bound = associate(server)
    with udp_socket() as sock:
        for name in ("slow1.test", "slow2.test", "slow3.test"):
            sock.sendto(build_udp_header(Address(name, echo.address.port)) + name.encode(), relay_of(bound))
        assert sorted(sock.recvfrom(65535)[0][10:] for _ in range(2)) == [b"slow1.test", b"slow2.test"]
    control.close()
    assert len(ended.wait(1)) == 1
    assert ended.sessions[0].association.datagrams_dropped == 1  # slow3.test: two look-ups were under way


def test_pysocks_remote_dns(socksflow_server, echo):
    server = socksflow_server(plugins=[StaticResolver({"echo.test": ["127.0.0.1"]})], autoload=False)
    with socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.set_proxy(socks.SOCKS5, server.host, server.port, rdns=True)
        sock.settimeout(WAIT)
        sock.bind(("127.0.0.1", 0))
        sock.sendto(b"by name", ("echo.test", echo.address.port))
        assert sock.recvfrom(1024) == (b"by name", echo.sockaddr)


def test_unresolvable_destination_is_dropped(socksflow_server, echo):
    server = socksflow_server(plugins=[StaticResolver({})], autoload=False)
    control, bound = associate(server)
    with udp_socket() as sock:
        sock.sendto(build_udp_header(Address("nowhere.test", 53)) + b"lost", relay_of(bound))
        assert exchange(sock, bound, echo.address, b"kept").endswith(b"kept")
    assert echo.payloads() == [b"kept"]
    control.close()


def test_ipv6_client_and_destinations(socksflow_server, echo6, echo):
    server = socksflow_server("listen: ['[::1]:0']\n", autoload=False)
    control, bound = associate(server, "[::]:0")
    assert str(bound.host) == "::1"
    with udp_socket("::1") as sock:
        answer = exchange(sock, bound, echo6.address, b"six")
        loopback6 = bytes(15) + b"\x01"
        assert answer == b"\x00\x00\x00\x04" + loopback6 + struct.pack("!H", echo6.address.port) + b"six"
        answer = exchange(sock, bound, echo.address, b"four")  # an IPv4 destination from an IPv6 client
        assert answer == build_udp_header(echo.address) + b"four"
    control.close()


# ---------------------------------------------------------------------------- what is dropped


def test_fragments_and_malformed_headers_are_dropped(socksflow_server, echo):
    server = socksflow_server(autoload=False)
    control, bound = associate(server)
    relay = relay_of(bound)
    good = build_udp_header(echo.address)
    with udp_socket() as sock:
        for bad in (
            build_udp_header(echo.address, frag=1) + b"fragment",
            b"\x00\x01" + good[2:] + b"rsv",  # RSV != 0
            good[:3] + b"\x05" + good[4:] + b"atyp",  # unknown ATYP
            good[:7],  # header cut short
            b"\x00\x00\x00\x03\x20abc",  # name longer than the datagram
            b"",
        ):
            sock.sendto(bad, relay)
        assert exchange(sock, bound, echo.address, b"whole") == good + b"whole"
        # Also once the route is known (the fast path):
        sock.sendto(build_udp_header(echo.address, frag=1) + b"fragment", relay)
        assert exchange(sock, bound, echo.address, b"again") == good + b"again"
    assert echo.payloads() == [b"whole", b"again"]
    control.close()


def test_datagrams_from_another_port_are_dropped(socksflow_server, echo):
    server = socksflow_server(autoload=False)
    control, bound = associate(server)
    with udp_socket() as first, udp_socket() as other:
        assert exchange(first, bound, echo.address, b"mine").endswith(b"mine")  # fixes the client's port
        other.sendto(build_udp_header(echo.address) + b"intruder", relay_of(bound))
        assert exchange(first, bound, echo.address, b"mine again").endswith(b"mine again")
    assert echo.payloads() == [b"mine", b"mine again"]
    control.close()


def test_declared_port_is_enforced_from_the_first_datagram(socksflow_server, echo):
    server = socksflow_server(autoload=False)
    with udp_socket() as declared, udp_socket() as other:
        control, bound = associate(server, f"0.0.0.0:{declared.getsockname()[1]}")
        other.sendto(build_udp_header(echo.address) + b"intruder", relay_of(bound))
        assert exchange(declared, bound, echo.address, b"mine").endswith(b"mine")
    assert echo.payloads() == [b"mine"]
    control.close()


def test_datagrams_from_another_ip_are_dropped(socksflow_server, echo):
    server = socksflow_server(autoload=False)
    control, bound = associate(server)
    with udp_socket() as client, udp_socket("127.0.0.2") as stranger:
        stranger.sendto(build_udp_header(echo.address) + b"stranger", relay_of(bound))
        assert exchange(client, bound, echo.address, b"client").endswith(b"client")
    assert echo.payloads() == [b"client"]
    control.close()


@pytest.mark.parametrize("replies_from", ["sent", "any"])
def test_which_remotes_may_answer(socksflow_server, echo, replies_from):
    server = socksflow_server(f"udp: {{replies_from: {replies_from}}}\n", autoload=False)
    control, bound = associate(server)
    with udp_socket() as client, udp_socket() as stranger:
        exchange(client, bound, echo.address, b"hello")
        outbound = echo.received[0][1]  # where the proxy sends from
        stranger.sendto(b"unsolicited", outbound)
        echo.sock.sendto(b"from echo", outbound)  # a remote the client sent to: always passes
        first = client.recvfrom(65535)[0]
        if replies_from == "any":
            assert first == build_udp_header(Address.from_sockaddr(stranger.getsockname())) + b"unsolicited"
            first = client.recvfrom(65535)[0]
        assert first == build_udp_header(echo.address) + b"from echo"
    control.close()


# ---------------------------------------------------------------------------- plugins decide per datagram


class Policy:
    """A ``socksflow_udp_datagram`` plugin deciding per datagram: by port, and by payload."""

    def __init__(self, deny_port: int = -1, redirect: Address | None = None) -> None:
        self.deny_port = deny_port
        self.redirect = redirect
        self.calls: list[tuple[str, bytes]] = []

    def decide(self, destination: Address, payload: bytes) -> Verdict | None:
        self.calls.append((str(destination), payload))
        if payload == b"boom":
            raise RuntimeError("plugin bug")
        if destination.port == self.deny_port:
            return Verdict.deny("port closed by policy")
        if payload.startswith(b"deny"):
            return Verdict.deny("payload refused by policy")
        if payload.startswith(b"redirect") and self.redirect is not None:
            return Verdict.rewrite(self.redirect)
        return None

    @hookimpl
    def socksflow_udp_datagram(self, destination, payload):
        return self.decide(destination, payload)


class AsyncPolicy(Policy):
    @hookimpl
    async def socksflow_udp_datagram(self, destination, payload):
        await asyncio.sleep(0)
        return self.decide(destination, payload)


policies = pytest.mark.parametrize("policy_class", [Policy, AsyncPolicy], ids=["sync", "async"])


@policies
def test_every_datagram_goes_through_the_hook(socksflow_server, echo, policy_class):
    policy = policy_class()
    server = socksflow_server(plugins=[policy], autoload=False)
    control, bound = associate(server)
    with udp_socket() as sock:
        for payload in (b"1", b"2", b"3"):
            exchange(sock, bound, echo.address, payload)
    assert policy.calls == [(str(echo.address), p) for p in (b"1", b"2", b"3")]
    control.close()


@policies
def test_each_datagram_to_a_known_destination_gets_its_own_verdict(socksflow_server, echo, policy_class):
    other = UdpTarget()
    try:
        server = socksflow_server(plugins=[policy_class(redirect=other.address)], autoload=False)
        control, bound = associate(server)
        with udp_socket() as sock:
            assert exchange(sock, bound, echo.address, b"first").endswith(b"first")  # the route is known now
            sock.sendto(build_udp_header(echo.address) + b"deny me", relay_of(bound))
            answer = exchange(sock, bound, echo.address, b"redirect me")
            assert answer == build_udp_header(other.address) + b"redirect me"
            assert exchange(sock, bound, echo.address, b"last") == build_udp_header(echo.address) + b"last"
        assert echo.payloads() == [b"first", b"last"] and other.payloads() == [b"redirect me"]
        control.close()
    finally:
        other.stop()


def test_denied_destination_is_dropped_and_logged(socksflow_server, echo, caplog):
    other = UdpTarget()
    try:
        server = socksflow_server(plugins=[Policy(deny_port=other.address.port)], autoload=False)
        control, bound = associate(server)
        with caplog.at_level(logging.INFO, logger="socksflow.udp"), udp_socket() as sock:
            sock.sendto(build_udp_header(other.address) + b"denied", relay_of(bound))
            assert exchange(sock, bound, echo.address, b"allowed").endswith(b"allowed")
        assert other.received == [] and echo.payloads() == [b"allowed"]
        assert f"to {other.address} denied by" in caplog.text and "port closed by policy" in caplog.text
        control.close()
    finally:
        other.stop()


def test_rewritten_destination(socksflow_server, echo, refusing_port):
    server = socksflow_server(plugins=[Policy(redirect=echo.address)], autoload=False)
    control, bound = associate(server)
    with udp_socket() as sock:
        answer = exchange(sock, bound, Address.parse(f"127.0.0.1:{refusing_port}"), b"redirected")
    assert answer == build_udp_header(echo.address) + b"redirected"  # the real source, not the one asked for
    control.close()


@policies
def test_plugin_exception_drops_the_datagram_only(socksflow_server, echo, caplog, policy_class):
    errors = []

    class Errors:
        @hookimpl
        def socksflow_session_error(self, error):
            errors.append(error)

    server = socksflow_server(plugins=[Errors(), policy_class()], autoload=False)
    control, bound = associate(server)
    with caplog.at_level(logging.INFO, logger="socksflow.udp"), udp_socket() as sock:
        sock.sendto(build_udp_header(echo.address) + b"boom", relay_of(bound))  # a new destination
        assert exchange(sock, bound, echo.address, b"fine").endswith(b"fine")
        sock.sendto(build_udp_header(echo.address) + b"boom", relay_of(bound))  # a known one
        assert exchange(sock, bound, echo.address, b"still fine").endswith(b"still fine")
    assert echo.payloads() == [b"fine", b"still fine"]
    assert "RuntimeError: plugin bug" in caplog.text
    assert wait_until(lambda: len(errors) == 2)
    assert {e.hook for e in errors} == {"socksflow_udp_datagram"}
    control.close()


# ---------------------------------------------------------------------------- bandwidth limits


def limited(rate: str) -> str:
    return f"limits:\n  - bandwidth: {{up: {rate}, down: {rate}, burst: 1KiB}}\n"


def test_a_bandwidth_limit_paces_datagrams_both_ways_and_loses_none(socksflow_server, echo):
    server = socksflow_server(limited("50KiB/s"))
    control, bound = associate(server)
    payloads = [bytes([i]) * 1000 for i in range(10)]
    began = time.monotonic()
    with udp_socket() as sock:
        for payload in payloads:
            sock.sendto(build_udp_header(echo.address) + payload, relay_of(bound))
        replies = [sock.recvfrom(65535)[0][10:] for _ in payloads]
    took = time.monotonic() - began
    assert replies == payloads  # all of them, in order
    assert echo.payloads() == payloads
    # 10 000 bytes at 51 200 bytes/s with 1 KiB at once: at least 0.17 s each way, overlapping.
    assert took >= 0.17, took
    control.close()


def test_datagrams_beyond_what_may_wait_for_the_limit_are_dropped(socksflow_server, echo, monkeypatch):
    monkeypatch.setattr("socksflow.udp.MAX_PACED_BYTES", 5000)
    ended = SessionRecorder()
    server = socksflow_server(limited("1KiB/s"), plugins=[ended])
    control, bound = associate(server)
    with udp_socket() as sock:
        for i in range(20):
            sock.sendto(build_udp_header(echo.address) + bytes([i]) * 1000, relay_of(bound))
        assert sock.recvfrom(65535)[0][10:] == bytes([0]) * 1000  # the burst lets the first one through

        def accounted() -> int:  # sent + waiting + dropped: all 20 read from the relay socket
            associations = [s.association for s in server.server.sessions if s.association is not None]
            return sum(
                a.datagrams_up + a.pacer.waiting(Direction.UP) // 1000 + a.datagrams_dropped
                for a in associations
            )

        assert wait_until(lambda: server.call(accounted) == 20)  # before the close ends the association
    control.close()
    assert len(ended.wait(1)) == 1
    # The first went at once, five waited (5000 bytes), fourteen were dropped.
    assert ended.sessions[0].association.datagrams_dropped == 14
    assert echo.payloads() == [bytes([0]) * 1000]  # the waiting ones die with the association


# ---------------------------------------------------------------------------- lifetime


def test_association_ends_with_its_control_connection(socksflow_server, echo):
    server = socksflow_server(autoload=False)
    baseline = open_fds()
    control, bound = associate(server)
    with udp_socket() as sock:
        exchange(sock, bound, echo.address, b"x")
        assert open_fds() >= baseline + 3  # control connection, relay socket, outbound socket
        control.close()
        assert wait_until(lambda: server_sessions(server) == 0)
        # Every socket of the association is closed: the relay port is free, fds are back.
        assert wait_until(lambda: open_fds() == baseline + 1), (open_fds(), baseline)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(relay_of(bound))
        sock.sendto(build_udp_header(echo.address) + b"late", relay_of(bound))
    assert echo.payloads() == [b"x"]


def test_server_shutdown_closes_open_associations(socksflow_server, echo):
    server = socksflow_server(autoload=False)
    control, bound = associate(server)
    with udp_socket() as sock:
        exchange(sock, bound, echo.address, b"x")
    server.stop()  # the association outlives the drain deadline and is aborted
    control.sock.settimeout(WAIT)
    assert control.sock.recv(1) == b""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(relay_of(bound))  # the relay socket is closed
    control.close()


def test_known_destinations_take_the_fast_path(socksflow_server, echo, monkeypatch):
    """Without a socksflow_udp_datagram plugin, a header seen before is not parsed again."""
    from socksflow import udp

    parsed = []

    def counting(data):
        parsed.append(bytes(data[:4]))
        return udp_parse(data)

    udp_parse = udp.parse_udp_header
    monkeypatch.setattr(udp, "parse_udp_header", counting)
    server = socksflow_server(autoload=False)
    control, bound = associate(server)
    with udp_socket() as sock:
        for payload in (b"1", b"2", b"3"):
            assert exchange(sock, bound, echo.address, payload).endswith(payload)
    assert len(parsed) == 1
    control.close()


def test_idle_association_closes_its_control_connection(socksflow_server, echo):
    server = socksflow_server("udp: {idle: 400ms}\n", autoload=False)
    control, bound = associate(server)
    with udp_socket() as sock:
        exchange(sock, bound, echo.address, b"x")
    control.sock.settimeout(WAIT)
    began = time.monotonic()
    assert control.sock.recv(1) == b""
    assert 0.3 < time.monotonic() - began < WAIT
    control.close()
    assert wait_until(lambda: server_sessions(server) == 0)


def test_associations_per_client_are_capped(socksflow_server, refusing_port):
    # The cap is policy, kept by the limits plugin (with or without a limits section); a
    # refusal is REP 0x02, not allowed by ruleset.
    server = socksflow_server("udp: {max_per_client: 1}\n", plugins=[limits_plugin], autoload=False)
    first, _ = associate(server)
    with Socks5Client(server.address) as second:
        second.greet()
        assert second.request(Command.UDP_ASSOCIATE, "0.0.0.0:0")[0] == Reply.NOT_ALLOWED
    with Socks5Client(server.address) as tcp:  # the cap counts associations only
        tcp.greet()
        assert tcp.request(Command.CONNECT, f"127.0.0.1:{refusing_port}")[0] == Reply.CONNECTION_REFUSED
    first.close()
    assert wait_until(lambda: server_sessions(server) == 0)
    third, _ = associate(server)  # the slot is free again
    third.close()


def test_counters_reach_the_session_end_hook(socksflow_server, echo):
    ended = SessionRecorder()
    server = socksflow_server(plugins=[ended], autoload=False)
    control, bound = associate(server)
    with udp_socket() as sock:
        for payload in (b"12345", b"678"):
            exchange(sock, bound, echo.address, payload)
        sock.sendto(build_udp_header(echo.address, frag=1), relay_of(bound))
        exchange(sock, bound, echo.address, b"")  # zero-length payloads are datagrams too
    control.close()
    assert len(ended.wait(1)) == 1
    session = ended.sessions[0]
    assert (session.bytes_up, session.bytes_down) == (8, 8)
    assert (session.datagrams_up, session.datagrams_down) == (3, 3)
    assert session.association.datagrams_dropped == 1
    assert session.reply == Reply.SUCCEEDED and session.close_reason == "control connection closed"


# ---------------------------------------------------------------------------- a real protocol: DNS


def test_dns_query_through_the_association(socksflow_server):
    def answer(wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "192.0.2.7"))
        return response.to_wire()

    resolver = UdpTarget(respond=answer)
    try:
        server = socksflow_server(autoload=False)
        control, bound = associate(server)
        query = dns.message.make_query("printer.example.", "A")
        with udp_socket() as sock:
            datagram = exchange(sock, bound, resolver.address, query.to_wire())
        header = build_udp_header(resolver.address)
        assert datagram.startswith(header)
        response = dns.message.from_wire(datagram[len(header) :])
        assert response.id == query.id
        assert [rr.address for rr in response.answer[0]] == ["192.0.2.7"]
        control.close()
    finally:
        resolver.stop()


# ---------------------------------------------------------------------------- configuration


def test_advertised_address_in_the_reply(socksflow_server, echo):
    server = socksflow_server("udp: {advertise: 192.0.2.1}\n", autoload=False)
    control, bound = associate(server)
    assert str(bound.host) == "192.0.2.1"
    with udp_socket() as sock:  # the relay itself still listens on the control connection's IP
        answer = exchange(sock, Address(server.address.host, bound.port), echo.address, b"nat")
    assert answer.endswith(b"nat")
    control.close()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("udp: {advertise: 0.0.0.0}", "x.yaml:1: udp.advertise: '0.0.0.0' is a wildcard"),
        ("udp:\n  idle: soon", "x.yaml:2: udp.idle: 'soon' is not a duration"),
        ("udp: {max_per_client: 0}", "x.yaml:1: udp.max_per_client: 0 is below the minimum 1"),
        ("udp: {replies_from: all}", "x.yaml:1: udp.replies_from: 'all' is not one of: sent, any"),
        ("udp: {relay: 1}", "x.yaml:1: udp.relay: unknown key"),
    ],
)
def test_config_errors_are_located(text, message):
    config = Config.from_text(text, "x.yaml")
    with pytest.raises(ConfigErrors) as info:
        config.raise_errors()
    assert str(info.value).startswith(message)


def test_config_defaults():
    settings = Config.from_text("").udp
    assert (settings.advertise, settings.idle, settings.max_per_client, settings.replies_from) == (
        None, 120.0, 16, "sent",
    )  # fmt: skip
