"""Absolute-form HTTP proxy requests served one by one on a kept-alive client connection.

Each request is a session of its own: decided by the rules, dialled, and re-framed by h11 both
ways (``Via`` added, hop-by-hop headers removed), so a pipelined request never reaches the
previous request's destination unjudged.  The origins here parse with h11 and record every
connection and request they get.
"""

from __future__ import annotations

import hashlib
import socket
import socketserver
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import h11
import pytest
from helpers import serve_tcp
from test_doors_e2e import MIXED, curl

from socksflow import Direction, hookimpl
from socksflow.testing import wait_until

DENY_TWO = "rules:\n  - deny: {to: 127.0.0.2}\n  - allow: all\n"
CLOSE_DELIMITED = b"sent until the origin closes\n" * 1000


@dataclass
class Origin:
    """An HTTP/1.1 origin: ``/eof`` answers without a length (ends at close), ``/hop`` with
    hop-by-hop headers, anything else ``<method> <path> <sha256 of the body>``."""

    host: str
    port: int = 0
    connections: int = 0
    requests: list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]] = field(default_factory=list)

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"


def _handler(origin: Origin) -> type[socketserver.BaseRequestHandler]:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            origin.connections += 1
            conn = h11.Connection(h11.SERVER)
            sock: socket.socket = self.request
            while True:
                request, body = None, b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = sock.recv(65536)
                        conn.receive_data(data)
                        continue
                    if isinstance(event, h11.ConnectionClosed):
                        return
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                assert request is not None
                origin.requests.append((request.method, request.target, list(request.headers), body))
                if request.target == b"/eof":
                    sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + CLOSE_DELIMITED)
                    return
                answer = b"%s %s %s" % (
                    request.method,
                    request.target,
                    hashlib.sha256(body).hexdigest().encode(),
                )
                headers = [("Content-Length", str(len(answer)))]
                if request.target == b"/hop":
                    headers += [("Connection", "X-Secret"), ("X-Secret", "1"), ("Keep-Alive", "timeout=5")]
                sock.sendall(conn.send(h11.Response(status_code=200, headers=headers)))
                sock.sendall(conn.send(h11.Data(data=answer)) + conn.send(h11.EndOfMessage()))
                if conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()

    return Handler


def _serve(host: str) -> Iterator[Origin]:
    origin = Origin(host)
    for _, port in serve_tcp(_handler(origin), host):
        origin.port = port
        yield origin


@pytest.fixture
def origin() -> Iterator[Origin]:
    yield from _serve("127.0.0.1")


@pytest.fixture
def other_origin() -> Iterator[Origin]:
    yield from _serve("127.0.0.1")


@pytest.fixture
def denied_origin() -> Iterator[Origin]:
    """An origin on 127.0.0.2, which DENY_TWO denies: it must never see a connection."""
    yield from _serve("127.0.0.2")


class Sessions:
    """Each ended session: its client address, destination, reply and bytes down."""

    def __init__(self) -> None:
        self.ended: list[tuple[str, str, object, int]] = []

    @hookimpl
    def socksflow_session_end(self, session) -> None:
        self.ended.append((str(session.client), str(session.destination), session.reply, session.bytes_down))


def proxy(server) -> list[str]:
    return ["-x", f"http://{server.host}:{server.port}"]


def answer(origin: Origin, path: str, body: bytes = b"", method: str = "GET") -> bytes:
    return f"{method} {path} {hashlib.sha256(body).hexdigest()}".encode()


def test_curl_fetches_two_urls_over_one_connection_each_its_own_session(
    socksflow_server, origin, other_origin
):
    sessions = Sessions()
    server = socksflow_server(MIXED, plugins=[sessions])
    result = curl(*proxy(server), "-w", "\n%{num_connects}\n", origin.url("/one"), other_origin.url("/two"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == answer(origin, "/one") + b"\n1\n" + answer(other_origin, "/two") + b"\n0\n"
    assert [r[1] for r in origin.requests] == [b"/one"] and [r[1] for r in other_origin.requests] == [b"/two"]
    assert wait_until(lambda: len(sessions.ended) == 2)
    (client1, dest1, reply1, down1), (client2, dest2, reply2, down2) = sessions.ended
    assert client1 == client2  # one client connection, two sessions
    assert (dest1, dest2) == (f"127.0.0.1:{origin.port}", f"127.0.0.1:{other_origin.port}")
    assert reply1 == reply2 == 0 and down1 > len(answer(origin, "/one")) and down2 > 0


def test_a_denied_second_request_gets_403_and_the_connection_stays(socksflow_server, origin, denied_origin):
    server = socksflow_server(MIXED + DENY_TWO)
    urls = (origin.url("/one"), denied_origin.url("/two"), origin.url("/three"))
    result = curl(*proxy(server), "-w", " %{http_code} %{num_connects}\n", *urls)
    assert result.stdout == (
        answer(origin, "/one")
        + b" 200 1\n"
        + b"socksflow: forbidden\n 403 0\n"
        + answer(origin, "/three")
        + b" 200 0\n"
    )
    assert denied_origin.connections == 0
    assert origin.connections == 2  # one per forwarded request


def read_response(sock: socket.socket, conn: h11.Connection) -> tuple[h11.Response, bytes]:
    response, body = None, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            conn.start_next_cycle()
            return response, body
        else:
            raise AssertionError(event)


def test_pipelined_requests_are_each_decided_on_their_own(socksflow_server, origin, denied_origin):
    server = socksflow_server(MIXED + DENY_TWO)
    first = f"GET {origin.url('/one')} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    second = f"GET {denied_origin.url('/two')} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    third = f"GET {origin.url('/three')} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(first + second)  # one write: the second must not ride along to the first's origin
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        response, body = read_response(sock, conn)
        assert (response.status_code, body) == (200, answer(origin, "/one"))
        assert (b"via", b"1.1 socksflow") in response.headers
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        response, body = read_response(sock, conn)
        assert (response.status_code, body) == (403, b"socksflow: forbidden\n")
        sock.sendall(third)  # still open after the refusal
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        response, body = read_response(sock, conn)
        assert (response.status_code, body) == (200, answer(origin, "/three"))
    assert denied_origin.connections == 0
    assert [r[1] for r in origin.requests] == [b"/one", b"/three"]


def test_hop_by_hop_headers_are_removed_both_ways_and_via_added(socksflow_server, origin):
    server = socksflow_server(MIXED)
    request = (
        f"GET {origin.url('/hop')} HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\n"
        "Proxy-Connection: keep-alive\r\nKeep-Alive: 5\r\nX-Kept: yes\r\nVia: 1.0 earlier\r\n\r\n"
    ).encode()
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(request)
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        response, _ = read_response(sock, conn)
    names = {name for name, _ in response.headers}
    assert response.status_code == 200 and not names & {b"connection", b"x-secret", b"keep-alive"}, names
    assert (b"via", b"1.1 socksflow") in response.headers
    ((_, target, headers, _),) = origin.requests
    sent = dict(headers)
    assert target == b"/hop" and sent[b"x-kept"] == b"yes" and sent[b"via"] == b"1.0 earlier, 1.1 socksflow"
    assert not set(sent) & {b"connection", b"x-drop", b"proxy-connection", b"keep-alive"}, sent


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_post_bodies_are_reframed(socksflow_server, origin, tmp_path, chunked):
    payload = bytes(range(256)) * 4096 * 3  # 3 MiB
    (tmp_path / "upload").write_bytes(payload)
    server = socksflow_server(MIXED)
    extra = ["-H", "Transfer-Encoding: chunked"] if chunked else []
    result = curl(*proxy(server), *extra, "--data-binary", f"@{tmp_path / 'upload'}", origin.url("/up"),
                  origin.url("/after"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == answer(origin, "/up", payload, "POST") + answer(origin, "/after", payload, "POST")
    framing = dict(origin.requests[0][2])
    assert (b"transfer-encoding" in framing) == chunked and (b"content-length" in framing) != chunked


def test_a_response_without_a_length_ends_at_the_origins_close(socksflow_server, origin):
    server = socksflow_server(MIXED)
    result = curl(*proxy(server), "-w", "%{num_connects}", origin.url("/eof"), origin.url("/next"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == CLOSE_DELIMITED + b"1" + answer(origin, "/next") + b"0"


def test_a_failed_dial_is_502_and_the_connection_stays(socksflow_server, origin):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]  # bound, never listening: connection refused
        server = socksflow_server(MIXED)
        result = curl(*proxy(server), "-w", " %{http_code} %{num_connects}\n",
                      f"http://127.0.0.1:{closed_port}/", origin.url("/after"))  # fmt: skip
    assert result.stdout == b"socksflow: bad gateway\n 502 1\n" + answer(origin, "/after") + b" 200 0\n"


def test_shutdown_closes_a_connection_waiting_for_its_next_request(socksflow_server, origin):
    server = socksflow_server(MIXED)
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(f"GET {origin.url('/one')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        assert read_response(sock, conn)[0].status_code == 200
        assert wait_until(lambda: not server.server.sessions)  # kept alive, no session holds it
        server.stop()
        assert sock.recv(100) == b""  # closed by the shutdown, not by the idle timeout


class Watch:
    """A relay_data plugin: records what passes each way; ``fail`` raises on the response."""

    def __init__(self, fail: bool = False) -> None:
        self.seen = {Direction.UP: b"", Direction.DOWN: b""}
        self.fail = fail

    @hookimpl
    def socksflow_relay_data(self, session, direction, data):
        self.seen[direction] += data
        if self.fail and direction is Direction.DOWN:
            raise RuntimeError("watch refuses the response")
        return None


def test_relay_data_plugins_see_each_forwarded_message(socksflow_server, origin):
    watch = Watch()
    server = socksflow_server(MIXED, plugins=[watch])
    result = curl(*proxy(server), origin.url("/one"))
    assert result.stdout == answer(origin, "/one")
    assert watch.seen[Direction.UP].startswith(
        f"GET /one HTTP/1.1\r\nhost: 127.0.0.1:{origin.port}\r\n".encode()
    )
    assert watch.seen[Direction.DOWN].endswith(b"\r\n\r\n" + answer(origin, "/one"))


def test_a_failing_relay_data_plugin_closes_the_connection(socksflow_server, origin):
    sessions = Sessions()
    server = socksflow_server(MIXED, plugins=[Watch(fail=True), sessions])
    result = curl(*proxy(server), origin.url("/one"))
    assert result.returncode == 52 and result.stdout == b"", result  # curl: empty reply from server
    assert wait_until(lambda: len(sessions.ended) == 1), sessions.ended
    assert [r[1] for r in origin.requests] == [b"/one"], origin.requests


def test_bandwidth_limits_pace_forwarded_responses(socksflow_server, http_target):
    server = socksflow_server(MIXED + "limits:\n  - {match: {from: 127.0.0.1}, bandwidth: {down: 20MiB/s}}\n")
    began = time.monotonic()
    result = curl(*proxy(server), http_target.url("/blob"))
    took = time.monotonic() - began
    assert hashlib.sha256(result.stdout).hexdigest() == http_target.blob_sha256
    assert 2.0 < took < 10, took  # 50 MiB at 20 MiB/s (a burst allowed); unpaced it takes well under 1 s
