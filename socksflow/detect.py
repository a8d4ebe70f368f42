"""Which front door a client knocked on, from its first byte, and each protocol's "no".

SOCKS5 greetings start with 0x05, SOCKS4 requests with 0x04, HTTP requests with a method's
letters; a connection that starts with anything else is closed without an answer.  A listener accepts a set of protocols
(``socks5`` alone unless configured); a client speaking another one gets that protocol's own
refusal, so it reports something a person can act on.
"""

from __future__ import annotations

from typing import Final

from socksflow import httpproxy, protocol, socks4

SOCKS5: Final = "socks5"
SOCKS4: Final = "socks4"
HTTP: Final = "http"
PROTOCOLS: Final = (SOCKS5, SOCKS4, HTTP)
MIXED: Final = frozenset(PROTOCOLS)
SOCKS5_ONLY: Final = frozenset({SOCKS5})


GARBAGE: Final = "unknown"  # no protocol: closed without an answer


def protocol_of(first_byte: int) -> str:
    """The protocol a connection whose first byte is ``first_byte`` speaks (GARBAGE if none)."""
    if first_byte == protocol.SOCKS_VERSION:
        return SOCKS5
    if first_byte == socks4.SOCKS4_VERSION:
        return SOCKS4
    if first_byte in _HTTP_START:
        return HTTP
    return GARBAGE


# An HTTP request starts with its method: letters in practice (RFC 9110 §9: a token).  Not CR
# or LF: a new connection does not start with blank lines, but PROXY protocol v2 does.
_HTTP_START: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def refusal(name: str, accepted: frozenset[str] = SOCKS5_ONLY) -> bytes:
    """What a listener accepting only ``accepted`` answers a client speaking protocol ``name``."""
    if name == SOCKS5:
        return protocol.build_method_selection(protocol.Method.NO_ACCEPTABLE)
    if name == SOCKS4:
        return socks4.build_reply(socks4.Socks4Reply.REJECTED)
    if name == GARBAGE:
        return b""
    speaks = " and ".join(p.upper() for p in PROTOCOLS if p in accepted)
    return httpproxy.build_response(
        400, body=f"socksflow: this is a {speaks} proxy port, not an HTTP proxy.\n"
    )


def parse_protocols(value: object) -> frozenset[str]:
    """``mixed``, one name, or a list of names; raises ValueError with a readable message."""
    if value == "mixed":
        return MIXED
    names = value if isinstance(value, list) else [value]
    if not names:
        raise ValueError("give at least one protocol (socks5, socks4, http) or mixed")
    for name in names:
        if name not in PROTOCOLS:
            raise ValueError(f"{name!r} is not a protocol (expected socks5, socks4, http, or mixed)")
    return frozenset(names)  # type: ignore[arg-type]
