"""Front doors on the engine: SOCKS4/4a and HTTP proxy clients become sessions like SOCKS5's.

The seam, kept narrow on purpose:

* :func:`open_door` (called by ``ClientProtocol`` on the first byte) picks the protocol and
  puts that protocol's sans-I/O connection where the SOCKS5 one was; a protocol the listener
  does not accept gets a connection whose first event is that protocol's refusal.
* The connections here answer the calls the engine makes of SOCKS5's (``send_method``,
  ``send_auth_status``, ``send_reply``, ``send_second_reply``, ``trailing_data``), so method
  selection, authentication, the request hooks, dialling, BIND and the relay are the same code
  for every door.  A one-request protocol's request arrives first; :func:`greeting_for` gives
  the engine the greeting SOCKS5 would have sent (which methods the client can do), and
  :func:`request_for` the engine's :class:`~socksflow.protocol.Request`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from socksflow import detect
from socksflow.decisions import Identity
from socksflow.httpforward import Closed, ExchangeDone, Forwarder, NextRequest
from socksflow.httpproxy import REALM, REASONS, HttpProxyConnection, ProxyRequest, status_for
from socksflow.onerequest import OneRequestConnection
from socksflow.protocol import (
    NEED_DATA,
    Address,
    Greeting,
    Method,
    Phase,
    ProtocolError,
    Reply,
    Request,
    UserPassAuth,
    _NeedData,
)
from socksflow.socks4 import Socks4Connection, Socks4Reply, Socks4Request, build_reply

if TYPE_CHECKING:
    from socksflow.runner import ClientProtocol
    from socksflow.session import Session

log = logging.getLogger("socksflow.session")

DoorRequest = Socks4Request | ProxyRequest


class Refused(OneRequestConnection):
    """A protocol the listener does not accept: the first event is its refusal."""

    __slots__ = ("name", "response")

    def __init__(self, name: str, response: bytes) -> None:
        super().__init__()
        self.name = name
        self.response = response

    def _parse(self, data: bytearray) -> None:
        error = ProtocolError(f"{self.name} is not served on this listener" if self.response else self.name)
        error.response = self.response
        raise error


class Socks4Door(Socks4Connection):
    """SOCKS4 as the engine drives it: a refused method selection is a 0x5B reply."""

    __slots__ = ()

    def send_method(self, method: int) -> bytes:
        if method == Method.NO_ACCEPTABLE:
            self.phase = Phase.CLOSED
            return build_reply(Socks4Reply.REJECTED)
        return b""


class HttpDoor(HttpProxyConnection):
    """The HTTP proxy as the engine drives it: a needed or failed login is 407; a denial names its reason.

    A connection whose first request is absolute-form is served request by request: its bytes go
    to a :class:`~socksflow.httpforward.Forwarder` from then on, each request it reads becomes the
    next session's (:meth:`poll`), and the proxy's own answers keep the connection open.
    """

    __slots__ = ("forwarder", "ready", "session")

    def __init__(self, session: Session) -> None:
        doors = session.config.doors
        super().__init__(doors.http_reason_header, doors.http_via)
        self.session = session
        self.forwarder: Forwarder | None = None
        self.ready: ProxyRequest | None = None  # read by poll(), not yet taken by a session

    def receive_data(self, data: bytes) -> None:
        if self.forwarder is None:
            super().receive_data(data)
        else:
            self.forwarder.receive_client(data)

    @property
    def buffered(self) -> int:
        return super().buffered if self.forwarder is None else self.forwarder.buffered

    def _parse(self, data: bytearray) -> tuple[ProxyRequest, int] | None:
        parsed = super()._parse(data)
        if parsed is None or parsed[0].tunnel:
            return parsed
        # Absolute-form: h11 reads the whole stream from its first byte, this request included.
        self.forwarder = Forwarder(self.via)
        self.forwarder.receive_client(bytes(data))
        event = self.forwarder.next_event()
        assert isinstance(event, NextRequest)
        self.proxy_request = event.request
        return event.request, len(data)

    def next_event(self) -> ProxyRequest | _NeedData:
        if self.forwarder is None:
            return super().next_event()  # type: ignore[no-any-return]
        event, self.ready = self.ready, None
        if event is None:
            return NEED_DATA
        self.phase = Phase.REPLY
        return event

    def poll(self) -> ProxyRequest | bool:
        """Between forwarded requests: the next request (kept for :meth:`next_event`), ``True`` to
        wait for more bytes, ``False`` once the connection is done.  Raises HttpError."""
        assert self.forwarder is not None
        while True:
            event = self.forwarder.next_event()
            if isinstance(event, NextRequest):
                self.ready = self.proxy_request = event.request
                return event.request
            if event is NEED_DATA:
                return True
            if isinstance(event, Closed) or (isinstance(event, ExchangeDone) and not event.keep_alive):
                return False

    @property
    def keeps_open(self) -> bool:
        """Whether the connection serves further requests once this session is over."""
        return self.forwarder is not None and self.forwarder.open

    def send_method(self, method: int) -> bytes:
        return self.refuse_login() if method == Method.NO_ACCEPTABLE else b""

    def send_auth_status(self, success: bool) -> bytes:
        return b"" if success else self.refuse_login()

    def refuse_login(self) -> bytes:
        if self.forwarder is None:
            return super().refuse_login()
        self.phase = Phase.CLOSED
        challenge = (("Proxy-Authenticate", f'Basic realm="{REALM}"'),)
        return self.forwarder.refuse(407, challenge, "socksflow: login needed\n")

    def send_reply(self, reply: Reply | int, bound: Address | None = None, reason: str = "") -> bytes:
        verdict = self.session.verdict
        if not reason and verdict is not None and not verdict.allowed:
            reason = verdict.reason or verdict.rule or self.session.decided_by
        if self.forwarder is None:
            return super().send_reply(reply, bound, reason)
        self._expect(Phase.REPLY)
        if reply == Reply.SUCCEEDED:  # the exchange (socksflow.forwarding) writes the response
            self.phase = Phase.DONE
            return b""
        self.phase = Phase.CLOSED
        status = status_for(reply)
        return self.forwarder.refuse(
            status, self.reason_headers(reason), f"socksflow: {REASONS[status].lower()}\n"
        )

    def send_second_reply(self, reply: Reply | int, bound: Address | None = None) -> bytes:
        return b""  # HTTP has no BIND: nothing follows the first answer


def open_door(client: ClientProtocol, first_byte: int) -> None:
    """Choose the protocol of ``client`` from its first byte and give it that protocol's connection."""
    name = detect.protocol_of(first_byte)
    client.door = name
    session = client.runner.session
    session.protocol = name
    if name == detect.GARBAGE:
        client.conn = Refused(f"first byte 0x{first_byte:02x}: no protocol", b"")  # type: ignore[assignment]
    elif name not in client.protocols:
        log.info(
            "session %s: %s client on a listener for %s: refused",
            session.id,
            name,
            "/".join(sorted(client.protocols)),
        )
        client.conn = Refused(name, detect.refusal(name, client.protocols))  # type: ignore[assignment]
    elif name == detect.SOCKS4:
        client.conn = Socks4Door()  # type: ignore[assignment]
    elif name == detect.HTTP:
        client.conn = HttpDoor(session)  # type: ignore[assignment]


def greeting_for(event: DoorRequest) -> Greeting:
    """The methods a one-request client can do: a login only over HTTP, and only if it sent one."""
    if isinstance(event, ProxyRequest) and event.credentials is not None:
        return Greeting((Method.NO_AUTH, Method.USERPASS))
    return Greeting((Method.NO_AUTH,))


def credentials_for(event: DoorRequest) -> UserPassAuth:
    """The login that came with the request (HTTP's Proxy-Authorization)."""
    assert isinstance(event, ProxyRequest) and event.credentials is not None
    return UserPassAuth(*event.credentials)


def request_for(session: Session, event: DoorRequest) -> Request:
    """The engine's request; a SOCKS4 USERID names the user when the operator trusts it."""
    if isinstance(event, Socks4Request) and event.userid and session.config.doors.socks4_userid:
        user = event.userid.decode("utf-8", "backslashreplace")
        extra = session.config.groups_of(user)
        session.identity = Identity(user, extra)
    return event.request
