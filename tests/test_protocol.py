"""Byte-level tests of the sans-I/O SOCKS5 layer: tables of wire bytes, the state machine, fuzzing."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.provisional import domains

from socksflow.protocol import (
    NEED_DATA,
    Address,
    AddressTypeNotSupported,
    Command,
    CommandNotSupported,
    Greeting,
    InvalidAddress,
    MalformedMessage,
    Method,
    Phase,
    ProtocolError,
    Reply,
    Request,
    ServerConnection,
    UdpHeader,
    UnsupportedVersion,
    UserPassAuth,
    build_auth_status,
    build_greeting,
    build_method_selection,
    build_reply,
    build_request,
    build_udp_header,
    build_userpass,
    decode_address,
    encode_address,
    parse_greeting,
    parse_host,
    parse_reply,
    parse_request,
    parse_udp_header,
    parse_userpass,
)

pytestmark = pytest.mark.smoke
# Hypothesis examples run without a deadline: timing on a shared machine is not what these test.

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
h = bytes.fromhex

# An IPv4 0.0.0.0:0 BND after VER REP RSV: what every failure reply carries.
NO_BND = h("01 00000000 0000")


def reply_bytes(code: int) -> bytes:
    return bytes((0x05, code, 0x00)) + NO_BND


def all_prefixes(data: bytes) -> list[bytes]:
    return [data[:n] for n in range(len(data))]


# ============================================================================ greeting


@pytest.mark.parametrize(
    ("data", "methods", "consumed"),
    [
        (h("05 01 00"), (0x00,), 3),
        (h("05 02 00 02"), (0x00, 0x02), 4),
        (h("05 03 02 01 80"), (0x02, 0x01, 0x80), 5),
        (h("05 01 ff"), (0xFF,), 3),
        (h("05 01 00") + b"pipelined", (0x00,), 3),
        (bytes((5, 255, *range(255))), tuple(range(255)), 257),
    ],
)
def test_greeting_parses(data: bytes, methods: tuple[int, ...], consumed: int) -> None:
    assert parse_greeting(data) == (Greeting(methods), consumed)


@pytest.mark.parametrize("data", [b"", h("05"), h("05 02 00"), bytes((5, 255, *range(254)))])
def test_greeting_needs_more(data: bytes) -> None:
    assert parse_greeting(data) is None


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (h("05 00"), MalformedMessage),  # NMETHODS = 0
        (h("04 01 00"), UnsupportedVersion),  # SOCKS4
        (h("04"), UnsupportedVersion),  # the version is judged on the first byte alone
        (b"GET / HTTP/1.1\r\n", UnsupportedVersion),
        (h("01 01 00"), UnsupportedVersion),
    ],
)
def test_greeting_errors(data: bytes, error: type[ProtocolError]) -> None:
    with pytest.raises(error):
        parse_greeting(data)


@pytest.mark.parametrize("methods", [[0], [0, 2], list(range(255))])
def test_build_greeting(methods: list[int]) -> None:
    assert build_greeting(methods) == bytes((5, len(methods), *methods))


@pytest.mark.parametrize(
    ("method", "wire"),
    [(Method.NO_AUTH, h("05 00")), (Method.USERPASS, h("05 02")), (Method.NO_ACCEPTABLE, h("05 ff"))],
)
def test_build_method_selection(method: Method, wire: bytes) -> None:
    assert build_method_selection(method) == wire


# ============================================================================ RFC 1929


@pytest.mark.parametrize(
    ("data", "username", "password", "consumed"),
    [
        (b"\x01\x05alice\x06secret", b"alice", b"secret", 14),
        (b"\x01\x05alice\x06secret" + b"\x05\x01", b"alice", b"secret", 14),
        (h("01 00 00"), b"", b"", 3),  # ULEN and PLEN 0 parse; the plugin decides
        (b"\x01\x01u\x00", b"u", b"", 4),
        (b"\x01\x00\x01p", b"", b"p", 4),
        (h("01 02 fffe 02 c328"), h("fffe"), h("c328"), 7),  # not UTF-8: stays bytes
        (bytes((1, 255)) + b"u" * 255 + bytes((255,)) + b"p" * 255, b"u" * 255, b"p" * 255, 513),
    ],
)
def test_userpass_parses(data: bytes, username: bytes, password: bytes, consumed: int) -> None:
    assert parse_userpass(data) == (UserPassAuth(username, password), consumed)


@pytest.mark.parametrize("data", all_prefixes(b"\x01\x05alice\x06secret"))
def test_userpass_needs_more(data: bytes) -> None:
    assert parse_userpass(data) is None


@pytest.mark.parametrize("version", [0x00, 0x02, 0x05, 0xFF])
def test_userpass_version_must_be_1(version: int) -> None:
    with pytest.raises(UnsupportedVersion) as caught:
        parse_userpass(bytes((version, 5)) + b"alice\x06secret")
    assert caught.value.response == b"\x01\x01"


def test_userpass_repr_hides_the_password() -> None:
    text = repr(UserPassAuth(b"alice", b"hunter2"))
    assert "hunter2" not in text
    assert "alice" in text and "7 bytes" in text


@pytest.mark.parametrize(
    ("username", "password"), [(b"alice", b"secret"), (b"", b""), (h("ff00"), b"\x01" * 255)]
)
def test_build_userpass(username: bytes, password: bytes) -> None:
    wire = build_userpass(username, password)
    assert wire == bytes((1, len(username))) + username + bytes((len(password),)) + password


def test_build_auth_status() -> None:
    assert build_auth_status(True) == h("01 00")
    assert build_auth_status(False) == h("01 01")


# ============================================================================ requests

REQUEST_ADDRESSES = [
    (h("01 7f000001 0050"), Address(V4("127.0.0.1"), 80)),
    (h("01 c0000201 ffff"), Address(V4("192.0.2.1"), 65535)),
    (h("01 00000000 0000"), Address(V4("0.0.0.0"), 0)),
    (b"\x03\x0bexample.com\x01\xbb", Address("example.com", 443)),
    (h("04") + V6("::1").packed + h("1f90"), Address(V6("::1"), 8080)),
    (h("04") + V6("2001:db8::1").packed + h("0016"), Address(V6("2001:db8::1"), 22)),
]


@pytest.mark.parametrize("command", list(Command))
@pytest.mark.parametrize(("encoded", "destination"), REQUEST_ADDRESSES)
def test_request_parses(command: Command, encoded: bytes, destination: Address) -> None:
    data = bytes((5, command, 0)) + encoded
    assert parse_request(data + b"optimistic") == (Request(command, destination), len(data))
    assert build_request(command, destination) == data


@pytest.mark.parametrize(("encoded", "destination"), REQUEST_ADDRESSES)
def test_request_needs_more(encoded: bytes, destination: Address) -> None:
    for prefix in all_prefixes(bytes((5, 1, 0)) + encoded):
        assert parse_request(prefix) is None, prefix


@pytest.mark.parametrize("command", [0x00, 0x04, 0x05, 0xF2, 0xFF])
def test_unknown_command_gets_reply_7(command: int) -> None:
    with pytest.raises(CommandNotSupported) as caught:
        parse_request(bytes((5, command, 0)) + h("01 7f000001 0050"))
    assert caught.value.response == h("05 07 00 01 00000000 0000")
    assert caught.value.reply == Reply.COMMAND_NOT_SUPPORTED


@pytest.mark.parametrize("atyp", [0x00, 0x02, 0x05, 0xFF])
def test_unknown_address_type_gets_reply_8(atyp: int) -> None:
    with pytest.raises(AddressTypeNotSupported) as caught:
        parse_request(bytes((5, 1, 0, atyp)) + h("7f000001 0050"))
    assert caught.value.response == h("05 08 00 01 00000000 0000")


@pytest.mark.parametrize("rsv", [0x01, 0x80, 0xFF])
def test_request_rsv_must_be_zero(rsv: int) -> None:
    with pytest.raises(MalformedMessage) as caught:
        parse_request(bytes((5, 1, rsv)) + h("01 7f000001 0050"))
    assert caught.value.response == reply_bytes(Reply.GENERAL_FAILURE)


@pytest.mark.parametrize("version", [0x04, 0x01, 0x00, 0xFF])
def test_request_version_must_be_5(version: int) -> None:
    with pytest.raises(UnsupportedVersion):
        parse_request(bytes((version, 1, 0)) + h("01 7f000001 0050"))


def domain_request(name: bytes, port: int = 80) -> bytes:
    return bytes((5, 1, 0, 3, len(name))) + name + struct.pack("!H", port)


LONG_NAME_253 = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])


@pytest.mark.parametrize(
    ("name", "host"),
    [
        (b"EXAMPLE.COM", "example.com"),
        (b"Example.Com.", "example.com"),  # one trailing dot is dropped
        (b"localhost", "localhost"),
        (b"_srv.example.com", "_srv.example.com"),
        (b"127.0.0.1", V4("127.0.0.1")),  # an IP literal sent as a name is an IP: IP rules see it
        (b"127.0.0.1.", V4("127.0.0.1")),
        (b"::1", V6("::1")),
        (b"::FFFF:127.0.0.1", V6("::ffff:127.0.0.1")),
        ("１２７.０.０.１".encode(), V4("127.0.0.1")),  # full-width digits map to an IP under IDNA
        ("127。0。0。1".encode(), V4("127.0.0.1")),  # so do ideographic full stops
        ("bücher.de".encode(), "xn--bcher-kva.de"),
        ("BÜCHER.DE".encode(), "xn--bcher-kva.de"),
        (("a" * 63 + ".com").encode(), "a" * 63 + ".com"),
        (LONG_NAME_253.encode(), LONG_NAME_253),
        ((LONG_NAME_253 + ".").encode(), LONG_NAME_253),
    ],
)
def test_domain_normalisation(name: bytes, host: object) -> None:
    parsed = parse_request(domain_request(name))
    assert parsed is not None
    assert parsed[0].destination == Address(host, 80)  # type: ignore[arg-type]
    assert type(parsed[0].destination.host) is type(host)


@pytest.mark.parametrize(
    "name",
    [
        b"",  # ATYP 3 with length 0
        b".",
        b"..",
        b"a..b",
        b".example.com",
        ("a" * 64 + ".com").encode(),  # label > 63
        (LONG_NAME_253 + "d").encode(),  # name > 253
        b"bad host",
        b"a/b",
        b"host:80",
        b"a\x00b",
        b"exa\rmple.com",
        h("fffe"),  # not UTF-8
        ("ü" * 64 + ".de").encode(),  # an IDNA label over 63
        "xn--ü.de".encode(),  # IDNA refuses a non-ASCII label with an ACE prefix
    ],
)
def test_impossible_domain_gets_reply_4(name: bytes) -> None:
    with pytest.raises(InvalidAddress) as caught:
        parse_request(domain_request(name))
    assert caught.value.response == h("05 04 00 01 00000000 0000")


# ============================================================================ replies

BOUND_ADDRESSES = [
    (Address(V4("192.0.2.7"), 1080), h("01 c0000207 0438")),
    (Address(V6("2001:db8::7"), 1080), h("04") + V6("2001:db8::7").packed + h("0438")),
    (Address("proxy.example", 1), b"\x03\x0dproxy.example\x00\x01"),
]


@pytest.mark.parametrize("reply", list(Reply))
@pytest.mark.parametrize(("bound", "encoded"), BOUND_ADDRESSES)
def test_reply_bytes(reply: Reply, bound: Address, encoded: bytes) -> None:
    wire = bytes((5, reply, 0)) + encoded
    assert build_reply(reply, bound) == wire
    assert parse_reply(wire) == (reply, bound, len(wire))


@pytest.mark.parametrize("reply", list(Reply))
def test_reply_without_bound_address_is_zeros(reply: Reply) -> None:
    assert build_reply(reply) == reply_bytes(reply)


def test_reply_parse_edges() -> None:
    assert parse_reply(h("05 09 00") + NO_BND) == (9, Address(V4("0.0.0.0"), 0), 10)  # unknown code kept
    for prefix in all_prefixes(reply_bytes(0)):
        assert parse_reply(prefix) is None
    with pytest.raises(UnsupportedVersion):
        parse_reply(h("04 5a 00") + NO_BND)


# ============================================================================ Address


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:1080", Address(V4("127.0.0.1"), 1080)),
        ("[::1]:1080", Address(V6("::1"), 1080)),
        ("Example.COM:443", Address("example.com", 443)),
        ("0.0.0.0:0", Address(V4("0.0.0.0"), 0)),
        ("127.0.0.1:65535", Address(V4("127.0.0.1"), 65535)),
    ],
)
def test_address_parse(text: str, address: Address) -> None:
    assert Address.parse(text) == address


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1", "'127.0.0.1' is not HOST:PORT"),
        (":80", "':80' is not HOST:PORT"),
        ("::1:80", "'::1:80': write IPv6 addresses as [addr]:port"),
        ("127.0.0.1:65536", "'127.0.0.1:65536': port must be a number from 0 to 65535"),
        ("127.0.0.1:http", "'127.0.0.1:http': port must be a number from 0 to 65535"),
        ("127.0.0.1:-1", "'127.0.0.1:-1': port must be a number from 0 to 65535"),
        ("127.0.0.1:²", "'127.0.0.1:²': port must be a number from 0 to 65535"),
        ("[]:80", "'[]:80': host name of 0 characters"),
        ("bad!host:80", "'bad!host:80': 'bad!host' has characters not allowed in a host name"),
    ],
)
def test_address_parse_errors_are_value_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        Address.parse(text)
    assert str(caught.value) == message


def test_address_text_and_sockaddr() -> None:
    assert str(Address(V6("::1"), 80)) == "[::1]:80"
    assert str(Address(V4("127.0.0.1"), 80)) == "127.0.0.1:80"
    assert str(Address("example.com", 80)) == "example.com:80"
    assert Address.from_sockaddr(("fe80::1%lo", 80, 0, 1)) == Address(V6("fe80::1"), 80)
    assert Address.from_sockaddr(("127.0.0.1", 80)).atyp == 0x01
    assert Address("example.com", 80).is_domain


# ============================================================================ UDP

UDP_HEADERS = [
    (h("0000 00 01 7f000001 0035"), UdpHeader(0, Address(V4("127.0.0.1"), 53), 10)),
    (b"\x00\x00\x00\x03\x0bexample.com\x00\x35", UdpHeader(0, Address("example.com", 53), 18)),
    (h("0000 00 04") + V6("::1").packed + h("0035"), UdpHeader(0, Address(V6("::1"), 53), 22)),
    (h("0000 01 01 7f000001 0035"), UdpHeader(1, Address(V4("127.0.0.1"), 53), 10)),  # FRAG is reported
    (h("0000 ff 01 7f000001 0035"), UdpHeader(0xFF, Address(V4("127.0.0.1"), 53), 10)),
]


@pytest.mark.parametrize(("header", "parsed"), UDP_HEADERS)
def test_udp_header(header: bytes, parsed: UdpHeader) -> None:
    datagram = header + b"payload"
    assert parse_udp_header(datagram) == parsed
    assert parse_udp_header(memoryview(datagram)) == parsed
    assert datagram[parsed.offset :] == b"payload"
    assert build_udp_header(parsed.destination, parsed.frag) == header


@pytest.mark.parametrize(("header", "parsed"), UDP_HEADERS)
def test_truncated_udp_header_is_malformed(header: bytes, parsed: UdpHeader) -> None:
    for prefix in all_prefixes(header):
        with pytest.raises(MalformedMessage):
            parse_udp_header(prefix)


@pytest.mark.parametrize(
    "datagram",
    [
        h("0100 00 01 7f000001 0035"),
        h("0001 00 01 7f000001 0035"),
        h("ffff 00 01 7f000001 0035"),
        h("0000 00 03 ff 6162"),  # a name longer than the datagram
    ],
)
def test_udp_header_rsv_and_bounds(datagram: bytes) -> None:
    with pytest.raises(MalformedMessage):
        parse_udp_header(datagram)


@pytest.mark.parametrize(
    ("datagram", "error"),
    [
        (h("0000 00 02 7f000001 0035"), AddressTypeNotSupported),
        (h("0000 00 03 00 0035"), InvalidAddress),
        (b"\x00\x00\x00\x03\x04a b.\x00\x35", InvalidAddress),
    ],
)
def test_udp_header_bad_address(datagram: bytes, error: type[ProtocolError]) -> None:
    with pytest.raises(error):
        parse_udp_header(datagram)


# ============================================================================ the state machine

BOUND = Address(V4("127.0.0.1"), 40000)
GREETING_NOAUTH = h("05 01 00")
GREETING_USERPASS = h("05 02 00 02")
CREDENTIALS = b"\x01\x05alice\x06secret"
CONNECT = h("05 01 00 01 7f000001 0050")


def drive(conn: ServerConnection, *, method: int = Method.NO_AUTH, auth_ok: bool = True) -> list[object]:
    """Take every event that is ready and answer it; return events and answers in order."""
    log: list[object] = []
    while (event := conn.next_event()) is not NEED_DATA:
        log.append(event)
        if isinstance(event, Greeting):
            log.append(conn.send_method(method))
        elif isinstance(event, UserPassAuth):
            log.append(conn.send_auth_status(auth_ok))
        elif isinstance(event, Request):
            log.append(conn.send_reply(Reply.SUCCEEDED, BOUND))
    return log


def handshake(chunks: list[bytes], **options: Any) -> tuple[list[object], bytes]:
    conn = ServerConnection()
    log: list[object] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        log += drive(conn, **options)
    return log, conn.trailing_data


NOAUTH_LOG = [
    Greeting((0,)),
    h("05 00"),
    Request(Command.CONNECT, Address(V4("127.0.0.1"), 80)),
    h("05 00 00 01 7f000001 9c40"),
]
USERPASS_LOG = [
    Greeting((0, 2)),
    h("05 02"),
    UserPassAuth(b"alice", b"secret"),
    h("01 00"),
    *NOAUTH_LOG[2:],
]


def test_handshake_without_auth() -> None:
    assert handshake([GREETING_NOAUTH, CONNECT]) == (NOAUTH_LOG, b"")


def test_handshake_with_userpass() -> None:
    assert handshake([GREETING_USERPASS, CREDENTIALS, CONNECT], method=Method.USERPASS) == (USERPASS_LOG, b"")


def test_pipelined_handshake_keeps_optimistic_data() -> None:
    payload = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert handshake([GREETING_NOAUTH + CONNECT + payload]) == (NOAUTH_LOG, payload)
    assert handshake([GREETING_USERPASS + CREDENTIALS + CONNECT + payload], method=Method.USERPASS) == (
        USERPASS_LOG,
        payload,
    )


def test_trailing_data_only_after_the_reply_and_only_once() -> None:
    conn = ServerConnection()
    conn.receive_data(GREETING_NOAUTH + CONNECT + b"early")
    assert conn.next_event() == Greeting((0,))
    conn.send_method(Method.NO_AUTH)
    assert isinstance(conn.next_event(), Request)
    assert conn.trailing_data == b""  # the reply is still owed
    assert conn.buffered == 5
    conn.send_reply(Reply.SUCCEEDED)
    assert conn.trailing_data == b"early"
    assert conn.trailing_data == b""
    conn.receive_data(b"late")
    assert conn.trailing_data == b"late"


@pytest.mark.parametrize(
    ("messages", "payload", "method"),
    [
        (GREETING_NOAUTH + CONNECT, b"payload", Method.NO_AUTH),
        (GREETING_USERPASS + CREDENTIALS + CONNECT, b"payload", Method.USERPASS),
        (GREETING_NOAUTH + domain_request(b"Example.COM.", 443), b"x", Method.NO_AUTH),
    ],
)
def test_handshake_byte_by_byte(messages: bytes, payload: bytes, method: int) -> None:
    stream = messages + payload
    whole = handshake([stream], method=method)
    assert whole[1] == payload
    assert handshake([bytes((byte,)) for byte in stream], method=method) == whole


@settings(max_examples=300, deadline=None)
@given(
    userpass=st.booleans(),
    payload=st.binary(max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12),
)
def test_handshake_split_anywhere(userpass: bool, payload: bytes, cuts: list[int]) -> None:
    if userpass:
        stream, method, expected = GREETING_USERPASS + CREDENTIALS + CONNECT, Method.USERPASS, USERPASS_LOG
    else:
        stream, method, expected = GREETING_NOAUTH + CONNECT, Method.NO_AUTH, NOAUTH_LOG
    stream += payload
    points = sorted({min(cut, len(stream)) for cut in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points)]
    conn = ServerConnection()
    log: list[object] = []
    relayed = b""
    for chunk in chunks:
        conn.receive_data(chunk)
        log += drive(conn, method=method)
        relayed += conn.trailing_data
    assert log == expected
    assert relayed == payload


def test_no_acceptable_method_closes() -> None:
    conn = ServerConnection()
    conn.receive_data(h("05 01 01") + CONNECT)
    assert conn.next_event() == Greeting((1,))
    assert conn.send_method(Method.NO_ACCEPTABLE) == h("05 ff")
    assert conn.phase is Phase.CLOSED
    assert conn.next_event() is NEED_DATA  # the pipelined request is never parsed
    assert conn.trailing_data == b""


def test_failed_auth_closes_and_never_reads_the_request() -> None:
    # CVE-2023-43644 (sing): a request pipelined after bad credentials was still served.
    stream = GREETING_USERPASS + CREDENTIALS + CONNECT + b"x"
    log, trailing = handshake([stream], method=Method.USERPASS, auth_ok=False)
    assert log == [*USERPASS_LOG[:3], h("01 01")]
    assert trailing == b""


def drive_until_request(conn: ServerConnection) -> Request:
    assert isinstance(conn.next_event(), Greeting)
    conn.send_method(Method.NO_AUTH)
    request = conn.next_event()
    assert isinstance(request, Request)
    return request


def test_failure_reply_closes() -> None:
    conn = ServerConnection()
    conn.receive_data(GREETING_NOAUTH + CONNECT + b"x")
    drive_until_request(conn)
    assert conn.send_reply(Reply.CONNECTION_REFUSED) == reply_bytes(Reply.CONNECTION_REFUSED)
    assert conn.phase is Phase.CLOSED
    assert conn.trailing_data == b""


def test_protocol_error_closes() -> None:
    conn = ServerConnection()
    conn.receive_data(GREETING_NOAUTH + h("05 09 00 01 7f000001 0050"))
    with pytest.raises(CommandNotSupported):
        drive(conn)
    assert conn.phase is Phase.CLOSED
    assert conn.next_event() is NEED_DATA


def test_bind_second_reply() -> None:
    conn = ServerConnection()
    conn.receive_data(GREETING_NOAUTH + h("05 02 00 01 c0000201 0000"))
    assert drive_until_request(conn).command is Command.BIND
    assert conn.send_reply(Reply.SUCCEEDED, BOUND) == h("05 00 00 01 7f000001 9c40")
    peer = Address(V6("::1"), 5555)
    assert conn.send_second_reply(Reply.SUCCEEDED, peer) == h("05 00 00 04") + peer.host.packed + h("15b3")
    assert conn.phase is Phase.DONE
    assert conn.send_second_reply(Reply.NOT_ALLOWED) == reply_bytes(Reply.NOT_ALLOWED)
    assert conn.phase is Phase.CLOSED


@pytest.mark.parametrize("success", [True, False])
def test_subnegotiation(success: bool) -> None:
    conn = ServerConnection()
    conn.receive_data(h("05 01 01") + h("01 01 0003 abcdef") + CONNECT)
    assert conn.next_event() == Greeting((1,))
    assert conn.send_method(Method.GSSAPI) == h("05 01")
    assert conn.phase is Phase.SUBNEGOTIATION
    assert conn.next_event() is NEED_DATA  # the plugin reads, not the parser
    assert conn.take_subnegotiation_data(4) == h("01 01 0003")
    assert conn.take_subnegotiation_data(3) == h("abcdef")
    conn.finish_subnegotiation(success)
    if success:
        assert conn.next_event() == Request(Command.CONNECT, Address(V4("127.0.0.1"), 80))
    else:
        assert conn.phase is Phase.CLOSED
        assert conn.next_event() is NEED_DATA


ANSWERS = {  # what the server sends in a phase where it owes the client an answer
    Phase.METHOD: lambda conn, method: conn.send_method(method),
    Phase.AUTH_STATUS: lambda conn, method: conn.send_auth_status(True),
    Phase.REPLY: lambda conn, method: conn.send_reply(Reply.SUCCEEDED),
}


def connection_in(phase: Phase) -> ServerConnection:
    """A connection brought to ``phase`` by real messages, fed one byte at a time."""
    conn = ServerConnection()
    method = Method.GSSAPI if phase is Phase.SUBNEGOTIATION else Method.USERPASS
    stream = iter(h("04") if phase is Phase.CLOSED else GREETING_USERPASS + CREDENTIALS + CONNECT)
    while conn.phase is not phase:
        if conn.phase in ANSWERS:
            ANSWERS[conn.phase](conn, method)
            continue
        conn.receive_data(bytes((next(stream),)))
        with contextlib.suppress(UnsupportedVersion):
            conn.next_event()
    assert conn.buffered == (1 if phase is Phase.CLOSED else 0)
    return conn


SENDERS = {
    "send_method": lambda c: c.send_method(Method.NO_AUTH),
    "send_auth_status": lambda c: c.send_auth_status(True),
    "send_reply": lambda c: c.send_reply(Reply.SUCCEEDED),
    "send_second_reply": lambda c: c.send_second_reply(Reply.SUCCEEDED),
    "take_subnegotiation_data": lambda c: c.take_subnegotiation_data(),
    "finish_subnegotiation": lambda c: c.finish_subnegotiation(True),
}
ALLOWED_IN = {
    "send_method": Phase.METHOD,
    "send_auth_status": Phase.AUTH_STATUS,
    "send_reply": Phase.REPLY,
    "send_second_reply": Phase.DONE,
    "take_subnegotiation_data": Phase.SUBNEGOTIATION,
    "finish_subnegotiation": Phase.SUBNEGOTIATION,
}


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("sender", list(SENDERS))
def test_send_in_the_wrong_phase_raises(phase: Phase, sender: str) -> None:
    conn = connection_in(phase)
    if ALLOWED_IN[sender] is phase:
        SENDERS[sender](conn)
    else:
        with pytest.raises(RuntimeError, match=f"cannot do that in phase {phase.value}"):
            SENDERS[sender](conn)
        assert conn.phase is phase


# ============================================================================ fuzzing


# Each phase with random bytes, and with random bytes behind a valid start (to reach deeper branches).
FUZZ_STARTS = [(phase, b"") for phase in Phase] + [
    (Phase.GREETING, h("05")),
    (Phase.USERPASS, h("01")),
    (Phase.REQUEST, h("05")),
    (Phase.REQUEST, h("05 01 00")),
    (Phase.REQUEST, h("05 01 00 03")),
    (Phase.REQUEST, h("05 03 00 04")),
]


@settings(max_examples=500, deadline=None)
@given(start=st.sampled_from(FUZZ_STARTS), data=st.binary(max_size=600), split=st.integers(0, 600))
def test_random_bytes_raise_only_protocol_errors(start: tuple[Phase, bytes], data: bytes, split: int) -> None:
    phase, prefix = start
    conn = connection_in(phase)
    try:
        for chunk in (prefix + data[:split], data[split:]):
            conn.receive_data(chunk)
            drive(conn, method=Method.USERPASS)
    except ProtocolError as exc:
        assert conn.phase is Phase.CLOSED
        assert isinstance(exc.response, bytes)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_datagrams_raise_only_protocol_errors(datagram: bytes) -> None:
    try:
        header = parse_udp_header(datagram)
    except ProtocolError:
        return
    assert header.offset <= len(datagram)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=8), st.binary(max_size=300))
def test_random_address_bytes_raise_only_protocol_errors(prefix: bytes, body: bytes) -> None:
    """ATYP-led bytes (as in requests, replies and UDP) at an offset: decoded, NEED more, or refused."""
    for atyp in (1, 3, 4):
        with contextlib.suppress(ProtocolError):
            decode_address(prefix + bytes((atyp,)) + body, len(prefix))
    with contextlib.suppress(ProtocolError):
        parse_reply(h("05") + body)


# ============================================================================ round trips

ports = st.integers(min_value=0, max_value=65535)
hosts = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6), domains(max_length=253).map(str.lower))
addresses = st.builds(Address, hosts, ports)


@settings(max_examples=300, deadline=None)
@given(addresses, st.binary(max_size=5), st.binary(max_size=5))
def test_address_round_trip(address: Address, before: bytes, after: bytes) -> None:
    encoded = encode_address(address)
    assert decode_address(before + encoded + after, len(before)) == (address, len(before) + len(encoded))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(Command)), addresses)
def test_request_round_trip(command: Command, destination: Address) -> None:
    wire = build_request(command, destination)
    assert parse_request(wire) == (Request(command, destination), len(wire))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(Reply)), addresses)
def test_reply_round_trip(reply: Reply, bound: Address) -> None:
    wire = build_reply(reply, bound)
    assert parse_reply(wire) == (reply, bound, len(wire))


@settings(max_examples=300, deadline=None)
@given(addresses, st.integers(min_value=0, max_value=255), st.binary(max_size=64))
def test_udp_header_round_trip(destination: Address, frag: int, payload: bytes) -> None:
    header = build_udp_header(destination, frag)
    assert parse_udp_header(header + payload) == UdpHeader(frag, destination, len(header))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=255), min_size=1, max_size=255))
def test_greeting_round_trip(methods: list[int]) -> None:
    wire = build_greeting(methods)
    assert parse_greeting(wire) == (Greeting(tuple(methods)), len(wire))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=255), st.binary(max_size=255))
def test_userpass_round_trip(username: bytes, password: bytes) -> None:
    wire = build_userpass(username, password)
    assert parse_userpass(wire) == (UserPassAuth(username, password), len(wire))


@settings(max_examples=300, deadline=None)
@given(domains(max_length=252), st.booleans())
def test_domain_spelling_does_not_matter(name: str, trailing_dot: bool) -> None:
    """Upper case and one trailing dot name the same host as the normalised form."""
    spelt = name.upper() + ("." if trailing_dot else "")
    assert parse_host(spelt) == name.lower()
    parsed = parse_request(domain_request(spelt.encode()))
    assert parsed is not None and parsed[0].destination.host == name.lower()
