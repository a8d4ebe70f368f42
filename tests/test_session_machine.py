"""The session as a state machine, driven by Hypothesis over a real server.

Each step sends a fragment of a handshake (good, corrupted, truncated or random bytes) in random
chunks, or ends the connection (half-close, reset, or silence until the handshake deadline).
After every step, what the server sent must be what an independent model of RFC 1928/1929
says it owes for the bytes sent so far (a prefix of it while the answer is under way), and at
the end the server must close: never a hang past the handshake timeout, never a traceback in
the log, never a session left open.

The model (:func:`owed`) reads the client's bytes the way the RFCs describe, with this
server's policy: methods ``[userpass, none]`` (user ``alice``), CONNECT allowed only to the echo
server and a refusing port on 127.0.0.1 (by IP or as ``localhost`` / ``target.test``), UDP
ASSOCIATE from 127.0.0.1 or an unknown address, everything else REP 0x02.  So no byte ever
leaves loopback, and no name reaches a resolver.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import select
import socket
import struct
import time
from dataclasses import dataclass, field

import pytest
from helpers import write_htpasswd
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from socksflow import ResolveError, Verdict, detect, hookimpl
from socksflow.protocol import Command, InvalidAddress, parse_host

PASSWORD = b"s3cret"
HANDSHAKE_TIMEOUT = 0.6
LOOPBACK = ipaddress.ip_address("127.0.0.1")
ANYWHERE = ipaddress.ip_address("0.0.0.0")
NAMES = {"localhost", "target.test"}


# ---------------------------------------------------------------------------- the model


@dataclass
class Owed:
    """What the server owes for a byte stream: its output, and where the session stands."""

    output: bytearray = field(default_factory=bytearray)
    ports: list[int] = field(default_factory=list)  # offsets of BND ports, which may be anything
    closed: bool = False  # the server closes after ``output``
    settled: bool = False  # the handshake is over (closed, relaying or associated)


def owed(stream: bytes, echo_port: int, refused_port: int) -> Owed:
    """The server's answer to ``stream`` (the client has not closed), by RFC 1928/1929 and this policy."""
    answer = Owed()

    def close(*chunks: bytes) -> Owed:
        for chunk in chunks:
            answer.output += chunk
        answer.closed = answer.settled = True
        return answer

    def reply(code: int) -> bytes:
        return bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0))

    def success() -> None:
        answer.output += b"\x05\x00\x00\x01\x7f\x00\x00\x01"
        answer.ports.append(len(answer.output))
        answer.output += b"\x00\x00"
        answer.settled = True

    data, at = stream, 0
    # Greeting: VER NMETHODS METHODS
    if len(data) < 1:
        return answer
    if data[0] == 4:  # SOCKS4 on a SOCKS5-only listener: SOCKS4's "rejected"
        return close(b"\x00\x5b\x00\x00\x00\x00\x00\x00")
    if chr(data[0]).isascii() and chr(data[0]).isalpha():  # what starts an HTTP request: a 400
        return close(detect.refusal(detect.HTTP))
    if data[0] != 5:
        return close()
    if len(data) < 2:
        return answer
    if data[1] == 0:
        return close()
    if len(data) < 2 + data[1]:
        return answer
    methods, at = data[2 : 2 + data[1]], 2 + data[1]
    if 2 in methods:
        answer.output += b"\x05\x02"
        # RFC 1929: VER ULEN UNAME PLEN PASSWD
        if len(data) < at + 1:
            return answer
        if data[at] != 1:
            return close(b"\x01\x01")
        if len(data) < at + 2:
            return answer
        ulen = data[at + 1]
        if len(data) < at + 3 + ulen:
            return answer
        plen = data[at + 2 + ulen]
        if len(data) < at + 3 + ulen + plen:
            return answer
        user, password = data[at + 2 : at + 2 + ulen], data[at + 3 + ulen : at + 3 + ulen + plen]
        at += 3 + ulen + plen
        if (user, password) != (b"alice", PASSWORD):
            return close(b"\x01\x01")
        answer.output += b"\x01\x00"
    elif 0 in methods:
        answer.output += b"\x05\x00"
    else:
        return close(b"\x05\xff")
    # Request: VER CMD RSV ATYP DST.ADDR DST.PORT
    if len(data) < at + 1:
        return answer
    if data[at] != 5:
        return close()
    if len(data) < at + 4:
        return answer
    if data[at + 2] != 0:
        return close(reply(1))
    atyp, start = data[at + 3], at + 4
    if atyp == 1:
        end = start + 4
    elif atyp == 4:
        end = start + 16
    elif atyp == 3:
        if len(data) < start + 1:
            return answer
        end = start + 1 + data[start]
    else:
        return close(reply(8))
    if len(data) < end + 2:
        return answer
    if atyp == 3:
        try:
            host = parse_host(data[start + 1 : end].decode("utf-8")) if end > start + 1 else None
        except (UnicodeDecodeError, InvalidAddress):
            host = None
        if host is None:
            return close(reply(4))
    else:
        host = ipaddress.ip_address(data[start:end])
    port = struct.unpack("!H", data[end : end + 2])[0]
    command, rest = data[at + 1], data[end + 2 :]
    if command not in (1, 2, 3):
        return close(reply(7))
    if (
        command == Command.CONNECT
        and port in (echo_port, refused_port)
        and (host == LOOPBACK or host in NAMES)
    ):
        if port == refused_port:
            return close(reply(5))
        success()
        answer.output += rest  # the echo server sends back every byte after the request
        return answer
    if command == Command.UDP_ASSOCIATE and host in (LOOPBACK, ANYWHERE):
        success()  # bytes on the control connection are discarded
        return answer
    return close(reply(2))


class Policy:
    """The server side of the model's policy, as a plugin."""

    def __init__(self, echo_port: int, refused_port: int) -> None:
        self.ports = (echo_port, refused_port)

    @hookimpl
    def socksflow_request(self, request):
        destination, command = request.destination, request.command
        to_target = destination.host == LOOPBACK or destination.host in NAMES
        if command == Command.CONNECT and destination.port in self.ports and to_target:
            return None
        if command == Command.UDP_ASSOCIATE and destination.host in (LOOPBACK, ANYWHERE):
            return None
        return Verdict.deny("outside the model")

    @hookimpl
    def socksflow_resolve(self, host):
        if host in NAMES:
            return [LOOPBACK]
        raise ResolveError(f"{host} is not in the model")


# ---------------------------------------------------------------------------- what clients send


def messages(echo_port: int, refused_port: int) -> list[bytes]:
    def connect(atyp_and_address: bytes, port: int, command: int = 1) -> bytes:
        return bytes((5, command, 0)) + atyp_and_address + struct.pack("!H", port)

    ipv4, name = b"\x01\x7f\x00\x00\x01", b"\x03\x0btarget.test"
    return [
        b"\x05\x01\x00", b"\x05\x01\x02", b"\x05\x02\x00\x02", b"\x05\x01\x01", b"\x05\x00", b"\x04\x01\x00",
        b"\x01\x05alice\x06" + PASSWORD, b"\x01\x05alice\x05wrong", b"\x01\x05alice\x00", b"\x05\x05alice\x01x",
        connect(ipv4, echo_port), connect(name, echo_port), connect(b"\x03\x09LOCALHOST", echo_port),
        connect(ipv4, refused_port), connect(b"\x01\xc0\x00\x02\x01", 80), connect(b"\x03\x0bexample.com", 443),
        connect(b"\x03\x03a b", echo_port), connect(b"\x03\x00", echo_port), connect(ipv4, echo_port, 2),
        connect(b"\x01\x00\x00\x00\x00", 0, 3), connect(ipv4, 5353, 3), connect(ipv4, echo_port, 9),
        connect(b"\x02\x7f\x00\x00\x01", echo_port), b"\x05\x01\x01\x01\x7f\x00\x00\x01\x00\x50",
        b"payload", b"\x00" * 300,
    ]  # fmt: skip


def fragments(echo_port: int, refused_port: int) -> st.SearchStrategy[bytes]:
    known = st.sampled_from(messages(echo_port, refused_port))

    def corrupt(message: bytes, index: int, value: int) -> bytes:
        index %= len(message)
        return message[:index] + bytes((value,)) + message[index + 1 :]

    return st.one_of(
        known,
        known.flatmap(lambda m: st.integers(1, len(m)).map(lambda n: m[:n])),  # a truncated message
        st.builds(corrupt, known, st.integers(0, 255), st.integers(0, 255)),  # one byte changed
        st.binary(min_size=1, max_size=24),
    )


# ---------------------------------------------------------------------------- the machine


class Problems(logging.Handler):
    """Collects every error and every traceback the server logs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


def session_machine(server, echo_port: int, refused_port: int) -> type[RuleBasedStateMachine]:
    address = (server.host, server.port)

    class SessionMachine(RuleBasedStateMachine):
        """One client connection at a time; a finished connection is followed by a new one."""

        @initialize()
        def open(self) -> None:
            self.sock = socket.create_connection(address, timeout=5)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.opened = time.monotonic()
            self.sent = b""
            self.received = bytearray()
            self.server_closed = False
            self.silences = getattr(self, "silences", 0)

        @precondition(lambda self: not self.model().closed)
        @rule(fragment=fragments(echo_port, refused_port), cuts=st.lists(st.integers(1, 23), max_size=3))
        def send(self, fragment: bytes, cuts: list[int]) -> None:
            points = sorted({c for c in cuts if c < len(fragment)})
            for begin, end in zip([0, *points], [*points, len(fragment)], strict=True):
                try:
                    self.sock.sendall(fragment[begin:end])
                except OSError:  # closed by the server: the model must say so, or will after this
                    break
                time.sleep(0.001)
            self.sent += fragment
            self.check(final=False)

        @rule()
        def half_close(self) -> None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
            self.finish()

        @rule()
        def reset(self) -> None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()
            self.open()

        @precondition(
            lambda self: self.sent and not self.silences and not self.model().settled
            and time.monotonic() - self.opened < HANDSHAKE_TIMEOUT / 2
        )  # fmt: skip
        @rule()
        def fall_silent(self) -> None:
            """Stop mid-handshake: the deadline, counted from the accept, closes the connection."""
            self.silences += 1  # once per example: each costs the handshake timeout
            self.read_until(lambda: self.server_closed, self.opened + HANDSHAKE_TIMEOUT + 2)
            assert self.server_closed, "a silent client outlived the handshake deadline"
            assert time.monotonic() - self.opened >= HANDSHAKE_TIMEOUT - 0.1
            self.check(final=True)
            self.sock.close()
            self.open()

        def finish(self) -> None:
            """After the client's EOF: the server answers what it owes, then closes."""
            self.read_until(lambda: self.server_closed, time.monotonic() + 5)
            assert self.server_closed, f"no close after the client's EOF; sent {self.sent!r}"
            self.check(final=True)
            self.sock.close()
            self.open()

        def model(self) -> Owed:
            return owed(self.sent, echo_port, refused_port)

        def check(self, final: bool) -> None:
            expected = self.model()
            if not final:  # wait for what is owed (and the close, if one is owed)
                done = lambda: self.matches(expected) and (self.server_closed or not expected.closed)  # noqa: E731
                self.read_until(done, time.monotonic() + 3)
            assert self.matches(expected), (
                f"sent {self.sent!r}: got {bytes(self.received)!r}, owed {expected}"
            )
            if expected.closed and not final:
                assert self.server_closed, f"sent {self.sent!r}: the server should have closed"
            if self.server_closed and not expected.closed and not final:
                # Only the handshake deadline may close what the model keeps open (a slow machine).
                assert not expected.settled, f"sent {self.sent!r}: closed while relaying"
                assert time.monotonic() - self.opened >= HANDSHAKE_TIMEOUT - 0.05, (
                    f"sent {self.sent!r}: closed early"
                )
                self.sock.close()
                self.open()

        def matches(self, expected: Owed) -> bool:
            got = bytearray(self.received)
            for offset in expected.ports:  # any port the server bound
                if len(got) >= offset + 2:
                    got[offset : offset + 2] = expected.output[offset : offset + 2]
            return got == expected.output

        def read_until(self, done, deadline: float) -> None:
            while not done() and not self.server_closed:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    return
                ready, _, _ = select.select([self.sock], [], [], min(wait, 0.05))
                if ready:
                    try:
                        chunk = self.sock.recv(65536)
                    except ConnectionResetError:
                        chunk = b""
                    if chunk:
                        self.received += chunk
                    else:
                        self.server_closed = True

        def teardown(self) -> None:
            with contextlib.suppress(OSError):
                self.sock.close()

    return SessionMachine


def test_any_sequence_of_client_bytes_ends_in_the_owed_answer_or_a_close(
    socksflow_server, echo_target, refusing_port, tmp_path
):
    users = write_htpasswd(tmp_path / "users", {"alice": PASSWORD.decode()})
    server = socksflow_server(
        f"auth: {{methods: [userpass, none], users: {users}}}\n"
        f"timeouts: {{handshake: {HANDSHAKE_TIMEOUT}s, idle: 30s}}\n",
        plugins=[Policy(echo_target[1], refusing_port)],
    )
    problems = Problems()
    logging.getLogger().addHandler(problems)
    try:
        run_state_machine_as_test(
            session_machine(server, echo_target[1], refusing_port),
            settings=settings(
                max_examples=60, stateful_step_count=8, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
            ),
        )  # fmt: skip
        deadline = time.monotonic() + 5
        while server.call(lambda: len(server.server.sessions)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.call(lambda: len(server.server.sessions)) == 0, "sessions left open"
    finally:
        logging.getLogger().removeHandler(problems)
    assert not problems.records, [problems.format(r) for r in problems.records]


FAILED = b"\x00\x01\x00\x00\x00\x00\x00\x00"  # RSV ATYP BND 0.0.0.0:0 of a failure reply


@pytest.mark.smoke
@pytest.mark.parametrize(
    ("stream", "output", "closed"),
    [
        (b"", b"", False),
        (b"\x04", b"\x00\x5b\x00\x00\x00\x00\x00\x00", True),  # SOCKS4 on a SOCKS5 port: its "no"
        (b"\x00", b"", True),
        (b"\x05\x01\x00", b"\x05\x00", False),
        (b"\x05\x02\x00\x02\x01\x05alice\x06" + PASSWORD, b"\x05\x02\x01\x00", False),
        (b"\x05\x01\x02\x01\x05alice\x01x", b"\x05\x02\x01\x01", True),
        (b"\x05\x01\x01", b"\x05\xff", True),
        (b"\x05\x01\x00\x05\x01\x00\x03\x00\x00\x50", b"\x05\x00\x05\x04" + FAILED, True),
        (b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x09", b"\x05\x00\x05\x02" + FAILED, True),
        (b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x08", b"\x05\x00\x05\x05" + FAILED, True),
        (
            b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x07hi",
            b"\x05\x00\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x00hi",
            False,
        ),
    ],
)
def test_the_model_itself(stream, output, closed):
    """The model is code too: answers worked out by hand from the RFCs (BND ports zeroed)."""
    result = owed(stream, echo_port=7, refused_port=8)
    assert (bytes(result.output), result.closed) == (output, closed)
