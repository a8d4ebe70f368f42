"""Byte-level tests of the sans-I/O keep-alive forwarder (absolute-form requests, h11 on both sides)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socksflow.httpforward import Closed, ExchangeDone, Forwarder, NextRequest, ToClient, ToUpstream
from socksflow.httpproxy import HttpError
from socksflow.protocol import NEED_DATA, Address, ProtocolError


def drain(fw: Forwarder) -> list:
    """Every event until NEED_DATA, a NextRequest or Closed; byte events merged per direction."""
    events: list = []
    while True:
        event = fw.next_event()
        if event is NEED_DATA:
            return events
        if events and type(event) in (ToClient, ToUpstream) and type(events[-1]) is type(event):
            events[-1] = type(event)(events[-1].data + event.data)
        else:
            events.append(event)
        if isinstance(event, NextRequest | Closed):
            return events


def test_two_requests_on_one_connection_each_decided_and_reframed():
    fw = Forwarder()
    fw.receive_client(
        b"GET http://a.example/one HTTP/1.1\r\nHost: a.example\r\nProxy-Connection: keep-alive\r\n"
        b"Proxy-Authorization: Basic YTpi\r\n\r\n"
        b"POST http://b.example:8080/two HTTP/1.1\r\nHost: b.example:8080\r\nContent-Length: 5\r\n\r\nhello"
    )
    [first] = drain(fw)
    assert first.request.destination == Address("a.example", 80) and first.request.credentials == (b"a", b"b")
    fw.forward(first.request)
    assert drain(fw) == [ToUpstream(b"GET /one HTTP/1.1\r\nhost: a.example\r\nvia: 1.1 socksflow\r\n\r\n")]
    fw.receive_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\nConnection: keep-alive\r\n\r\nok"
    )
    events = drain(fw)
    assert events[0] == ToClient(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nvia: 1.1 socksflow\r\n\r\nok")
    assert events[1] == ExchangeDone(keep_alive=True, upstream_reusable=True)
    second = events[2]
    assert second.request.destination == Address("b.example", 8080)  # not sent anywhere before its decision
    fw.forward(second.request)
    assert drain(fw) == [
        ToUpstream(
            b"POST /two HTTP/1.1\r\nhost: b.example:8080\r\ncontent-length: 5\r\nvia: 1.1 socksflow\r\n\r\nhello"
        )
    ]
    fw.receive_upstream(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    events = drain(fw)
    assert events[0] == ToClient(
        b"HTTP/1.1 201 Created\r\nvia: 1.1 socksflow\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )  # h11 writes the framing itself
    assert events[1] == ExchangeDone(keep_alive=True, upstream_reusable=True)
    fw.receive_client(b"")
    assert drain(fw) == [Closed()]


def test_a_refused_request_keeps_the_connection_and_drops_the_body():
    fw = Forwarder()
    fw.receive_client(b"POST http://x/ HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody")
    assert isinstance(drain(fw)[0], NextRequest)
    answer = fw.refuse(403, (("X-Socksflow-Reason", "rules.yaml:3"),), "socksflow: forbidden\n")
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\nX-Socksflow-Reason: rules.yaml:3\r\n")
    assert drain(fw) == [ExchangeDone(keep_alive=True, upstream_reusable=False)]
    fw.receive_client(b"GET http://y/ HTTP/1.1\r\nHost: y\r\n\r\n")
    assert drain(fw)[0].request.destination == Address("y", 80)


def test_http10_client_and_closing_destination_end_the_connection():
    fw = Forwarder()
    fw.receive_client(b"GET http://x/ HTTP/1.0\r\n\r\n")
    [event] = drain(fw)
    fw.forward(event.request)
    drain(fw)
    fw.receive_upstream(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nstreamed until close")
    fw.receive_upstream(b"")
    events = drain(fw)
    assert events[0].data.endswith(b"\r\n\r\nstreamed until close")
    assert (
        b"via: 1.1 socksflow" in events[0].data and b"onnection: close" in events[0].data
    )  # h11's own, for 1.0
    assert events[1:] == [ExchangeDone(keep_alive=False, upstream_reusable=False), Closed()]


def test_head_and_interim_responses():
    fw = Forwarder()
    fw.receive_client(b"HEAD http://x/big HTTP/1.1\r\nHost: x\r\n\r\n")
    [event] = drain(fw)
    fw.forward(event.request)
    drain(fw)
    fw.receive_upstream(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    events = drain(fw)
    assert events[0] == ToClient(
        b"HTTP/1.1 100 Continue\r\nvia: 1.1 socksflow\r\n\r\n"
        b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\nvia: 1.1 socksflow\r\n\r\n"
    )  # a HEAD response has no body, whatever its Content-Length says
    assert events[1] == ExchangeDone(True, True)


def test_failures():
    fw = Forwarder()
    fw.receive_client(b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n")
    [event] = drain(fw)
    fw.forward(event.request)
    drain(fw)
    fw.receive_upstream(b"NOT HTTP\r\n\r\n")
    with pytest.raises(ProtocolError, match="broke HTTP"):
        drain(fw)
    assert fw.fail(502).startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    fw = Forwarder()
    fw.receive_client(b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(HttpError, match="CONNECT after"):
        drain(fw)
    fw = Forwarder()
    fw.receive_client(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(HttpError, match="this is a proxy"):
        drain(fw)
    with pytest.raises(RuntimeError):
        Forwarder().forward(event.request)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_random_bytes_raise_only_protocol_errors(client: bytes, upstream: bytes):
    fw = Forwarder()
    fw.receive_client(b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n" + client)
    try:
        [event] = drain(fw)
        fw.forward(event.request)
        fw.receive_upstream(upstream)
        for _ in range(10):  # bounded: each round consumes input or ends
            events = drain(fw)
            if not events:
                break
            if isinstance(events[-1], NextRequest):
                fw.refuse(403)
    except ProtocolError:
        pass
