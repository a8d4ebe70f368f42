"""Byte-level tests of the sans-I/O HTTP proxy layer (h11 underneath)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socksflow.httpforward import Forwarder, NextRequest, ToUpstream
from socksflow.httpproxy import (
    MAX_HEAD,
    HttpError,
    HttpProxyConnection,
    ProxyRequest,
    basic_credentials,
    host_header,
    parse_authority,
)
from socksflow.protocol import NEED_DATA, Address, Command, Phase, ProtocolError, Reply, Request


def take(wire: bytes) -> tuple[HttpProxyConnection, ProxyRequest]:
    conn = HttpProxyConnection()
    conn.receive_data(wire)
    event = conn.next_event()
    assert isinstance(event, ProxyRequest)
    return conn, event


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("example.com:443", None, Address("example.com", 443)),
        ("EXAMPLE.com.:8080", None, Address("example.com", 8080)),
        ("[::1]:22", None, Address.parse("[::1]:22")),
        ("127.0.0.1:1", None, Address.parse("127.0.0.1:1")),
        ("example.com", 80, Address("example.com", 80)),
        ("[2001:db8::1]", 80, Address.parse("[2001:db8::1]:80")),
    ],
)
def test_authorities(text: str, default: int | None, expected: Address) -> None:
    assert parse_authority(text, default) == expected


@pytest.mark.parametrize(
    "text", ["example.com", "::1:80", "a:b", "a:0", "a:65536", "[::1]x", "bad host!:80", ""]
)
def test_bad_authorities(text: str) -> None:
    with pytest.raises(HttpError) as caught:
        parse_authority(text)
    assert caught.value.response.startswith(b"HTTP/1.1 400 Bad Request\r\n")


def test_connect_tunnel() -> None:
    conn, event = take(b"CONNECT Example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03\x01")
    assert event.request == Request(Command.CONNECT, Address("example.com", 443))
    assert event.tunnel and event.credentials is None
    assert conn.trailing_data == b""
    assert conn.send_reply(Reply.SUCCEEDED) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert conn.phase is Phase.DONE
    assert conn.trailing_data == b"\x16\x03\x01"


def test_absolute_form_is_forwarded_in_origin_form() -> None:
    wire = (
        b"POST http://user@Example.com:8080/a/b?c=d#frag HTTP/1.1\r\n"
        b"Host: wrong.example\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive, X-Drop\r\n"
        b"X-Drop: 1\r\nProxy-Authorization: Basic YTpi\r\nVia: 1.0 other\r\nContent-Length: 5\r\n"
        b"Keep-Alive: 300\r\nTE: trailers\r\nAccept: */*\r\n\r\nhel"
    )
    conn, event = take(wire)
    assert event.request == Request(Command.CONNECT, Address("example.com", 8080))
    assert not event.tunnel and event.path == b"/a/b?c=d"
    assert event.credentials == (b"a", b"b")
    with pytest.raises(RuntimeError):  # never relayed raw: the Forwarder re-frames it
        conn.send_reply(Reply.SUCCEEDED)
    forwarder = Forwarder()
    forwarder.receive_client(wire + b"lo")
    decide = forwarder.next_event()
    assert isinstance(decide, NextRequest) and decide.request == event
    forwarder.forward(decide.request)
    sent = b""
    while isinstance(out := forwarder.next_event(), ToUpstream):
        sent += out.data
    assert sent == (
        b"POST /a/b?c=d HTTP/1.1\r\nhost: example.com:8080\r\ncontent-length: 5\r\naccept: */*\r\n"
        b"via: 1.0 other, 1.1 socksflow\r\n\r\nhello"
    )


@pytest.mark.parametrize(
    ("target", "host", "path"),
    [
        (b"http://example.com", b"example.com", b"/"),
        (b"http://example.com?x", b"example.com", b"/?x"),
        (b"http://[::1]:8000/p", b"[::1]:8000", b"/p"),
        (b"HTTP://127.0.0.1:80/", b"127.0.0.1", b"/"),
    ],
)
def test_absolute_targets(target: bytes, host: bytes, path: bytes) -> None:
    _, event = take(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (event.path, host_header(event.destination), event.tunnel) == (path, host, False)


@pytest.mark.parametrize(
    ("wire", "status", "message"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "this is a proxy"),
        (b"GET https://x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, "is not forwarded"),
        (b"GARBAGE\r\n\r\n", 400, "illegal request line"),
        (b"GET http://x/ HTTP/1.1\r\n\r\n", 400, "Host"),
        (b"CONNECT x HTTP/1.1\r\nHost: x\r\n\r\n", 400, "HOST:PORT"),
        (b"CONNECT x:1 HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic !!\r\n\r\n", 400, "malformed"),
        (b"CONNECT x:1 HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic YWI=\r\n\r\n", 400, "without ':'"),
        (b"GET http://x/ HTTP/1.1\r\nHost: x\r\nX: " + b"a" * MAX_HEAD, 431, "longer than"),
    ],
)
def test_bad_requests(wire: bytes, status: int, message: str) -> None:
    conn = HttpProxyConnection()
    conn.receive_data(wire)
    with pytest.raises(HttpError, match=message) as caught:
        conn.next_event()
    assert caught.value.status == status
    assert caught.value.response.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"Connection: close\r\n" in caught.value.response
    assert conn.phase is Phase.CLOSED


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        (Reply.NOT_ALLOWED, 403),
        (Reply.TTL_EXPIRED, 504),
        (Reply.CONNECTION_REFUSED, 502),
        (Reply.HOST_UNREACHABLE, 502),
        (Reply.GENERAL_FAILURE, 502),
    ],
)
def test_failure_statuses(reply: Reply, status: int) -> None:
    conn, _ = take(b"CONNECT x:1 HTTP/1.1\r\nHost: x\r\n\r\n")
    response = conn.send_reply(reply, reason="denied by rules.yaml:3\r\nX-Evil: 1")
    assert response.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"X-Socksflow-Reason: denied by rules.yaml:3??X-Evil: 1\r\n" in response
    assert conn.phase is Phase.CLOSED


def test_reason_header_can_be_turned_off() -> None:
    conn = HttpProxyConnection(reason_header="")
    conn.receive_data(b"CONNECT x:1 HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    assert b"Reason" not in conn.send_reply(Reply.NOT_ALLOWED, reason="secret rule")


def test_login_refusal_and_other_answers() -> None:
    conn, _ = take(b"CONNECT x:1 HTTP/1.1\r\nHost: x\r\n\r\n")
    response = conn.refuse_login()
    assert response.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
    assert b'Proxy-Authenticate: Basic realm="socksflow"\r\n' in response
    assert basic_credentials(b"Bearer xyz") is None
    token = base64.b64encode(b"alice:p:w").decode()
    assert basic_credentials(f"basic {token}".encode()) == (b"alice", b"p:w")


def test_leading_blank_lines_and_split_head() -> None:
    conn = HttpProxyConnection()
    for byte in b"\r\n\r\nCONNECT x:1 HTTP/1.1\r\nHost: x\r\n\r":
        conn.receive_data(bytes([byte]))
        assert conn.next_event() is NEED_DATA
    conn.receive_data(b"\n")
    assert conn.next_event().destination == Address("x", 1)
    assert conn.next_event() is NEED_DATA


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 400))
def test_random_bytes_raise_only_protocol_errors(data: bytes, split: int) -> None:
    for wire in (data, b"GET http://" + data, b"CONNECT " + data + b"\r\n\r\n"):
        conn = HttpProxyConnection()
        try:
            conn.receive_data(wire[:split])
            conn.next_event()
            conn.receive_data(wire[split:])
            conn.next_event()
        except ProtocolError as exc:
            assert exc.response.startswith(b"HTTP/1.1 4")
            assert conn.phase is Phase.CLOSED


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 200), max_size=5))
def test_split_anywhere_gives_the_same_request(cuts: list[int]) -> None:
    wire = b"GET http://127.0.0.1:8080/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\nabc"
    conn = HttpProxyConnection()
    events, previous = [], 0
    for cut in [*sorted(c % (len(wire) + 1) for c in cuts), len(wire)]:
        conn.receive_data(wire[previous:cut])
        previous = cut
        event = conn.next_event()
        if event is not NEED_DATA:
            events.append(event)
    assert [e.destination for e in events] == [Address.parse("127.0.0.1:8080")]
    assert conn.buffered == len(b"abc")
    with pytest.raises(RuntimeError):  # only the Forwarder sends a forwarded request on
        conn.send_reply(Reply.SUCCEEDED)
