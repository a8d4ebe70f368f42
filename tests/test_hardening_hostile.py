"""Hostile clients, bounded: each gets the protocol's answer or a close, and the others are served.

Figures (latency of well-behaved clients idle and under attack, server memory while a client
refuses to read) are printed as ``FIGURES …`` lines: run with ``pytest -s`` to see them.
"""

from __future__ import annotations

import contextlib
import hashlib
import resource
import socket
import struct
import threading
import time

import pytest
from hardening import (  # noqa: F401 - fixtures
    firehose_fixture,
    latency,
    report,
    round_trip,
    server_process_fixture,
)
from helpers import recv_all, write_htpasswd

from socksflow.protocol import Address, Command, build_request
from socksflow.testing import Socks5Client

ATTACKERS = 1000


@pytest.fixture
def descriptors() -> None:
    """Room for a thousand attackers on both ends of loopback in this one process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 4 * ATTACKERS + 1024
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# ---------------------------------------------------------------------------- slowloris and half-open handshakes


def test_slowloris_is_closed_at_the_handshake_deadline(socksflow_server, echo_target):
    """Bytes that keep trickling in do not extend the deadline: one deadline for the whole handshake."""
    server = socksflow_server("timeouts: {handshake: 1s}\n")
    proxy = (server.host, server.port)
    message = b"\x05\x01\x00" + build_request(Command.CONNECT, Address.parse("{}:{}".format(*echo_target)))
    idle = [round_trip(proxy, echo_target) for _ in range(200)]
    clients = [Socks5Client(server.address) for _ in range(200)]
    started = time.monotonic()
    closed_at: list[float] = []

    def watch(client: Socks5Client) -> None:  # when exactly the server closes one of them
        assert client.recv_exactly(2) == b"\x05\x00"  # the greeting got its answer
        assert recv_all(client.sock) == b""  # the request never completed: a close, no reply
        closed_at.append(time.monotonic() - started)

    watchers = [threading.Thread(target=watch, args=(client,)) for client in clients[:10]]
    for watcher in watchers:
        watcher.start()

    def trickle() -> None:  # the whole handshake would take 2 s
        for position, byte in enumerate(message):
            for client in clients:
                with contextlib.suppress(OSError):
                    client.sock.send(bytes([byte]))
            if position == 2:
                for client in clients[10:]:
                    assert client.recv_exactly(2) == b"\x05\x00"
            time.sleep(0.15)

    trickler = threading.Thread(target=trickle)
    trickler.start()
    during = []
    while trickler.is_alive():
        during.append(round_trip(proxy, echo_target))
        time.sleep(0.002)
    trickler.join()
    for watcher in watchers:
        watcher.join(10)
    for client in clients:
        assert recv_all(client.sock) == b""
        client.close()
    idle_figures, during_figures = latency(idle), latency(during)
    report("slowloris", attackers=len(clients), idle=idle_figures, during_slowloris=during_figures)
    assert len(closed_at) == len(watchers)
    assert min(closed_at) > 0.9 and max(closed_at) < 1.9, closed_at  # at the deadline, not at the end
    assert during_figures["p99_ms"] < max(10 * idle_figures["p99_ms"], 50), (idle_figures, during_figures)


def test_half_open_handshakes_do_not_slow_down_well_behaved_clients(
    socksflow_server, echo_target, descriptors
):
    server = socksflow_server("timeouts: {handshake: 60s}\n")
    proxy = (server.host, server.port)
    for _ in range(20):  # warm up
        round_trip(proxy, echo_target)
    idle = [round_trip(proxy, echo_target) for _ in range(300)]
    attackers = []
    try:
        for number in range(ATTACKERS):
            sock = socket.create_connection(proxy, timeout=10)
            if number % 3 == 1:
                sock.sendall(b"\x05")  # half a greeting
            elif number % 3 == 2:
                sock.sendall(b"\x05\x01\x00\x05\x01\x00\x03\x20")  # greeting and a third of a request
            attackers.append(sock)
        deadline = time.monotonic() + 20
        while server.call(lambda: len(server.server.sessions)) < ATTACKERS:  # all accepted, all waiting
            assert time.monotonic() < deadline
            time.sleep(0.05)
        attacked = [round_trip(proxy, echo_target) for _ in range(300)]
    finally:
        for sock in attackers:
            sock.close()
    idle_figures, attacked_figures = latency(idle), latency(attacked)
    report("half-open", attackers=ATTACKERS, idle=idle_figures, under_attack=attacked_figures)
    assert attacked_figures["p99_ms"] < max(10 * idle_figures["p99_ms"], 50), (idle_figures, attacked_figures)


def test_flood_over_the_per_address_limit(socksflow_server, echo_target):
    """One address floods; it gets closes past its limit, while another address is served as usual."""
    server = socksflow_server(
        "limits:\n  - match: {from: [127.0.0.0/8]}\n    sessions_per_second: 50\n    burst: 50\n"
    )
    proxy = (server.host, server.port)
    outcomes = {"served": 0, "closed": 0}
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            with socket.create_connection(proxy, timeout=10, source_address=("127.0.0.2", 0)) as sock:
                with contextlib.suppress(OSError):
                    sock.sendall(b"\x05\x01\x00")
                answer = _first_bytes(sock, 2)
                outcomes["served" if answer == b"\x05\x00" else "closed"] += 1

    idle = []
    for _ in range(60):  # the well-behaved client stays within the limit: 40 sessions/s
        idle.append(round_trip(proxy, echo_target))
        time.sleep(0.025)
    attacker = threading.Thread(target=flood)
    attacker.start()
    try:
        time.sleep(0.2)
        flooded = []
        began = time.monotonic()
        while time.monotonic() - began < 2.0:
            flooded.append(round_trip(proxy, echo_target))
            time.sleep(0.025)
    finally:
        stop.set()
        attacker.join(30)
    seconds = time.monotonic() - began + 0.2
    idle_figures, flooded_figures = latency(idle), latency(flooded)
    report(
        "flood", attempts=sum(outcomes.values()), **outcomes, idle=idle_figures, during_flood=flooded_figures
    )
    assert outcomes["closed"] > outcomes["served"]  # the flood ran far past its limit ...
    assert outcomes["served"] <= 50 + 50 * (seconds + 1)  # ... and got no more than burst + rate
    assert flooded_figures["p99_ms"] < max(10 * idle_figures["p99_ms"], 50)


def _first_bytes(sock: socket.socket, count: int) -> bytes:
    """Up to ``count`` bytes, or fewer if the server closes first."""
    sock.settimeout(10)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while len(data) < count and (chunk := sock.recv(count - len(data))):
            data += chunk
    return data


# ---------------------------------------------------------------------------- a client that never reads


def test_a_client_that_never_reads_costs_bounded_memory(server_process, firehose):
    """Flow control: reading from the target pauses while the client's buffer is full, nothing is lost."""
    proxy = server_process("timeouts: {idle: 1m}\n")
    clients = []
    rss_before = proxy.rss()
    for _ in range(8):
        client = Socks5Client(proxy.address, timeout=30)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        client.greet()
        assert client.connect(f"127.0.0.1:{firehose.port}")[0] == 0
        clients.append(client)
    time.sleep(3)  # nobody reads
    rss_stalled = proxy.rss()
    stalled_sent = list(firehose.sent)
    time.sleep(1)
    assert firehose.sent == stalled_sent  # the target is blocked: the proxy stopped reading from it
    expected = firehose.expected_sha256()
    for client in clients:  # now read everything: every byte arrives, in order
        digest = hashlib.sha256()
        received = 0
        while received < firehose.size:
            chunk = client.sock.recv(1 << 20)
            assert chunk, f"closed after {received} bytes"
            digest.update(chunk)
            received += len(chunk)
        assert digest.digest() == expected
        client.close()
    mib = 1024 * 1024
    report(
        "never-reads", clients=len(clients), offered_mib=8 * firehose.size // mib,
        sent_while_stalled_mib=round(sum(stalled_sent) / mib, 1),
        rss_before_mib=round(rss_before / mib, 1), rss_stalled_mib=round(rss_stalled / mib, 1),
    )  # fmt: skip
    assert sum(stalled_sent) < 8 * 16 * mib  # far from the 512 MiB offered: kernel buffers at most
    assert rss_stalled - rss_before < 32 * mib
    assert proxy.stop() == 0


# ---------------------------------------------------------------------------- malformed and oversize messages


def _domain(name: bytes, port: int = 80) -> bytes:
    return b"\x05\x01\x00\x03" + bytes((len(name),)) + name + struct.pack("!H", port)


JUNK = bytes(range(256)) * 16384  # 4 MiB, starting with 0x00

MALFORMED = {
    # greeting
    "version 4": (b"\x04\x01\x00", b"\x00\x5b\x00\x00\x00\x00\x00\x00"),  # SOCKS4's "rejected"
    "version 6": (b"\x06\x01\x00", b""),
    "no methods": (b"\x05\x00", b""),
    "255 methods, none acceptable": (b"\x05\xff" + bytes(range(3, 256)) + b"\x01\x80", b"\x05\xff"),
    "junk after greeting": (b"\x05\x01\x00" + JUNK, b"\x05\x00"),
    # RFC 1929 sub-negotiation
    "auth version 5": (b"\x05\x01\x02\x05\x01a\x01b", b"\x05\x02\x01\x01"),
    "auth junk": (b"\x05\x01\x02\x01" + JUNK, b"\x05\x02\x01\x01"),
    # request
    "request version 4": (b"\x05\x01\x00\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50", b"\x05\x00"),
    "RSV not zero": (b"\x05\x01\x00\x05\x01\x01\x01\x7f\x00\x00\x01\x00\x50", b"\x05\x00\x05\x01"),
    "command 0": (b"\x05\x01\x00\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x50", b"\x05\x00\x05\x07"),
    "address type 2": (b"\x05\x01\x00\x05\x01\x00\x02\x7f\x00\x00\x01\x00\x50", b"\x05\x00\x05\x08"),
    "empty name": (b"\x05\x01\x00" + _domain(b""), b"\x05\x00\x05\x04"),
    "255-byte label": (b"\x05\x01\x00" + _domain(b"a" * 255), b"\x05\x00\x05\x04"),
    "name not UTF-8": (b"\x05\x01\x00" + _domain(b"\xff\xfe.example"), b"\x05\x00\x05\x04"),
    "name with a slash": (b"\x05\x01\x00" + _domain(b"a/b.example"), b"\x05\x00\x05\x04"),
    "name with NUL": (b"\x05\x01\x00" + _domain(b"example.com\x00.evil"), b"\x05\x00\x05\x04"),
    "junk after a request": (
        b"\x05\x01\x00\x05\x01\x00\x01\x7f" + JUNK,
        b"\x05\x00\x05\x05",
    ),  # 127.0.1.2:772
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_and_oversize_messages_get_the_protocols_answer(socksflow_server, tmp_path, case):
    users = write_htpasswd(tmp_path / "users", {"alice": "pw"})
    server = socksflow_server(f"auth: {{methods: [none, userpass], users: {users}}}\n")
    message, answer = MALFORMED[case]
    with Socks5Client(server.address) as client:
        sender = threading.Thread(target=_send_quietly, args=(client.sock, message))
        sender.start()
        received = recv_all(client.sock)
        sender.join(30)
    if answer[2:3] == b"\x05":  # a failure reply: exactly one, BND 0.0.0.0:0
        answer += b"\x00\x01\x00\x00\x00\x00\x00\x00"
    assert received == answer
    # The server is still serving everyone else.
    with Socks5Client(server.address) as client:
        assert client.greet() == 0


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the server may close (and reset) before taking it all
        sock.sendall(data)


def test_oversize_optimistic_data_is_relayed_intact(socksflow_server, echo_target):
    server = socksflow_server()
    request = build_request(Command.CONNECT, Address.parse("{}:{}".format(*echo_target)))
    payload = JUNK * 2  # 8 MiB sent with the request, before any reply was read
    with Socks5Client(server.address) as client:
        sender = threading.Thread(
            target=lambda: (
                client.sock.sendall(b"\x05\x01\x00" + request + payload),
                client.sock.shutdown(socket.SHUT_WR),
            )
        )
        sender.start()
        received = recv_all(client.sock, timeout=30)
        sender.join(30)
    assert received[:4] == b"\x05\x00\x05\x00"
    assert hashlib.sha256(received[12:]).digest() == hashlib.sha256(payload).digest()


def test_clients_that_reset_at_once_leave_no_trace(socksflow_server, caplog):
    """Found by the session machine: a reset before the transport was made crashed connection_made."""
    server = socksflow_server()
    for _ in range(300):
        sock = socket.create_connection((server.host, server.port), timeout=5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    with Socks5Client(server.address) as client:
        assert client.greet() == 0
    deadline = time.monotonic() + 5
    while server.call(lambda: len(server.server.sessions)) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [r for r in caplog.records if r.exc_info or r.levelname == "ERROR"], caplog.text[-2000:]
