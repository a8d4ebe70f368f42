"""Client sides of the upstream protocols, sans-I/O: SOCKS5 (RFC 1928/1929), SOCKS4/4a, HTTP CONNECT.

Each handshake is a generator that yields :class:`Send`, :class:`Receive` or
:class:`ReceiveHead` steps and is sent the bytes each receive asked for; it returns the bound
address the proxy reported.  It reads exactly what the proxy's answer holds, never more, so the
first bytes of the destination stay in the connection for the tunnel.  No sockets, no asyncio:
a driver (the ``outbounds`` plugin) runs the steps over whatever carries the bytes.

Failures raise :class:`~socksflow.outbound.OutboundError`: a proxy's refusal keeps its reply
code (SOCKS5's unchanged), a refused login or a proxy that does not speak the protocol is
``upstream_down`` with 0x01.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Generator
from dataclasses import dataclass

import h11

from socksflow.outbound import UNSPECIFIED, OutboundError
from socksflow.protocol import (
    Address,
    AddressType,
    Command,
    Method,
    ProtocolError,
    Reply,
    build_greeting,
    build_request,
    build_userpass,
    parse_reply,
)

HEAD_LIMIT = 16 * 1024  # an HTTP proxy's response head longer than this is not a proxy


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class Receive:
    """Exactly ``size`` bytes."""

    size: int


@dataclass(frozen=True, slots=True)
class ReceiveHead:
    """Everything up to and including the first ``\\r\\n\\r\\n`` (at most ``limit`` bytes)."""

    limit: int = HEAD_LIMIT


Step = Send | Receive | ReceiveHead
Handshake = Generator[Step, bytes, Address]


def _broken(what: str) -> OutboundError:
    return OutboundError(f"upstream does not speak {what}", Reply.GENERAL_FAILURE, upstream_down=True)


# --------------------------------------------------------------------------- SOCKS5


def socks5(
    command: Command, destination: Address, username: bytes | None = None, password: bytes | None = None
) -> Handshake:
    """Greeting, RFC 1929 login when credentials are given, request, and its first reply."""
    methods = (Method.NO_AUTH, Method.USERPASS) if username is not None else (Method.NO_AUTH,)
    yield Send(build_greeting(methods))
    selection = yield Receive(2)
    if selection[0] != 5:
        raise _broken("SOCKS5")
    method = selection[1]
    if method == Method.USERPASS and username is not None:
        yield Send(build_userpass(username, password or b""))
        status = yield Receive(2)
        if status[1] != 0:
            raise OutboundError("upstream login failed", Reply.GENERAL_FAILURE, upstream_down=True)
    elif method != Method.NO_AUTH:
        why = "refused every method offered" if method == 0xFF else f"chose method 0x{method:02x}"
        raise OutboundError(
            f"upstream login failed: upstream {why}", Reply.GENERAL_FAILURE, upstream_down=True
        )
    yield Send(build_request(command, destination))
    return (yield from socks5_reply())


def socks5_reply() -> Handshake:
    """One SOCKS5 reply (BIND's second reply uses it alone); a failure keeps the upstream's code."""
    head = yield Receive(5)
    rest = {AddressType.IPV4: 4 + 2 - 1, AddressType.IPV6: 16 + 2 - 1}.get(head[3], head[4] + 2)  # type: ignore[call-overload]
    if head[3] not in (AddressType.IPV4, AddressType.IPV6, AddressType.DOMAIN):
        raise _broken("SOCKS5")
    data = head + (yield Receive(rest))
    try:
        parsed = parse_reply(data)
    except ProtocolError:
        raise _broken("SOCKS5") from None
    if parsed is None:
        raise _broken("SOCKS5")
    code, bound, _ = parsed
    if code != Reply.SUCCEEDED:
        reply = code if isinstance(code, Reply) else Reply.GENERAL_FAILURE
        raise OutboundError(f"upstream replied 0x{int(code):02x}", reply)
    return bound


# --------------------------------------------------------------------------- SOCKS4 / SOCKS4a

_SOCKS4_GRANTED = 0x5A
_SOCKS4_IDENT = (0x5C, 0x5D)  # the upstream could not check the user id with identd


def socks4(destination: Address, user_id: bytes = b"") -> Handshake:
    """CONNECT; a name goes to the upstream as SOCKS4a (``0.0.0.1`` and the name)."""
    if destination.atyp is AddressType.IPV6:
        raise OutboundError("SOCKS4 cannot carry an IPv6 destination", Reply.ADDRESS_TYPE_NOT_SUPPORTED)
    port = destination.port.to_bytes(2, "big")
    if destination.is_domain:
        host = ipaddress.IPv4Address("0.0.0.1").packed
        trailer = str(destination.host).encode("idna") + b"\0"
    else:
        host, trailer = destination.host.packed, b""  # type: ignore[union-attr]
    yield Send(bytes((4, Command.CONNECT)) + port + host + user_id + b"\0" + trailer)
    answer = yield Receive(8)
    if answer[0] != 0:
        raise _broken("SOCKS4")
    if answer[1] in _SOCKS4_IDENT:
        raise OutboundError("upstream login failed: identd check", Reply.GENERAL_FAILURE, upstream_down=True)
    if answer[1] != _SOCKS4_GRANTED:
        # SOCKS4 has one failure code ("rejected or failed"); refused is the closest SOCKS5 reply.
        raise OutboundError(f"upstream replied 0x{answer[1]:02x}", Reply.CONNECTION_REFUSED)
    return Address(ipaddress.IPv4Address(answer[4:8]), int.from_bytes(answer[2:4], "big"))


# --------------------------------------------------------------------------- HTTP CONNECT

# What a proxy's status says about the destination, in SOCKS5 terms.
_STATUS_REPLY = {
    403: Reply.NOT_ALLOWED,
    404: Reply.HOST_UNREACHABLE,
    500: Reply.CONNECTION_REFUSED,
    502: Reply.CONNECTION_REFUSED,
    503: Reply.CONNECTION_REFUSED,
    504: Reply.TTL_EXPIRED,
}


def basic_authorization(username: str, password: str) -> str:
    """The ``Proxy-Authorization`` value for Basic auth (RFC 7617)."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def http_connect(destination: Address, authorization: str | None = None) -> Handshake:
    """``CONNECT host:port``; any 2xx opens the tunnel, 407 is a failed login."""
    target = str(destination).encode("idna" if destination.is_domain else "ascii")
    headers = [(b"Host", target)]
    if authorization:
        headers.append((b"Proxy-Authorization", authorization.encode("latin-1")))
    client = h11.Connection(h11.CLIENT)
    yield Send(client.send(h11.Request(method=b"CONNECT", target=target, headers=headers)))
    while True:
        try:
            event = client.next_event()
        except h11.RemoteProtocolError:
            raise _broken("HTTP") from None
        if event is h11.NEED_DATA:
            client.receive_data((yield ReceiveHead()))
            continue
        if isinstance(event, h11.InformationalResponse):
            continue
        if not isinstance(event, h11.Response):
            raise _broken("HTTP")
        if 200 <= event.status_code < 300:
            return UNSPECIFIED
        if event.status_code == 407:
            raise OutboundError("upstream login failed (HTTP 407)", Reply.GENERAL_FAILURE, upstream_down=True)
        reply = _STATUS_REPLY.get(event.status_code, Reply.GENERAL_FAILURE)
        raise OutboundError(f"upstream answered HTTP {event.status_code}", reply)


__all__ = [
    "Handshake",
    "Receive",
    "ReceiveHead",
    "Send",
    "Step",
    "basic_authorization",
    "http_connect",
    "socks4",
    "socks5",
    "socks5_reply",
]
