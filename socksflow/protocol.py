"""Sans-I/O SOCKS5 (RFC 1928) and username/password sub-negotiation (RFC 1929).

No sockets, no asyncio, no clock: bytes go in through :meth:`ServerConnection.receive_data`,
typed events come out of :meth:`ServerConnection.next_event`, and replies are built as bytes
for the caller to write.  Every malformed input raises a :class:`ProtocolError` that carries
the bytes to answer with (if the protocol defines an answer for that phase).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Host = IPAddress | str

SOCKS_VERSION: Final = 0x05
USERPASS_VERSION: Final = 0x01

MAX_DOMAIN_LENGTH: Final = 253
MAX_LABEL_LENGTH: Final = 63


class Method(enum.IntEnum):
    """Authentication methods of RFC 1928 §3."""

    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERPASS = 0x02
    NO_ACCEPTABLE = 0xFF


class Command(enum.IntEnum):
    """Request commands of RFC 1928 §4."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03
    RESOLVE = 0xF0  # Tor's extensions (socksflow.tor), answered only when doors.tor_resolve is on
    RESOLVE_PTR = 0xF1


class AddressType(enum.IntEnum):
    """Address types of RFC 1928 §5."""

    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class Reply(enum.IntEnum):
    """Reply codes of RFC 1928 §6."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


# --------------------------------------------------------------------------- addresses


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port as carried on the wire.

    ``host`` is an :mod:`ipaddress` object for IPv4/IPv6, or a normalised domain name
    (lower case, no trailing dot).  Build from text with :meth:`parse_host`.
    """

    host: Host
    port: int

    @property
    def is_domain(self) -> bool:
        return isinstance(self.host, str)

    @property
    def atyp(self) -> AddressType:
        if isinstance(self.host, str):
            return AddressType.DOMAIN
        return AddressType.IPV4 if self.host.version == 4 else AddressType.IPV6

    def __str__(self) -> str:
        if isinstance(self.host, ipaddress.IPv6Address):
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def from_sockaddr(cls, sockaddr: tuple) -> Address:
        """From a socket address tuple: ``(ip, port)`` or IPv6's ``(ip, port, flow, scope)``."""
        return cls(_ip_from_text(sockaddr[0]), sockaddr[1])

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse ``host:port`` or ``[v6]:port``; raises ValueError with a readable message."""
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not HOST:PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"{text!r}: write IPv6 addresses as [addr]:port")
        if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
            raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
        try:
            return cls(parse_host(host), int(port))
        except InvalidAddress as exc:
            raise ValueError(f"{text!r}: {exc}") from None


@functools.lru_cache(maxsize=4096)
def _ip_from_text(text: str) -> IPAddress:
    # Sessions come from and go to few distinct addresses: parsing each once saves a few µs each.
    return ipaddress.ip_address(text.partition("%")[0])


def parse_ip(text: str) -> IPAddress:
    """``ipaddress.ip_address`` without IPv6 zone ids: ``fe80::1%eth0`` is a ValueError.

    A zone names an interface of the machine that parses it; ``ipaddress`` keeps it, compares
    it and then drops it when the address is encoded (``::%e`` goes out as ``::``).  No client
    or rule gives one on purpose, so every address they give is parsed here or by :func:`parse_network`.
    """
    if "%" in text:
        raise ValueError(f"{text!r}: IPv6 zone ids (%interface) are not accepted")
    return ipaddress.ip_address(text)


def parse_network(text: str, strict: bool = True) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``ipaddress.ip_network`` without IPv6 zone ids, as :func:`parse_ip`."""
    if "%" in text:
        raise ValueError(f"{text!r}: IPv6 zone ids (%interface) are not accepted")
    return ipaddress.ip_network(text, strict=strict)


def parse_host(text: str) -> Host:
    """Turn a textual host into an IP address or a normalised domain name.

    An IP literal given as a name (``"127.0.0.1"``, ``"::1"``) becomes that IP, so rules on
    addresses see it; names are lower-cased, lose one trailing dot and are checked against
    the DNS length limits.  Raises :class:`InvalidAddress` for names that cannot exist.
    """
    name = text[:-1] if text.endswith(".") else text
    try:
        name.encode("ascii")
    except UnicodeEncodeError:
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise InvalidAddress(f"{text!r} is not a valid host name") from None
    # Only now: "127.0.0.1." and IDNA forms such as "１２７.０.０.１" are IP literals too.
    if "%" in name:
        raise InvalidAddress(f"{text!r}: IPv6 zone ids (%interface) are not accepted")
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        pass
    name = name.lower()
    if not name or len(name) > MAX_DOMAIN_LENGTH:
        raise InvalidAddress(f"host name of {len(name)} characters")
    for label in name.split("."):
        if not label or len(label) > MAX_LABEL_LENGTH:
            raise InvalidAddress(f"{text!r} has an empty or over-long label")
        if not _HOSTNAME_CHARS.issuperset(label):
            raise InvalidAddress(f"{text!r} has characters not allowed in a host name")
    return name


_HOSTNAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


def encode_address(address: Address) -> bytes:
    """ATYP + address + port, as in requests, replies and UDP headers."""
    host = address.host
    if isinstance(host, str):
        name = host.encode("ascii")
        return bytes((AddressType.DOMAIN, len(name))) + name + struct.pack("!H", address.port)
    atyp = AddressType.IPV4 if host.version == 4 else AddressType.IPV6
    return bytes((atyp,)) + host.packed + struct.pack("!H", address.port)


def decode_address(data: bytes | bytearray | memoryview, offset: int) -> tuple[Address, int] | None:
    """Decode ATYP + address + port at ``offset``; ``None`` if more bytes are needed.

    Returns the address and the offset just past it.
    """
    if len(data) < offset + 1:
        return None
    atyp = data[offset]
    if atyp == AddressType.IPV4:
        end = offset + 1 + 4
        if len(data) < end + 2:
            return None
        host: Host = ipaddress.IPv4Address(bytes(data[offset + 1 : end]))
    elif atyp == AddressType.IPV6:
        end = offset + 1 + 16
        if len(data) < end + 2:
            return None
        host = ipaddress.IPv6Address(bytes(data[offset + 1 : end]))
    elif atyp == AddressType.DOMAIN:
        if len(data) < offset + 2:
            return None
        length = data[offset + 1]
        end = offset + 2 + length
        if len(data) < end + 2:
            return None
        if length == 0:
            raise InvalidAddress("empty host name")
        try:
            text = bytes(data[offset + 2 : end]).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidAddress("host name is not valid UTF-8") from None
        host = parse_host(text)
    else:
        raise AddressTypeNotSupported(f"address type 0x{atyp:02x}")
    (port,) = struct.unpack_from("!H", data, end)
    return Address(host, port), end + 2


# --------------------------------------------------------------------------- errors


class ProtocolError(Exception):
    """The peer broke the protocol.  ``response`` is what to send before closing (may be empty)."""

    response: bytes = b""


class UnsupportedVersion(ProtocolError):
    """VER was not 0x05 (or 0x01 in the RFC 1929 sub-negotiation)."""


class MalformedMessage(ProtocolError):
    """A field has a value the RFC does not allow (e.g. no methods offered, RSV != 0)."""


class RequestError(ProtocolError):
    """A request that parses far enough to be answered with a reply code."""

    reply: Reply = Reply.GENERAL_FAILURE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.response = build_reply(self.reply)


class CommandNotSupported(RequestError):
    reply = Reply.COMMAND_NOT_SUPPORTED


class AddressTypeNotSupported(RequestError):
    reply = Reply.ADDRESS_TYPE_NOT_SUPPORTED


class InvalidAddress(RequestError, ValueError):
    """A domain name that cannot exist: it is unreachable without asking any resolver.

    Also a ValueError: parsing a host from text (a config value, a command-line option) fails
    the way other value parsing does.
    """

    reply = Reply.HOST_UNREACHABLE


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Greeting:
    """The client's version identifier / method selection message (RFC 1928 §3)."""

    methods: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class UserPassAuth:
    """An RFC 1929 username/password request.  Credentials are bytes: RFC 1929 sets no charset."""

    username: bytes
    password: bytes

    def __repr__(self) -> str:
        return f"UserPassAuth(username={self.username!r}, password=<{len(self.password)} bytes>)"


@dataclass(frozen=True, slots=True)
class Request:
    """A SOCKS request (RFC 1928 §4)."""

    command: Command
    destination: Address


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
"""Returned by :meth:`ServerConnection.next_event` when more bytes are needed."""

Event = Greeting | UserPassAuth | Request


# --------------------------------------------------------------------------- parsers


def parse_greeting(data: bytes | bytearray) -> tuple[Greeting, int] | None:
    """Parse ``VER NMETHODS METHODS``; returns the event and the bytes consumed, or None."""
    if not data:
        return None
    if data[0] != SOCKS_VERSION:
        raise UnsupportedVersion(f"SOCKS version 0x{data[0]:02x}")
    if len(data) < 2:
        return None
    count = data[1]
    if count == 0:
        raise MalformedMessage("greeting offers no methods")
    if len(data) < 2 + count:
        return None
    return Greeting(tuple(data[2 : 2 + count])), 2 + count


def parse_userpass(data: bytes | bytearray) -> tuple[UserPassAuth, int] | None:
    """Parse ``VER ULEN UNAME PLEN PASSWD`` (RFC 1929 §2)."""
    if not data:
        return None
    if data[0] != USERPASS_VERSION:
        # A failure status is the answer RFC 1929 gives to any unacceptable request.
        error = UnsupportedVersion(f"username/password version 0x{data[0]:02x}")
        error.response = build_auth_status(False)
        raise error
    if len(data) < 2:
        return None
    ulen = data[1]
    if len(data) < 3 + ulen:
        return None
    plen = data[2 + ulen]
    end = 3 + ulen + plen
    if len(data) < end:
        return None
    return UserPassAuth(bytes(data[2 : 2 + ulen]), bytes(data[3 + ulen : end])), end


def parse_request(data: bytes | bytearray) -> tuple[Request, int] | None:
    """Parse ``VER CMD RSV ATYP DST.ADDR DST.PORT``."""
    if not data:
        return None
    if data[0] != SOCKS_VERSION:
        raise UnsupportedVersion(f"SOCKS version 0x{data[0]:02x} in request")
    if len(data) < 4:
        return None
    if data[2] != 0x00:
        error = MalformedMessage(f"RSV is 0x{data[2]:02x}, not 0x00")
        error.response = build_reply(Reply.GENERAL_FAILURE)
        raise error
    decoded = decode_address(data, 3)
    if decoded is None:
        return None
    destination, end = decoded
    try:
        command = Command(data[1])
    except ValueError:
        raise CommandNotSupported(f"command 0x{data[1]:02x}") from None
    return Request(command, destination), end


# --------------------------------------------------------------------------- builders


def build_greeting(methods: tuple[int, ...] | list[int]) -> bytes:
    return bytes((SOCKS_VERSION, len(methods), *methods))


def build_method_selection(method: int) -> bytes:
    return bytes((SOCKS_VERSION, method))


def build_userpass(username: bytes, password: bytes) -> bytes:
    return bytes((USERPASS_VERSION, len(username))) + username + bytes((len(password),)) + password


def build_auth_status(success: bool) -> bytes:
    return bytes((USERPASS_VERSION, 0x00 if success else 0x01))


def build_request(command: Command, destination: Address) -> bytes:
    return bytes((SOCKS_VERSION, command, 0x00)) + encode_address(destination)


_NO_ADDRESS: Final = Address(ipaddress.IPv4Address(0), 0)


def build_reply(reply: Reply, bound: Address = _NO_ADDRESS) -> bytes:
    """``VER REP RSV ATYP BND.ADDR BND.PORT``; failures carry 0.0.0.0:0 unless told otherwise."""
    return bytes((SOCKS_VERSION, reply, 0x00)) + encode_address(bound)


def parse_reply(data: bytes | bytearray) -> tuple[Reply | int, Address, int] | None:
    """Client side: parse a reply; returns (code, bound address, bytes consumed) or None."""
    if len(data) < 4:
        return None
    if data[0] != SOCKS_VERSION:
        raise UnsupportedVersion(f"SOCKS version 0x{data[0]:02x} in reply")
    decoded = decode_address(data, 3)
    if decoded is None:
        return None
    bound, end = decoded
    code = data[1]
    return (Reply(code) if code in Reply._value2member_map_ else code), bound, end


# --------------------------------------------------------------------------- UDP


@dataclass(frozen=True, slots=True)
class UdpHeader:
    """The header of a UDP relay datagram (RFC 1928 §7).  ``offset`` is where the payload starts."""

    frag: int
    destination: Address
    offset: int


def parse_udp_header(datagram: bytes | bytearray | memoryview) -> UdpHeader:
    """Parse ``RSV FRAG ATYP DST.ADDR DST.PORT``; a short or malformed header raises."""
    if len(datagram) < 4:
        raise MalformedMessage("UDP datagram shorter than its header")
    if datagram[0] != 0 or datagram[1] != 0:
        raise MalformedMessage("UDP header RSV is not zero")
    decoded = decode_address(datagram, 3)
    if decoded is None:
        raise MalformedMessage("UDP datagram shorter than its header")
    destination, end = decoded
    return UdpHeader(datagram[2], destination, end)


def build_udp_header(address: Address, frag: int = 0) -> bytes:
    return bytes((0, 0, frag)) + encode_address(address)


# --------------------------------------------------------------------------- state machine


class Phase(enum.Enum):
    GREETING = "greeting"
    METHOD = "method"  # greeting received; the server owes the method selection
    USERPASS = "userpass"  # awaiting the RFC 1929 request
    AUTH_STATUS = "auth-status"  # RFC 1929 request received; the server owes the status
    SUBNEGOTIATION = "subnegotiation"  # a method-specific exchange driven by a plugin
    REQUEST = "request"
    REPLY = "reply"  # request received; the server owes the reply
    DONE = "done"  # reply sent: remaining bytes belong to the relay
    CLOSED = "closed"


class BufferedInput:
    """Bytes received and not parsed yet: where every sans-I/O reader of socksflow starts."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)


class ServerConnection(BufferedInput):
    """The server side of a SOCKS5 handshake.

    Feed bytes with :meth:`receive_data`, take events with :meth:`next_event`, answer with
    the ``send_*`` methods (which return the bytes to write).  After the success reply,
    :attr:`trailing_data` holds bytes the client sent ahead (optimistic data).
    """

    __slots__ = ("phase",)

    def __init__(self) -> None:
        super().__init__()
        self.phase = Phase.GREETING

    def next_event(self) -> Event | _NeedData:
        """The next complete message, or NEED_DATA.  Raises ProtocolError (phase becomes CLOSED)."""
        phase = self.phase
        if phase is Phase.GREETING:
            parser, following = parse_greeting, Phase.METHOD
        elif phase is Phase.USERPASS:
            parser, following = parse_userpass, Phase.AUTH_STATUS
        elif phase is Phase.REQUEST:
            parser, following = parse_request, Phase.REPLY
        else:
            return NEED_DATA
        try:
            parsed = parser(self._buffer)
        except ProtocolError:
            self.phase = Phase.CLOSED
            raise
        if parsed is None:
            return NEED_DATA
        event, consumed = parsed
        del self._buffer[:consumed]
        self.phase = following
        return event

    def send_method(self, method: int) -> bytes:
        """Answer the greeting.  NO_ACCEPTABLE closes the handshake."""
        self._expect(Phase.METHOD)
        if method == Method.NO_ACCEPTABLE:
            self.phase = Phase.CLOSED
        elif method == Method.NO_AUTH:
            self.phase = Phase.REQUEST
        elif method == Method.USERPASS:
            self.phase = Phase.USERPASS
        else:
            self.phase = Phase.SUBNEGOTIATION
        return build_method_selection(method)

    def take_subnegotiation_data(self, limit: int | None = None) -> bytes:
        """During a plugin-driven sub-negotiation: hand over buffered bytes (up to ``limit``)."""
        self._expect(Phase.SUBNEGOTIATION)
        end = len(self._buffer) if limit is None else limit
        data = bytes(self._buffer[:end])
        del self._buffer[:end]
        return data

    def finish_subnegotiation(self, success: bool) -> None:
        self._expect(Phase.SUBNEGOTIATION)
        self.phase = Phase.REQUEST if success else Phase.CLOSED

    def send_auth_status(self, success: bool) -> bytes:
        """Answer RFC 1929; a failure closes the handshake (RFC 1929 §2: the server MUST close)."""
        self._expect(Phase.AUTH_STATUS)
        self.phase = Phase.REQUEST if success else Phase.CLOSED
        return build_auth_status(success)

    def send_reply(self, reply: Reply, bound: Address = _NO_ADDRESS) -> bytes:
        """Answer the request.  Success hands the stream to the relay; failure closes it."""
        self._expect(Phase.REPLY)
        self.phase = Phase.DONE if reply == Reply.SUCCEEDED else Phase.CLOSED
        return build_reply(reply, bound)

    def send_second_reply(self, reply: Reply, bound: Address = _NO_ADDRESS) -> bytes:
        """BIND's second reply, sent after the first success reply."""
        self._expect(Phase.DONE)
        if reply != Reply.SUCCEEDED:
            self.phase = Phase.CLOSED
        return build_reply(reply, bound)

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the request, for the relay (empty before the reply is sent)."""
        if self.phase is not Phase.DONE:
            return b""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def _expect(self, phase: Phase) -> None:
        if self.phase is not phase:
            raise RuntimeError(f"cannot do that in phase {self.phase.value}, only in {phase.value}")
