"""Byte-level tests of the sans-I/O SOCKS4/4a layer: wire tables, the state machine, fuzzing."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.provisional import domains

from socksflow.protocol import NEED_DATA, Address, Command, Phase, ProtocolError, Reply, Request
from socksflow.socks4 import (
    MAX_HOSTNAME_LENGTH,
    MAX_USERID_LENGTH,
    Socks4Connection,
    Socks4Error,
    Socks4Reply,
    Socks4Request,
    build_reply,
    build_request,
    parse_reply,
    parse_request,
)

REJECT = bytes((0, 0x5B, 0, 0, 0, 0, 0, 0))


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (
            b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00",
            Socks4Request(Command.CONNECT, Address.parse("127.0.0.1:80")),
        ),
        (
            b"\x04\x02\x1f\x90\xc0\x00\x02\x07alice\x00",
            Socks4Request(Command.BIND, Address.parse("192.0.2.7:8080"), b"alice"),
        ),
        (
            b"\x04\x01\x01\xbb\x00\x00\x00\x01bob\x00Example.COM.\x00",
            Socks4Request(Command.CONNECT, Address("example.com", 443), b"bob", socks4a=True),
        ),
        (  # 4a with an IP literal as the name: the rules see an address
            b"\x04\x01\x00\x16\x00\x00\x00\xff\x0010.1.2.3\x00",
            Socks4Request(Command.CONNECT, Address.parse("10.1.2.3:22"), socks4a=True),
        ),
        (  # 0.0.0.0 is not 4a: x must not be zero
            b"\x04\x01\x00\x01\x00\x00\x00\x00\x00",
            Socks4Request(Command.CONNECT, Address.parse("0.0.0.0:1")),
        ),
    ],
)
def test_requests(wire: bytes, expected: Socks4Request) -> None:
    assert parse_request(wire) == (expected, len(wire))
    for end in range(len(wire)):
        assert parse_request(wire[:end]) is None


@pytest.mark.parametrize(
    ("wire", "message", "response"),
    [
        (b"\x05\x01\x00", "SOCKS version 0x05", b""),
        (b"\x04\x03\x00\x50\x7f\x00\x00\x01\x00", "command 0x03", REJECT),
        (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00bad name!\x00", "bad SOCKS4a host name", REJECT),
        (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00\xff\xfe\x00", "bad SOCKS4a host name", REJECT),
        (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00\x00", "bad SOCKS4a host name", REJECT),  # empty name
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * (MAX_USERID_LENGTH + 1), "USERID longer", REJECT),
        (
            b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + b"a" * (MAX_HOSTNAME_LENGTH + 1),
            "host name longer",
            REJECT,
        ),
    ],
)
def test_bad_requests(wire: bytes, message: str, response: bytes) -> None:
    with pytest.raises(Socks4Error, match=message) as caught:
        parse_request(wire)
    assert caught.value.response == response


def test_longest_fields_are_accepted() -> None:
    userid = b"u" * MAX_USERID_LENGTH
    name = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 characters, the DNS limit
    wire = b"\x04\x01\x00\x50\x00\x00\x00\x01" + userid + b"\0" + name.encode() + b"\0"
    event, used = parse_request(wire)
    assert (event.userid, event.destination.host, used) == (userid, name, len(wire))


@pytest.mark.parametrize(
    ("reply", "bound", "wire"),
    [
        (Reply.SUCCEEDED, Address.parse("192.0.2.1:1080"), b"\x00\x5a\x04\x38\xc0\x00\x02\x01"),
        (Reply.NOT_ALLOWED, Address.parse("0.0.0.0:0"), REJECT),
        (Reply.CONNECTION_REFUSED, Address.parse("0.0.0.0:0"), REJECT),
        (Reply.SUCCEEDED, Address.parse("[::1]:9"), b"\x00\x5a\x00\x09\x00\x00\x00\x00"),  # v6: no room
    ],
)
def test_replies(reply: Reply, bound: Address, wire: bytes) -> None:
    conn = Socks4Connection()
    conn.receive_data(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00")
    conn.next_event()
    assert conn.send_reply(reply, bound) == wire
    assert conn.phase is (Phase.DONE if reply == Reply.SUCCEEDED else Phase.CLOSED)


def test_state_machine_connect_with_data_ahead() -> None:
    conn = Socks4Connection()
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"\x04\x01\x00\x50\x7f\x00")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"\x00\x01me\x00GET / HTTP/1.0\r\n")
    event = conn.next_event()
    assert event.request == Request(Command.CONNECT, Address.parse("127.0.0.1:80"))
    assert event.userid == b"me"
    assert conn.next_event() is NEED_DATA
    assert conn.trailing_data == b""  # not before the reply
    with pytest.raises(RuntimeError):
        conn.send_second_reply(Reply.SUCCEEDED)
    conn.send_reply(Reply.SUCCEEDED)
    assert conn.trailing_data == b"GET / HTTP/1.0\r\n"
    assert conn.trailing_data == b""


def test_state_machine_bind_two_replies() -> None:
    conn = Socks4Connection()
    conn.receive_data(b"\x04\x02\x00\x00\xc0\x00\x02\x07\x00")
    assert conn.next_event().command == Command.BIND
    assert conn.send_reply(Reply.SUCCEEDED, Address.parse("127.0.0.1:4000"))[:2] == b"\x00\x5a"
    assert conn.send_second_reply(Reply.SUCCEEDED, Address.parse("192.0.2.7:5000")) == (
        b"\x00\x5a\x13\x88\xc0\x00\x02\x07"
    )
    assert conn.phase is Phase.DONE
    assert conn.send_second_reply(Reply.TTL_EXPIRED) == REJECT
    assert conn.phase is Phase.CLOSED


def test_error_closes() -> None:
    conn = Socks4Connection()
    conn.receive_data(b"\x04\x09\x00\x50\x7f\x00\x00\x01\x00")
    with pytest.raises(Socks4Error):
        conn.next_event()
    assert conn.phase is Phase.CLOSED
    assert conn.next_event() is NEED_DATA


def test_client_helpers() -> None:
    assert parse_reply(b"\x00\x5a\x00\x50\x7f\x00") is None
    assert parse_reply(b"\x00\x5a\x00\x50\x7f\x00\x00\x01") == (0x5A, Address.parse("127.0.0.1:80"))
    with pytest.raises(Socks4Error):
        parse_reply(b"\x04\x5a\x00\x50\x7f\x00\x00\x01")
    with pytest.raises(ValueError):
        build_request(Command.CONNECT, Address.parse("[::1]:80"))
    assert build_reply(Socks4Reply.NO_IDENTD)[1] == 0x5C


# ---------------------------------------------------------------------------- property tests

ipv4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1)).filter(lambda ip: not (0 < int(ip) < 256))
hosts = st.one_of(ipv4, domains().map(str.lower))
destinations = st.builds(Address, hosts, st.integers(0, 65535))
userids = st.binary(max_size=MAX_USERID_LENGTH).map(lambda b: b.replace(b"\0", b"x"))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([Command.CONNECT, Command.BIND]), destinations, userids)
def test_build_parse_round_trip(command: Command, destination: Address, userid: bytes) -> None:
    wire = build_request(command, destination, userid)
    event, used = parse_request(wire)
    assert (event.command, event.destination, event.userid, used) == (command, destination, userid, len(wire))
    assert event.socks4a == destination.is_domain


@settings(max_examples=300, deadline=None)
@given(destinations, userids, st.binary(max_size=40), st.lists(st.integers(0, 600), max_size=6))
def test_split_anywhere_gives_the_same_events(
    destination: Address, userid: bytes, ahead: bytes, cuts: list[int]
) -> None:
    wire = build_request(Command.CONNECT, destination, userid) + ahead
    conn = Socks4Connection()
    events = []
    previous = 0
    for cut in [*sorted(c % (len(wire) + 1) for c in cuts), len(wire)]:
        conn.receive_data(wire[previous:cut])
        previous = cut
        event = conn.next_event()
        if event is not NEED_DATA:
            events.append(event)
    assert events == [Socks4Request(Command.CONNECT, destination, userid, destination.is_domain)]
    conn.send_reply(Reply.SUCCEEDED)
    assert conn.trailing_data == ahead


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 600))
def test_random_bytes_raise_only_protocol_errors(data: bytes, split: int) -> None:
    for wire in (data, b"\x04" + data, b"\x04\x01\x00\x50\x00\x00\x00\x07" + data):
        conn = Socks4Connection()
        try:
            conn.receive_data(wire[:split])
            conn.next_event()
            conn.receive_data(wire[split:])
            conn.next_event()
        except ProtocolError:
            assert conn.phase is Phase.CLOSED
