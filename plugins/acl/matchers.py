"""Matchers for one rule field: networks, domain names, patterns, ports.

Every look-up is independent of the list size: a network set probes one dict per distinct
prefix length, a domain set one dict per label of the name.  A match returns a label (the
entry as written, or ``file:line`` for list files) so ``socksflow explain`` can say *why*.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAPPED_PREFIX = 0xFFFF  # ::ffff:0:0/96, IPv4-mapped IPv6 addresses
_NAT64_PREFIX = int(ipaddress.IPv6Address("64:ff9b::"))  # RFC 6052: a NAT64 gateway reaches the IPv4
_6TO4_PREFIX = 0x2002  # 2002::/16, RFC 3056: 2002:AABB:CCDD:: carries AA.BB.CC.DD
_MAPPED_NETWORK = ipaddress.IPv6Network("::ffff:0:0/96")
_BITS = {4: 32, 6: 128}


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one embeds, which rules judge it by as well.

    IPv4-mapped (``::ffff:a.b.c.d``), IPv4-compatible (``::a.b.c.d``), NAT64's well-known prefix
    (``64:ff9b::a.b.c.d``, RFC 6052: a NAT64 gateway connects to ``a.b.c.d``) and 6to4
    (``2002:aabb:ccdd::/48``, RFC 3056).  ``::`` and ``::1`` are IPv6's own unspecified and
    loopback addresses, not IPv4-compatible.
    """
    value = _embedded(int(ip)) if ip.version == 6 else None
    return None if value is None else ipaddress.IPv4Address(value)


def _embedded(value: int) -> int | None:
    """:func:`embedded_ipv4` on an IPv6 address as an integer."""
    high = value >> 32
    if high == _MAPPED_PREFIX or (high == 0 and value > 1) or (value & ~0xFFFFFFFF) == _NAT64_PREFIX:
        return value & 0xFFFFFFFF
    if value >> 112 == _6TO4_PREFIX:
        return (value >> 80) & 0xFFFFFFFF
    return None


def normalize(ip: IPAddress) -> IPAddress:
    """``ip``, or the IPv4 address it embeds: how the same host is compared across families."""
    return embedded_ipv4(ip) or ip


def normalize_network(network: Network) -> Network:
    """An IPv4-mapped IPv6 network (``::ffff:10.0.0.0/104``) as the IPv4 network it means."""
    if network.version == 6 and network.prefixlen >= 96 and network.subnet_of(_MAPPED_NETWORK):  # type: ignore[arg-type]
        v4 = ipaddress.IPv4Address(int(network.network_address) & 0xFFFFFFFF)
        return ipaddress.IPv4Network(f"{v4}/{network.prefixlen - 96}")
    return network


class NetworkSet:
    """IP networks with labels.  A look-up probes one dict per distinct prefix length, longest first."""

    __slots__ = ("_probes", "_tables")

    def __init__(self) -> None:
        # version -> prefix length -> network address as int -> label
        self._tables: dict[int, dict[int, dict[int, str]]] = {4: {}, 6: {}}
        self._probes: dict[int, tuple[tuple[int, int, dict[int, str]], ...]] | None = None

    def __len__(self) -> int:
        return sum(len(t) for tables in self._tables.values() for t in tables.values())

    def add(self, network: Network, label: str) -> str | None:
        """Add ``network``; returns the label it already had (a duplicate), else None."""
        network = normalize_network(network)
        table = self._tables[network.version].setdefault(network.prefixlen, {})
        key = int(network.network_address)
        existing = table.get(key)
        if existing is None:
            table[key] = label
            self._probes = None
        return existing

    def update(self, other: NetworkSet) -> None:
        for network, label in other.items():
            self.add(network, label)

    def _index(self) -> dict[int, tuple[tuple[int, int, dict[int, str]], ...]]:
        probes = {}
        for version, tables in self._tables.items():
            bits = _BITS[version]
            probes[version] = tuple(
                (length, ((1 << length) - 1) << (bits - length), tables[length])
                for length in sorted(tables, reverse=True)
            )
        self._probes = probes
        return probes

    def lookup(self, ip: IPAddress) -> str | None:
        """The label of the most specific network containing ``ip`` (or its embedded IPv4)."""
        probes = self._probes or self._index()
        value = int(ip)
        label = _probe(probes[ip.version], value)
        if label is None and ip.version == 6:
            embedded = _embedded(value)
            if embedded is not None:
                label = _probe(probes[4], embedded)
        return label

    def container(self, network: Network, *, strict: bool = False) -> tuple[Network, str] | None:
        """An entry containing all of ``network`` and its label (with ``strict``, a larger entry only)."""
        network = normalize_network(network)
        probes = self._probes or self._index()
        value = int(network.network_address)
        make = ipaddress.IPv4Network if network.version == 4 else ipaddress.IPv6Network
        for length, mask, table in probes[network.version]:
            if length > network.prefixlen or (strict and length == network.prefixlen):
                continue
            label = table.get(value & mask)
            if label is not None:
                return make((value & mask, length)), label
        return None

    def items(self) -> Iterator[tuple[Network, str]]:
        """Every ``(network, label)``."""
        for version, tables in self._tables.items():
            make = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
            for length, table in tables.items():
                for value, label in table.items():
                    yield make((value, length)), label

    def covers(self, other: NetworkSet) -> bool:
        """Whether every network of ``other`` lies inside one of this set's networks."""
        return all(self.container(network) is not None for network, _ in other.items())


def _probe(probes: tuple[tuple[int, int, dict[int, str]], ...], value: int) -> str | None:
    for _, mask, table in probes:
        label = table.get(value & mask)
        if label is not None:
            return label
    return None


class DomainSet:
    """Exact names and ``*.suffix`` entries (subdomains only).  A look-up probes one dict per label."""

    __slots__ = ("exact", "suffixes")

    def __init__(self) -> None:
        self.exact: dict[str, str] = {}
        self.suffixes: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.exact) + len(self.suffixes)

    def add_exact(self, name: str, label: str) -> None:
        self.exact.setdefault(name, label)

    def add_suffix(self, name: str, label: str) -> None:
        """Match every name ending in ``.name`` (not ``name`` itself)."""
        self.suffixes.setdefault(name, label)

    def update(self, other: DomainSet) -> None:
        for name, label in other.exact.items():
            self.exact.setdefault(name, label)
        for name, label in other.suffixes.items():
            self.suffixes.setdefault(name, label)

    def lookup(self, name: str) -> str | None:
        label = self.exact.get(name)
        if label is not None or not self.suffixes:
            return label
        return self.parent_label(name)

    def parent_label(self, name: str) -> str | None:
        """The label of a ``*.suffix`` entry that ``name`` is a subdomain of."""
        suffixes = self.suffixes
        dot = name.find(".")
        while dot >= 0:
            label = suffixes.get(name[dot + 1 :])
            if label is not None:
                return label
            dot = name.find(".", dot + 1)
        return None


@dataclass(frozen=True, slots=True)
class Pattern:
    """A regular expression searched in the destination name (``~regex`` or ``regex:...``)."""

    regex: re.Pattern[str]
    text: str

    def search(self, name: str) -> bool:
        return self.regex.search(name) is not None


@dataclass(frozen=True, slots=True)
class AddressMatcher:
    """IP networks, plus the proxy's own addresses when ``special:self`` was listed."""

    networks: NetworkSet
    includes_self: bool
    texts: tuple[str, ...]

    def match(self, ip: IPAddress, local: frozenset[IPAddress]) -> str | None:
        label = self.networks.lookup(ip)
        if label is None and self.includes_self and normalize(ip) in local:
            return "special:self"
        return label

    def covers(self, other: AddressMatcher) -> bool:
        return (self.includes_self or not other.includes_self) and self.networks.covers(other.networks)


@dataclass(frozen=True, slots=True)
class NameMatcher:
    """Exact names, ``*.suffix`` entries and patterns."""

    domains: DomainSet
    patterns: tuple[Pattern, ...]

    def match(self, name: str) -> str | None:
        label = self.domains.lookup(name)
        if label is None:
            for pattern in self.patterns:
                if pattern.search(name):
                    return pattern.text
        return label

    def covers(self, other: NameMatcher) -> bool:
        exact_covered = all(self.match(name) is not None for name in other.domains.exact)
        suffixes_covered = all(
            name in self.domains.suffixes or self.domains.parent_label(name) is not None
            for name in other.domains.suffixes
        )
        sources = {p.regex.pattern for p in self.patterns}
        patterns_covered = all(p.regex.pattern in sources for p in other.patterns)
        return exact_covered and suffixes_covered and patterns_covered


@dataclass(frozen=True, slots=True)
class PortSet:
    """Ports and inclusive ranges."""

    ranges: tuple[tuple[int, int], ...]

    def __contains__(self, port: int) -> bool:
        return any(low <= port <= high for low, high in self.ranges)

    def covers(self, other: PortSet) -> bool:
        return all(_range_covered(low, high, self.ranges) for low, high in other.ranges)

    def __str__(self) -> str:
        return ", ".join(str(low) if low == high else f"{low}-{high}" for low, high in self.ranges)


def _range_covered(low: int, high: int, ranges: Iterable[tuple[int, int]]) -> bool:
    for start, end in sorted(ranges):
        if start <= low <= end:
            low = end + 1
            if low > high:
                return True
    return False


@dataclass(frozen=True, slots=True)
class Destination:
    """The ``to`` field: names are matched as written, addresses after resolution.

    A field whose entries hold nothing (an empty list file) matches nothing.
    """

    names: NameMatcher | None
    addresses: AddressMatcher | None
    texts: tuple[str, ...]

    def covers(self, other: Destination) -> bool:
        names = other.names is None or (self.names is not None and self.names.covers(other.names))
        addresses = other.addresses is None or (
            self.addresses is not None and self.addresses.covers(other.addresses)
        )
        return names and addresses
