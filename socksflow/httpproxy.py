"""Sans-I/O HTTP proxy, server side: ``CONNECT host:port`` and absolute-form requests.

h11 parses the request head (request line, headers, their limits and errors); this module
turns it into the engine's :class:`~socksflow.protocol.Request` (always CONNECT to the
destination: a rule written for SOCKS holds for HTTP) plus what forwarding needs, and builds
the proxy's own answers (200 Connection established, 400, 403, 407, 502, 504).

The head is found here (the blank line after the headers) and given to h11 whole, so the bytes
after a CONNECT's head stay raw for the relay.  An absolute-form request is never relayed raw:
:mod:`socksflow.httpforward` re-frames it and every request after it on the connection.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Final

import h11

from socksflow.onerequest import OneRequestConnection
from socksflow.protocol import (
    Address,
    Command,
    InvalidAddress,
    Phase,
    ProtocolError,
    Reply,
    Request,
    parse_host,
)

MAX_HEAD: Final = 16 * 1024  # request line and headers; h11's own default limit
MAX_BLANK_LINES: Final = 4  # before the request line; more is not an HTTP client
REASON_HEADER: Final = "X-Socksflow-Reason"
REALM: Final = "socksflow"
# RFC 9110 §7.6.1: meant for one connection only, never forwarded.  Content-Length and
# Transfer-Encoding stay: the body is relayed with the client's own framing.
HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
     b"te", b"trailer", b"upgrade"}
)  # fmt: skip
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_STATUS_FOR_REPLY: Final = {
    Reply.NOT_ALLOWED: 403,
    Reply.TTL_EXPIRED: 504,
    Reply.COMMAND_NOT_SUPPORTED: 400,
    Reply.ADDRESS_TYPE_NOT_SUPPORTED: 400,
}
REASONS: Final = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    407: "Proxy Authentication Required",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    504: "Gateway Timeout",
}


def status_for(reply: Reply | int) -> int:
    """The HTTP status that says what the engine's (SOCKS5) failure reply says."""
    return _STATUS_FOR_REPLY.get(reply, 502)  # type: ignore[call-overload]


def build_response(status: int, headers: tuple[tuple[str, str], ...] = (), body: str = "") -> bytes:
    """A complete HTTP/1.1 response of the proxy's own; the connection closes after it."""
    payload = body.encode("utf-8")
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, '')}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if status != 200:
        lines += [
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(payload)}",
            "Connection: close",
        ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


class HttpError(ProtocolError):
    """A request the proxy answers with an HTTP error status; ``response`` is that answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.response = build_response(status, body=f"socksflow: {message}\n")


def parse_authority(text: str, default_port: int | None = None) -> Address:
    """``host:port`` or ``[v6]:port`` (the port optional when ``default_port`` is given)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None if not rest else "bad"
    else:
        host, sep, port = text.partition(":")
        port = port if sep else None
    if port is None and default_port is not None:
        port = str(default_port)
    if port is None or not (port.isascii() and port.isdigit()) or not 0 < int(port) <= 65535:
        raise HttpError(f"{text!r} is not HOST:PORT with a port from 1 to 65535")
    try:
        return Address(parse_host(host), int(port))
    except InvalidAddress as exc:
        raise HttpError(f"{text!r}: {exc}") from None


def basic_credentials(value: bytes) -> tuple[bytes, bytes] | None:
    """``Basic base64(user:password)`` → ``(user, password)``; None for another scheme."""
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except binascii.Error:
        raise HttpError("Proxy-Authorization: malformed Basic credentials") from None
    user, sep, password = decoded.partition(b":")
    if not sep:
        raise HttpError("Proxy-Authorization: Basic credentials without ':'")
    return user, password


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    """One request to the proxy: a CONNECT tunnel or an absolute-form request to forward."""

    method: bytes
    destination: Address
    tunnel: bool  # CONNECT; else forward ``method path`` to the destination
    path: bytes = b""  # origin-form target for forwarding
    headers: tuple[tuple[bytes, bytes], ...] = ()
    credentials: tuple[bytes, bytes] | None = None

    @property
    def request(self) -> Request:
        return Request(Command.CONNECT, self.destination)


def forward_headers(headers: list[tuple[bytes, bytes]], via: str) -> list[tuple[bytes, bytes]]:
    """``headers`` without hop-by-hop ones (RFC 9110 §7.6.1) and with ``via`` added to ``Via``."""
    named = {n.strip().lower() for name, value in headers if name == b"connection" for n in value.split(b",")}
    kept, vias = [], []
    for name, value in headers:
        if name == b"via":
            vias.append(value)
        elif name not in HOP_BY_HOP and name not in named:
            kept.append((name, value))
    kept.append((b"via", b", ".join([*vias, via.encode("latin-1")])))
    return kept


def host_header(destination: Address) -> bytes:
    """The ``Host`` value for ``destination`` (the port left out when it is 80)."""
    text = str(destination)
    if destination.port == 80:
        text = text.rpartition(":")[0]
    return text.encode("idna")


def request_from_event(event: h11.Request) -> ProxyRequest:
    """Map h11's request to a :class:`ProxyRequest`; anything a proxy cannot serve is a 400."""
    headers = tuple((bytes(n), bytes(v)) for n, v in event.headers)
    credentials = None
    for name, value in headers:
        if name == b"proxy-authorization":
            credentials = basic_credentials(value)
    target = event.target.decode("ascii", "replace")
    if event.method == b"CONNECT":
        return ProxyRequest(event.method, parse_authority(target), True, b"", headers, credentials)
    scheme, sep, rest = target.partition("://")
    if not sep:
        raise HttpError("this is a proxy: ask for an absolute URL (http://host/path) or CONNECT host:port")
    if scheme.lower() != "http":
        raise HttpError(f"{scheme}:// is not forwarded: use CONNECT for it")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, origin = rest[:cut].rpartition("@")[2], rest[cut:]  # userinfo is not sent on
    origin = origin.partition("#")[0]
    origin = "/" + origin if not origin.startswith("/") else origin
    return ProxyRequest(
        event.method, parse_authority(authority, 80), False, origin.encode("ascii"), headers, credentials
    )


def parse_head(data: bytearray, scanned: int = 0) -> tuple[ProxyRequest, int] | None:
    """The request once its head (request line and headers) is complete, and the bytes it took.

    ``scanned``: how many bytes of ``data`` an earlier call saw without finding the head's end,
    so a head that arrives a byte at a time costs linear time, not quadratic.
    """
    start = 0
    for _ in range(MAX_BLANK_LINES):  # RFC 9112 §2.2: skip empty lines first (a few, not forever)
        if data[start : start + 2] == b"\r\n" or data[start : start + 1] == b"\n":
            start += 2 if data[start] == 0x0D else 1
    end = _HEAD_END.search(data, max(start, scanned - 3), start + MAX_HEAD + 4)
    if end is None:
        if len(data) - start > MAX_HEAD:
            raise HttpError(f"request head longer than {MAX_HEAD} bytes", 431)
        return None
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD + 4)
    parser.receive_data(bytes(data[start : end.end()]))
    try:
        event = parser.next_event()
    except h11.RemoteProtocolError as exc:
        raise HttpError(str(exc), 400) from None
    if not isinstance(event, h11.Request):
        raise HttpError("incomplete request head")
    return request_from_event(event), end.end()


class HttpProxyConnection(OneRequestConnection):
    """The server side of one HTTP proxy request, up to the hand-over to the relay.

    :meth:`next_event` gives the :class:`ProxyRequest` once its head has arrived.  After a
    granted CONNECT, :attr:`trailing_data` holds the bytes that followed the head, for the relay.
    """

    __slots__ = ("_scanned", "proxy_request", "reason_header", "via")

    def __init__(self, reason_header: str = REASON_HEADER, via: str = "1.1 socksflow") -> None:
        super().__init__()
        self._scanned = 0
        self.proxy_request: ProxyRequest | None = None
        self.reason_header = reason_header
        self.via = via

    def _parse(self, data: bytearray) -> tuple[ProxyRequest, int] | None:
        parsed = parse_head(data, self._scanned)
        if parsed is None:
            self._scanned = len(data)
        else:
            self.proxy_request = parsed[0]
        return parsed

    def send_reply(self, reply: Reply | int, bound: Address | None = None, reason: str = "") -> bytes:
        """Answer the request: success opens the tunnel, anything else closes.

        An absolute-form request is not granted here: its bytes go through a
        :class:`~socksflow.httpforward.Forwarder` (``doors.HttpDoor`` does that).

        ``reason`` (a denial's) goes in :attr:`reason_header` unless that is empty.
        """
        self._expect(Phase.REPLY)
        assert self.proxy_request is not None
        if reply == Reply.SUCCEEDED:
            if not self.proxy_request.tunnel:  # its bytes must be re-framed, never relayed raw
                raise RuntimeError("absolute-form requests are forwarded by socksflow.httpforward")
            self.phase = Phase.DONE
            return build_response(200)
        self.phase = Phase.CLOSED
        status = status_for(reply)
        return build_response(status, self.reason_headers(reason), f"socksflow: {REASONS[status].lower()}\n")

    def reason_headers(self, reason: str) -> tuple[tuple[str, str], ...]:
        """The header naming a denial's ``reason``, unless the operator turned it off."""
        return ((self.reason_header, _header_text(reason)),) if reason and self.reason_header else ()

    def refuse_login(self) -> bytes:
        """407: the proxy needs (other) credentials."""
        self.phase = Phase.CLOSED
        return build_response(
            407, (("Proxy-Authenticate", f'Basic realm="{REALM}"'),), "socksflow: login needed\n"
        )


def _header_text(text: str) -> str:
    # A header value must not break the head: no control characters, Latin-1 only.
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:200]
