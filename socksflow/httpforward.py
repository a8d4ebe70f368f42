"""Sans-I/O forwarding of absolute-form HTTP requests with keep-alive, h11 on both sides.

One :class:`Forwarder` per client connection.  Each request it reads becomes a
:class:`NextRequest` event carrying the :class:`~socksflow.httpproxy.ProxyRequest` the engine
decides like any other (rules, limits, logs); the runner then either :meth:`~Forwarder.forward`\\ s
it over a connection to the destination or :meth:`~Forwarder.refuse`\\ s it (403, 502…) —
and the client connection stays open for its next request either way when HTTP allows.

Messages are re-framed, never relayed raw: h11 reads the client's request and writes it to the
destination (origin-form, hop-by-hop headers removed, ``Via`` added), then reads the response
and writes it back the same way.  So a pipelined second request cannot slip to the first
destination unjudged, and each side's framing (chunked, Content-Length, HEAD, 1xx, HTTP/1.0
clients) is h11's business.  No sockets, no clock: bytes in, events out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import h11

from socksflow.httpproxy import (
    MAX_HEAD,
    REASONS,
    HttpError,
    ProxyRequest,
    forward_headers,
    host_header,
    request_from_event,
)
from socksflow.protocol import NEED_DATA, ProtocolError, _NeedData


@dataclass(frozen=True, slots=True)
class NextRequest:
    """A request to decide; answer with :meth:`Forwarder.forward` or :meth:`Forwarder.refuse`."""

    request: ProxyRequest


@dataclass(frozen=True, slots=True)
class ToUpstream:
    data: bytes


@dataclass(frozen=True, slots=True)
class ToClient:
    data: bytes


@dataclass(frozen=True, slots=True)
class ExchangeDone:
    """The response is complete.  ``keep_alive``: the client may send another request here;
    ``upstream_reusable``: the destination's connection may carry it (if it goes there)."""

    keep_alive: bool
    upstream_reusable: bool


@dataclass(frozen=True, slots=True)
class Closed:
    """The client's connection is finished (it closed, or HTTP says it must close after this)."""


Event = NextRequest | ToUpstream | ToClient | ExchangeDone | Closed


class Forwarder:
    """Both halves of one client connection's forwarded requests (see the module docstring)."""

    __slots__ = ("_client", "_pending", "_state", "_upstream", "via")

    _WAITING: Final = "waiting"  # for the next request's head
    _DECIDING: Final = "deciding"  # NextRequest given out, no answer yet
    _FORWARDING: Final = "forwarding"
    _FINISHED: Final = "finished"

    def __init__(self, via: str = "1.1 socksflow") -> None:
        self._client = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._upstream: h11.Connection | None = None
        self._pending = b""  # the request head for the destination, not yet given out
        self._state = self._WAITING
        self.via = via

    @property
    def open(self) -> bool:
        """Whether the client's connection goes on: a request was answered (or is being) and
        HTTP lets another follow; not while a request waits for its decision."""
        return self._state in (self._WAITING, self._FORWARDING)

    @property
    def buffered(self) -> int:
        """Client bytes received and not processed yet."""
        return len(self._client.trailing_data[0])

    def receive_client(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` when it closed its side."""
        self._client.receive_data(data)

    def receive_upstream(self, data: bytes) -> None:
        """Bytes from the destination; ``b""`` when it closed its side."""
        if self._upstream is None:
            raise RuntimeError("no request is being forwarded")
        self._upstream.receive_data(data)

    def next_event(self) -> Event | _NeedData:
        """The next thing to do, or NEED_DATA.  Raises :class:`HttpError` for a request the
        client botched (its ``response`` is the answer), :class:`ProtocolError` for a destination
        that broke HTTP (answer 502 with :meth:`fail`)."""
        if self._state == self._WAITING:
            return self._next_request()
        if self._state == self._FORWARDING:
            return self._from_upstream() or self._from_client() or NEED_DATA
        return Closed() if self._state == self._FINISHED else NEED_DATA

    def forward(self, request: ProxyRequest, reuse: bool = False) -> None:
        """Send ``request`` on to its destination over a new connection, or (``reuse``) over the one
        the previous exchange left open (its :class:`ExchangeDone` said ``upstream_reusable``)."""
        self._expect(self._DECIDING)
        if not reuse or self._upstream is None or self._upstream.our_state is not h11.IDLE:
            self._upstream = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        others = [(name, value) for name, value in request.headers if name != b"host"]
        headers = [(b"host", host_header(request.destination)), *forward_headers(others, self.via)]
        self._pending = self._upstream.send(
            h11.Request(method=request.method, target=request.path, headers=headers)
        )
        self._state = self._FORWARDING

    def refuse(self, status: int, headers: tuple[tuple[str, str], ...] = (), body: str = "") -> bytes:
        """Answer the request being decided with the proxy's own ``status``; its body is discarded."""
        self._expect(self._DECIDING)
        return self._answer(status, headers, body)

    def fail(self, status: int = 502, body: str = "socksflow: bad gateway\n") -> bytes:
        """The destination failed mid-exchange: a 502/504 if the response has not begun, else nothing."""
        if self._client.our_state is not h11.SEND_RESPONSE:
            self._state = self._FINISHED
            return b""
        return self._answer(status, (), body)

    def _answer(self, status: int, headers: tuple[tuple[str, str], ...], body: str) -> bytes:
        payload = body.encode("utf-8")
        fields = [
            *headers,
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(payload))),
        ]
        reason = REASONS.get(status, "").encode()
        out = self._client.send(h11.Response(status_code=status, headers=fields, reason=reason))
        out += self._client.send(h11.Data(data=payload)) + self._client.send(h11.EndOfMessage())
        self._upstream = None
        self._state = self._FORWARDING  # discard the request's body, then finish the cycle
        return out

    # ------------------------------------------------------------------ steps

    def _next_request(self) -> NextRequest | Closed | _NeedData:
        client = self._client
        if client.our_state is h11.DONE and client.their_state is h11.DONE:
            client.start_next_cycle()
        event = self._client_event()
        if event is h11.NEED_DATA:
            return NEED_DATA
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            self._state = self._FINISHED
            return Closed()
        assert isinstance(event, h11.Request)
        try:
            request = request_from_event(event)
        except HttpError:
            self._state = self._FINISHED
            raise
        if request.tunnel:
            self._state = self._FINISHED
            raise HttpError("CONNECT after a forwarded request: open a new connection for the tunnel")
        self._state = self._DECIDING
        return NextRequest(request)

    def _from_client(self) -> ToUpstream | ExchangeDone | None:
        """The request's body, on to the destination (or dropped after a refusal)."""
        pending, self._pending = self._pending, b""
        if pending:
            return ToUpstream(pending)
        client = self._client
        if client.their_state is not h11.SEND_BODY:
            return self._finish_if_done()
        event = self._client_event()
        if event is h11.NEED_DATA:
            return None
        if isinstance(event, h11.ConnectionClosed):
            self._state = self._FINISHED
            return None
        if self._upstream is None:  # refused: read the body to its end, send it nowhere
            return self._from_client()
        data = self._upstream.send(event)
        return ToUpstream(data) if data else self._from_client()

    def _client_event(self) -> object:
        try:
            return self._client.next_event()
        except h11.RemoteProtocolError as exc:
            self._state = self._FINISHED
            raise HttpError(str(exc), exc.error_status_hint) from None

    def _from_upstream(self) -> ToClient | None:
        upstream = self._upstream
        if upstream is None or upstream.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
            return None
        try:
            event = upstream.next_event()
        except h11.RemoteProtocolError as exc:
            raise ProtocolError(f"the destination broke HTTP: {exc}") from None
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return None
        if isinstance(event, h11.ConnectionClosed):
            raise ProtocolError("the destination closed before its response ended")
        if isinstance(event, h11.InformationalResponse | h11.Response):
            headers = forward_headers(list(event.headers), self.via)
            event = type(event)(status_code=event.status_code, headers=headers, reason=event.reason)
        data = self._client.send(event)
        return ToClient(data) if data else self._from_upstream()

    def _finish_if_done(self) -> ExchangeDone | None:
        client, upstream = self._client, self._upstream
        if client.our_state not in (h11.DONE, h11.MUST_CLOSE) or client.their_state not in (
            h11.DONE,
            h11.MUST_CLOSE,
        ):
            return None
        keep_alive = client.our_state is h11.DONE and client.their_state is h11.DONE
        reusable = (
            upstream is not None and upstream.our_state is h11.DONE and upstream.their_state is h11.DONE
        )
        if reusable:
            upstream.start_next_cycle()  # type: ignore[union-attr]
        self._state = self._WAITING if keep_alive else self._FINISHED
        return ExchangeDone(keep_alive, reusable)

    def _expect(self, state: str) -> None:
        if self._state != state:
            raise RuntimeError(f"cannot do that while {self._state}, only while {state}")
