"""The named destination sets of ``special:NAME``: what a proxy must not reach unless told to.

Squid's ``to_localhost`` is the idea; the ranges are those that reach this machine or its
networks from a proxy.  ``0.0.0.0/8`` and ``::`` are *loopback* here because connecting to
them reaches local services on most systems.  IPv6 forms that embed an IPv4 address
(``::ffff:127.0.0.1``, ``::127.0.0.1``, NAT64's ``64:ff9b::7f00:1``, 6to4's ``2002:7f00:1::``)
match through :func:`~.matchers.embedded_ipv4`.
``self`` (the proxy's own listen addresses) depends on the configuration and the session, so
it is not listed here.
"""

from __future__ import annotations

import ipaddress

SELF = "self"

SPECIAL_NETWORKS: dict[str, tuple[str, ...]] = {
    "loopback": ("127.0.0.0/8", "0.0.0.0/8", "::1/128", "::/128"),
    "private": (
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",  # RFC 1918, RFC 6598 (CGNAT)
        "fc00::/7", "fec0::/10",  # unique local, and the deprecated site-local
    ),
    "link-local": ("169.254.0.0/16", "fe80::/10"),  # 169.254.169.254 is the cloud metadata service
    "multicast": ("224.0.0.0/4", "ff00::/8"),
    "unspecified": ("0.0.0.0/32", "::/128"),
}  # fmt: skip

SPECIAL_NAMES: tuple[str, ...] = (*SPECIAL_NETWORKS, SELF)


def special_networks(name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """The networks of the named set (not ``self``); KeyError for an unknown name."""
    return tuple(ipaddress.ip_network(text) for text in SPECIAL_NETWORKS[name])
