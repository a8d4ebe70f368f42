"""Sans-I/O SOCKS4 and SOCKS4a, server side.

SOCKS4 (the 1992 NEC protocol description) has one message each way: the client's request
``VN=4 CD DSTPORT DSTIP USERID NUL`` and the server's reply ``VN=0 CD DSTPORT DSTIP``.
SOCKS4a lets a client that cannot resolve names send DSTIP ``0.0.0.x`` (x ≠ 0) followed by
the host name and another NUL.  USERID is a claim, not a proof: it is no authentication.

:class:`Socks4Connection` has the shape of :class:`socksflow.protocol.ServerConnection` after
its greeting (``receive_data``, ``next_event``, ``send_reply``, ``send_second_reply``,
``trailing_data``, ``phase``), so the engine answers both with the same code; replies take
the SOCKS5 :class:`~socksflow.protocol.Reply` the engine decided and say it the SOCKS4 way.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

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

SOCKS4_VERSION: Final = 0x04
REPLY_VERSION: Final = 0x00
MAX_USERID_LENGTH: Final = 255  # bytes before the NUL; a longer one is refused, not buffered
MAX_HOSTNAME_LENGTH: Final = 255
_HEADER = 8  # VN CD DSTPORT(2) DSTIP(4)


class Socks4Reply(enum.IntEnum):
    """Reply codes (CD) of SOCKS4."""

    GRANTED = 0x5A
    REJECTED = 0x5B
    NO_IDENTD = 0x5C
    IDENTD_MISMATCH = 0x5D


class Socks4Error(ProtocolError):
    """A SOCKS4 request the server cannot take; ``response`` is the rejection to send."""

    def __init__(self, message: str, response: bytes | None = None) -> None:
        super().__init__(message)
        self.response = build_reply(Socks4Reply.REJECTED) if response is None else response


@dataclass(frozen=True, slots=True)
class Socks4Request:
    """A SOCKS4/4a request: the engine's :class:`Request` plus what SOCKS4 adds."""

    command: Command
    destination: Address
    userid: bytes = b""
    socks4a: bool = False  # the name came after the USERID (DSTIP 0.0.0.x)

    @property
    def request(self) -> Request:
        return Request(self.command, self.destination)


_NO_ADDRESS: Final = Address(ipaddress.IPv4Address(0), 0)


def reply_code(reply: Reply | int) -> Socks4Reply:
    """The SOCKS4 code for the engine's (SOCKS5) reply: granted or rejected, nothing finer."""
    return Socks4Reply.GRANTED if reply == Reply.SUCCEEDED else Socks4Reply.REJECTED


def build_reply(code: Socks4Reply | int, bound: Address = _NO_ADDRESS) -> bytes:
    """``VN=0 CD DSTPORT DSTIP``; a bound address that is not IPv4 is sent as 0.0.0.0."""
    host = bound.host
    packed = host.packed if isinstance(host, ipaddress.IPv4Address) else bytes(4)
    return bytes((REPLY_VERSION, code)) + struct.pack("!H", bound.port) + packed


def build_request(command: Command, destination: Address, userid: bytes = b"") -> bytes:
    """Client side: a SOCKS4 request, or a SOCKS4a one when ``destination`` is a name."""
    host = destination.host
    head = bytes((SOCKS4_VERSION, command)) + struct.pack("!H", destination.port)
    if isinstance(host, str):
        return head + bytes((0, 0, 0, 1)) + userid + b"\0" + host.encode("ascii") + b"\0"
    if not isinstance(host, ipaddress.IPv4Address):
        raise ValueError("SOCKS4 carries IPv4 addresses and (4a) names only")
    return head + host.packed + userid + b"\0"


def parse_reply(data: bytes | bytearray) -> tuple[int, Address] | None:
    """Client side: ``(CD, address)`` from an 8-byte reply, or None if more bytes are needed."""
    if len(data) < _HEADER:
        return None
    if data[0] != REPLY_VERSION:
        raise Socks4Error(f"reply version 0x{data[0]:02x}", b"")
    (port,) = struct.unpack_from("!H", data, 2)
    return data[1], Address(ipaddress.IPv4Address(bytes(data[4:8])), port)


def _field(data: bytes | bytearray, start: int, limit: int, what: str) -> int | None:
    """The index of the NUL ending a field that starts at ``start``; None if it has not arrived."""
    end = data.find(b"\0", start, start + limit + 1)
    if end >= 0:
        return end
    if len(data) > start + limit:
        raise Socks4Error(f"{what} longer than {limit} bytes")
    return None


def parse_request(data: bytes | bytearray) -> tuple[Socks4Request, int] | None:
    """Parse a SOCKS4/4a request; returns the event and the bytes consumed, or None."""
    if not data:
        return None
    if data[0] != SOCKS4_VERSION:
        raise Socks4Error(f"SOCKS version 0x{data[0]:02x}", b"")
    if len(data) < _HEADER:
        return None
    userid_end = _field(data, _HEADER, MAX_USERID_LENGTH, "USERID")
    if userid_end is None:
        return None
    userid = bytes(data[_HEADER:userid_end])
    end = userid_end + 1
    (port,) = struct.unpack_from("!H", data, 2)
    ip = bytes(data[4:8])
    socks4a = ip[:3] == b"\0\0\0" and ip[3] != 0
    if socks4a:
        name_end = _field(data, end, MAX_HOSTNAME_LENGTH, "host name")
        if name_end is None:
            return None
        try:
            host = parse_host(bytes(data[end:name_end]).decode("utf-8"))
        except (UnicodeDecodeError, InvalidAddress) as exc:
            raise Socks4Error(f"bad SOCKS4a host name: {exc}") from None
        end = name_end + 1
    else:
        host = ipaddress.IPv4Address(ip)
    if data[1] not in (Command.CONNECT, Command.BIND):
        raise Socks4Error(f"command 0x{data[1]:02x}")
    return Socks4Request(Command(data[1]), Address(host, port), userid, socks4a), end


class Socks4Connection(OneRequestConnection):
    """The server side of a SOCKS4/4a exchange: one request, one reply (two for BIND)."""

    __slots__ = ()

    method = None  # no authentication method: SOCKS4 has none

    def _parse(self, data: bytearray) -> tuple[Socks4Request, int] | None:
        return parse_request(data)

    def send_reply(self, reply: Reply | int, bound: Address = _NO_ADDRESS) -> bytes:
        """Answer the request; anything but success is 0x5B and closes."""
        self._expect(Phase.REPLY)
        code = reply_code(reply)
        self.phase = Phase.DONE if code == Socks4Reply.GRANTED else Phase.CLOSED
        return build_reply(code, bound)

    def send_second_reply(self, reply: Reply | int, bound: Address = _NO_ADDRESS) -> bytes:
        """BIND's second reply, when the peer connected (or did not)."""
        self._expect(Phase.DONE)
        code = reply_code(reply)
        if code != Socks4Reply.GRANTED:
            self.phase = Phase.CLOSED
        return build_reply(code, bound)
