"""PROXY protocol v1/v2 receiving side: byte tables, split feeding, Hypothesis."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from socksflow.protocol import NEED_DATA, Address
from socksflow.proxy_protocol import (
    SIGNATURE_V2,
    Command,
    HeaderReader,
    ProxyHeader,
    ProxyProtocolError,
    Version,
    build_v1,
    build_v2,
    crc32c,
    parse,
)

pytestmark = pytest.mark.smoke

V4_SRC = Address(ipaddress.IPv4Address("192.0.2.7"), 40000)
V4_DST = Address(ipaddress.IPv4Address("198.51.100.1"), 1080)
V6_SRC = Address(ipaddress.IPv6Address("2001:db8::7"), 40000)
V6_DST = Address(ipaddress.IPv6Address("2001:db8::1"), 1080)

# The examples of HAProxy's proxy-protocol.txt, byte for byte.
VALID = [
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 1080\r\n", ProxyHeader(Version.V1, Command.PROXY, V4_SRC, V4_DST)),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 1080\r\n", ProxyHeader(Version.V1, Command.PROXY, V6_SRC, V6_DST)),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(Version.V1, Command.LOCAL, None, None)),
    (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", ProxyHeader(Version.V1, Command.LOCAL, None, None)),
    (
        SIGNATURE_V2 + b"\x21\x11\x00\x0c" + bytes([192, 0, 2, 7, 198, 51, 100, 1]) + b"\x9c\x40\x04\x38",
        ProxyHeader(Version.V2, Command.PROXY, V4_SRC, V4_DST),
    ),
    (
        SIGNATURE_V2 + b"\x21\x21\x00\x24" + V6_SRC.host.packed + V6_DST.host.packed + b"\x9c\x40\x04\x38",
        ProxyHeader(Version.V2, Command.PROXY, V6_SRC, V6_DST),
    ),
    (SIGNATURE_V2 + b"\x20\x00\x00\x00", ProxyHeader(Version.V2, Command.LOCAL, None, None)),
    # LOCAL with addresses: they are ignored.
    (SIGNATURE_V2 + b"\x20\x11\x00\x0c" + b"\x00" * 12, ProxyHeader(Version.V2, Command.LOCAL, None, None)),
    # A TLV (PP2_TYPE_AUTHORITY) after the addresses, and a NOOP.
    (
        SIGNATURE_V2 + b"\x21\x11\x00\x1a" + bytes([192, 0, 2, 7, 198, 51, 100, 1]) + b"\x9c\x40\x04\x38"
        + b"\x02\x00\x07example" + b"\x04\x00\x01\x00",
        ProxyHeader(Version.V2, Command.PROXY, V4_SRC, V4_DST, ((0x02, b"example"), (0x04, b"\x00"))),
    ),
]  # fmt: skip

INVALID = [
    (b"GET / HTTP/1.1\r\n\r\n", "no PROXY protocol header"),
    (b"\x05\x01\x00", "no PROXY protocol header"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000\r\n", "expected PROXY TCP4"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 1080 x\r\n", "expected PROXY TCP4"),
    (b"PROXY TCP5 192.0.2.7 198.51.100.1 40000 1080\r\n", "unknown protocol"),
    (b"PROXY TCP4 2001:db8::7 198.51.100.1 40000 1080\r\n", "TCP4"),
    (b"PROXY TCP6 192.0.2.7 2001:db8::1 40000 1080\r\n", "TCP6"),
    (b"PROXY TCP4 192.0.2.07 198.51.100.1 40000 1080\r\n", "192.0.2.07"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 040000 1080\r\n", "is not a port"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 1080\r\n", "is not a port"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 +1 1080\r\n", "is not a port"),
    (b"PROXY TCP6 fe80::1%eth0 2001:db8::1 40000 1080\r\n", "zone id"),
    (b"PROXY TCP4  192.0.2.7 198.51.100.1 40000 1080\r\n", "expected PROXY TCP4"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 1080\n", "LF, not CRLF"),
    (b"PROXY " + b"A" * 101 + b"\r\n", "without CRLF"),
    (b"PROXY TCP4 \xff.0.2.7 198.51.100.1 40000 1080\r\n", "not ASCII"),
    (SIGNATURE_V2 + b"\x11\x11\x00\x0c" + b"\x00" * 12, "version 1, expected 2"),
    (SIGNATURE_V2 + b"\x22\x11\x00\x0c" + b"\x00" * 12, "unknown command"),
    (SIGNATURE_V2 + b"\x21\x12\x00\x0c" + b"\x00" * 12, "only STREAM"),
    (SIGNATURE_V2 + b"\x21\x31\x00\xd8" + b"\x00" * 216, "has no client IP"),
    (SIGNATURE_V2 + b"\x21\x01\x00\x00", "has no client IP"),
    (SIGNATURE_V2 + b"\x21\x11\x00\x08" + b"\x00" * 8, "expected 12"),
    (SIGNATURE_V2 + b"\x21\x11\x00\x0e" + b"\x00" * 14, "truncated TLV"),
    (SIGNATURE_V2 + b"\x21\x11\x00\x10" + b"\x00" * 12 + b"\x02\x00\x09x", "runs past"),
    (SIGNATURE_V2 + b"\x21\x11\xff\xff", "more than"),
]


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_valid_headers_parse_to_their_addresses(data: bytes, expected: ProxyHeader) -> None:
    assert parse(data + b"\x05\x01\x00") == (expected, len(data))


@pytest.mark.parametrize(("data", "message"), INVALID)
def test_invalid_headers_are_refused_with_the_reason(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message.replace("+", r"\+")):
        parse(data)


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_a_header_fed_one_byte_at_a_time_gives_the_same_event_and_keeps_what_follows(
    data: bytes, expected: ProxyHeader
) -> None:
    reader = HeaderReader()
    for byte in data[:-1]:
        reader.receive_data(bytes([byte]))
        assert reader.next_event() is NEED_DATA
    reader.receive_data(data[-1:] + b"\x05\x01")
    reader.receive_data(b"\x00")
    assert reader.next_event() == expected
    assert reader.trailing_data == b"\x05\x01\x00"
    with pytest.raises(ProxyProtocolError):
        reader.next_event()


def test_a_listener_for_one_version_refuses_the_other() -> None:
    with pytest.raises(ProxyProtocolError, match=r"\(v2\)"):
        parse(build_v1(V4_SRC, V4_DST), frozenset({Version.V2}))
    with pytest.raises(ProxyProtocolError, match=r"\(v1\)"):
        parse(build_v2(V4_SRC, V4_DST), frozenset({Version.V1}))
    assert parse(b"PROX", frozenset({Version.V1})) is None
    assert parse(SIGNATURE_V2[:5], frozenset({Version.V2})) is None


def test_crc32c_is_castagnoli() -> None:
    # RFC 3720 B.4: 32 bytes of zeros, and the classic check value.
    assert crc32c(b"\x00" * 32) == 0x8A9136AA
    assert crc32c(b"123456789") == 0xE3069283


def test_a_crc32c_tlv_is_verified() -> None:
    header = build_v2(V4_SRC, V4_DST, ((0x02, b"example"),), crc=True)
    assert parse(header)[0].source == V4_SRC  # type: ignore[index]
    corrupted = bytearray(header)
    corrupted[17] ^= 0x01  # a bit of the source address
    with pytest.raises(ProxyProtocolError, match="CRC32C mismatch"):
        parse(bytes(corrupted))


addresses = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.ip_addresses(v=4)),
    st.tuples(st.ip_addresses(v=6), st.ip_addresses(v=6)),
)


@given(addresses, st.integers(0, 65535), st.integers(0, 65535), st.booleans())
def test_build_then_parse_round_trips(pair, sport: int, dport: int, v2: bool) -> None:  # type: ignore[no-untyped-def]
    source, destination = Address(pair[0], sport), Address(pair[1], dport)
    data = build_v2(source, destination, crc=True) if v2 else build_v1(source, destination)
    header, consumed = parse(data)  # type: ignore[misc]
    assert (header.source, header.destination, consumed) == (source, destination, len(data))


@given(st.binary(max_size=300))
def test_random_bytes_raise_nothing_but_the_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProxyProtocolError):
        parse(data)


@given(st.binary(max_size=120))
def test_random_bytes_after_a_valid_prefix_raise_nothing_but_the_protocol_error(data: bytes) -> None:
    for prefix in (b"PROXY ", SIGNATURE_V2):
        with contextlib.suppress(ProxyProtocolError):
            parse(prefix + data)


@given(st.sampled_from([data for data, _ in VALID]), st.data())
def test_split_at_any_point_gives_the_same_event(data: bytes, split: st.DataObject) -> None:
    cut = split.draw(st.integers(0, len(data)))
    reader = HeaderReader()
    reader.receive_data(data[:cut])
    if cut < len(data):
        assert reader.next_event() is NEED_DATA
    reader.receive_data(data[cut:])
    assert reader.next_event() == parse(data)[0]  # type: ignore[index]
