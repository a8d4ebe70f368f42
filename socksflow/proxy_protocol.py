"""Sans-I/O PROXY protocol, versions 1 and 2 (HAProxy's proxy-protocol.txt), receiving side.

A load balancer in front of socksflow opens each connection with a header that names the
client it accepted.  A listener configured for it reads that header before any SOCKS byte,
from trusted sources only: the spec forbids guessing whether a header is present, so a
connection without a complete valid header is refused, never read as SOCKS.

Bytes go in through :meth:`HeaderReader.receive_data`; :meth:`HeaderReader.next_event` returns
:data:`NEED_DATA` or one :class:`ProxyHeader`; what followed the header is
:attr:`HeaderReader.trailing_data`.  Every malformed input raises :class:`ProxyProtocolError`.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

from socksflow.protocol import NEED_DATA, Address, BufferedInput

SIGNATURE_V2: Final = b"\r\n\r\n\x00\r\nQUIT\n"
PREFIX_V1: Final = b"PROXY "
MAX_V1_LENGTH: Final = 107  # the spec's worst case, CRLF included
MAX_V2_LENGTH: Final = 16 + 2048  # fixed part + addresses and TLVs; HAProxy sends far less

_V2_FIXED = struct.Struct("!12sBBH")
_INET = struct.Struct("!4s4sHH")
_INET6 = struct.Struct("!16s16sHH")
_TLV = struct.Struct("!BH")
PP2_TYPE_CRC32C: Final = 0x03


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY protocol header: the connection must be closed."""


class Version(enum.IntEnum):
    V1 = 1
    V2 = 2


class Command(enum.IntEnum):
    """v2's command; a v1 ``UNKNOWN`` header is a ``LOCAL`` one (no client to report)."""

    LOCAL = 0x0
    PROXY = 0x1


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header.  ``source``/``destination`` are ``None`` for LOCAL (health checks)."""

    version: Version
    command: Command
    source: Address | None
    destination: Address | None
    tlvs: tuple[tuple[int, bytes], ...] = ()


class HeaderReader(BufferedInput):
    """Reads one PROXY header, of either version, from the start of a connection."""

    __slots__ = ("_done", "versions")

    def __init__(self, versions: frozenset[Version] = frozenset(Version)) -> None:
        super().__init__()
        self.versions = versions
        self._done = False

    @property
    def trailing_data(self) -> bytes:
        """The bytes after the header (the client's first SOCKS bytes), taken once."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def next_event(self) -> ProxyHeader | type(NEED_DATA):  # type: ignore[valid-type]
        """The header once complete, or NEED_DATA; raises ProxyProtocolError."""
        if self._done:
            raise ProxyProtocolError("the header was already read")
        parsed = parse(self._buffer, self.versions)
        if parsed is None:
            return NEED_DATA
        header, consumed = parsed
        del self._buffer[:consumed]
        self._done = True
        return header


def parse(
    data: bytes | bytearray, versions: frozenset[Version] = frozenset(Version)
) -> tuple[ProxyHeader, int] | None:
    """The header at the start of ``data`` and its length, or None if more bytes are needed."""
    head = bytes(data[: len(SIGNATURE_V2)])
    if Version.V2 in versions and SIGNATURE_V2.startswith(head):  # the two signatures differ at byte 0
        return _parse_v2(data) if len(head) == len(SIGNATURE_V2) else None
    if Version.V1 in versions and PREFIX_V1.startswith(head[: len(PREFIX_V1)]):
        return _parse_v1(data) if len(head) >= len(PREFIX_V1) else None
    expected = " or ".join(f"v{v.value}" for v in sorted(versions))
    raise ProxyProtocolError(f"no PROXY protocol header ({expected}) at the start of the connection")


# --------------------------------------------------------------------------- version 1


def _parse_v1(data: bytes | bytearray) -> tuple[ProxyHeader, int] | None:
    end = data.find(b"\r\n", 0, MAX_V1_LENGTH)
    if end < 0:
        if len(data) >= MAX_V1_LENGTH:
            raise ProxyProtocolError(f"v1 header without CRLF in its first {MAX_V1_LENGTH} bytes")
        if b"\n" in data:
            raise ProxyProtocolError("v1 header ends with LF, not CRLF")
        return None
    line = bytes(data[:end])
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("v1 header is not ASCII") from None
    fields = text.split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":  # the rest of the line is to be ignored
        return ProxyHeader(Version.V1, Command.LOCAL, None, None), end + 2
    if len(fields) != 6:
        raise ProxyProtocolError(f"v1 header {text!r}: expected PROXY TCP4|TCP6 SRC DST SPORT DPORT")
    _, family, src, dst, sport, dport = fields
    if family == "TCP4":
        parse_ip: type[ipaddress.IPv4Address | ipaddress.IPv6Address] = ipaddress.IPv4Address
    elif family == "TCP6":
        parse_ip = ipaddress.IPv6Address
    else:
        raise ProxyProtocolError(f"v1 header: unknown protocol {family!r}")
    try:
        source = Address(parse_ip(_no_zone(src)), _port(sport))
        destination = Address(parse_ip(_no_zone(dst)), _port(dport))
    except ValueError as exc:
        raise ProxyProtocolError(f"v1 header {text!r}: {exc}") from None
    return ProxyHeader(Version.V1, Command.PROXY, source, destination), end + 2


def _no_zone(text: str) -> str:
    if "%" in text:
        raise ValueError(f"{text!r}: a zone id is not an address")
    return text


def _port(text: str) -> int:
    # The spec's ports are plain decimal: no sign, no spaces, no leading zero.
    if not (text.isascii() and text.isdigit()) or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ValueError(f"{text!r} is not a port")
    return int(text)


# --------------------------------------------------------------------------- version 2


def _parse_v2(data: bytes | bytearray) -> tuple[ProxyHeader, int] | None:
    if len(data) < _V2_FIXED.size:
        return None
    _, ver_cmd, family, length = _V2_FIXED.unpack_from(data)
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"v2 header: version {ver_cmd >> 4}, expected 2")
    try:
        command = Command(ver_cmd & 0x0F)
    except ValueError:
        raise ProxyProtocolError(f"v2 header: unknown command 0x{ver_cmd & 0x0F:x}") from None
    total = _V2_FIXED.size + length
    if total > MAX_V2_LENGTH:
        raise ProxyProtocolError(f"v2 header of {total} bytes: more than {MAX_V2_LENGTH}")
    if len(data) < total:
        return None
    body = bytes(data[_V2_FIXED.size : total])
    if command is Command.LOCAL:  # the whole block, family included, is to be discarded
        return ProxyHeader(Version.V2, Command.LOCAL, None, None), total
    address_family, transport = family >> 4, family & 0x0F
    if transport != 0x1:
        raise ProxyProtocolError("v2 header: only STREAM (TCP) connections can carry SOCKS")
    if address_family == 0x1:
        layout, make = _INET, ipaddress.IPv4Address
    elif address_family == 0x2:
        layout, make = _INET6, ipaddress.IPv6Address  # type: ignore[assignment]
    else:
        raise ProxyProtocolError(f"v2 header: address family 0x{address_family:x} has no client IP to judge")
    if len(body) < layout.size:
        raise ProxyProtocolError(f"v2 header: {len(body)} bytes of addresses, expected {layout.size}")
    src, dst, sport, dport = layout.unpack_from(body)
    source = Address(make(src), sport)
    destination = Address(make(dst), dport)
    return ProxyHeader(
        Version.V2, Command.PROXY, source, destination, _tlvs(data, total, body, layout.size)
    ), total


def _tlvs(data: bytes | bytearray, total: int, body: bytes, offset: int) -> tuple[tuple[int, bytes], ...]:
    found = []
    while offset < len(body):
        if len(body) - offset < _TLV.size:
            raise ProxyProtocolError("v2 header: truncated TLV")
        kind, size = _TLV.unpack_from(body, offset)
        start = offset + _TLV.size
        if start + size > len(body):
            raise ProxyProtocolError(f"v2 header: TLV 0x{kind:02x} runs past the header")
        value = body[start : start + size]
        if kind == PP2_TYPE_CRC32C:
            _check_crc(data, total, body, start, value)
        found.append((kind, value))
        offset = start + size
    return tuple(found)


def _check_crc(data: bytes | bytearray, total: int, body: bytes, start: int, value: bytes) -> None:
    # The checksum covers the whole header with the checksum field itself zeroed.
    if len(value) != 4:
        raise ProxyProtocolError("v2 header: CRC32C TLV is not 4 bytes")
    where = _V2_FIXED.size + start
    header = bytes(data[:where]) + b"\x00\x00\x00\x00" + bytes(data[where + 4 : total])
    if crc32c(header) != int.from_bytes(value, "big"):
        raise ProxyProtocolError("v2 header: CRC32C mismatch")


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as the PP2_TYPE_CRC32C TLV carries it."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --------------------------------------------------------------------------- building (for tests and clients)


def build_v1(source: Address | None, destination: Address | None) -> bytes:
    """A v1 header; ``None`` addresses give ``PROXY UNKNOWN``."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    family = "TCP4" if source.atyp.name == "IPV4" else "TCP6"
    return f"PROXY {family} {source.host} {destination.host} {source.port} {destination.port}\r\n".encode()


def build_v2(
    source: Address | None,
    destination: Address | None,
    tlvs: tuple[tuple[int, bytes], ...] = (),
    crc: bool = False,
) -> bytes:
    """A v2 header; ``None`` addresses give a LOCAL command.  ``crc`` adds a CRC32C TLV."""
    if source is None or destination is None:
        ver_cmd, family, addresses = 0x20, 0x00, b""
    else:
        ver_cmd = 0x21
        layout, family = (_INET, 0x11) if source.atyp.name == "IPV4" else (_INET6, 0x21)
        addresses = layout.pack(source.host.packed, destination.host.packed, source.port, destination.port)  # type: ignore[union-attr]
    extra = b"".join(_TLV.pack(kind, len(value)) + value for kind, value in tlvs)
    if crc:
        extra += _TLV.pack(PP2_TYPE_CRC32C, 4) + b"\x00" * 4
    header = _V2_FIXED.pack(SIGNATURE_V2, ver_cmd, family, len(addresses) + len(extra)) + addresses + extra
    if crc:
        header = header[:-4] + crc32c(header).to_bytes(4, "big")
    return header
