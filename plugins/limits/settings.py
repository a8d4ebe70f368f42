"""The ``limits`` section, validated: entries, their match, their scope and their limits."""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable
from dataclasses import dataclass, field, replace

from socksflow import Node, Session
from socksflow import parse_network as parse_ip_network

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
ENTRY_KEYS = frozenset(
    {
        "match",
        "per",
        "sessions_per_second",
        "burst",
        "max_sessions",
        "max_handshakes",
        "bandwidth",
        "auth_failures",
    }
)
SCOPES = ("address", "user", "session", "all")
DEFAULT_IPV6_PREFIX = 64
BANDWIDTH_BURST_SECONDS = 0.1  # default bucket depth: a tenth of a second of traffic


@dataclass(frozen=True, slots=True)
class Rate:
    per_second: float
    burst: float


@dataclass(frozen=True, slots=True)
class Match:
    networks: tuple[IPNetwork, ...] = ()
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    # The networks as (first, last) integers per IP version: matched several times per session,
    # without ipaddress's Python-level containment test.
    _ranges: dict[int, tuple[tuple[int, int], ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ranges: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for network in self.networks:
            ranges[network.version].append((int(network.network_address), int(network.broadcast_address)))
        object.__setattr__(self, "_ranges", {version: tuple(found) for version, found in ranges.items()})

    @property
    def needs_identity(self) -> bool:
        return bool(self.users or self.groups)

    def client_matches(self, session: Session) -> bool:
        if not self.networks:
            return True
        host = session.client.host
        value = int(host)
        for first, last in self._ranges[4 if isinstance(host, ipaddress.IPv4Address) else 6]:
            if first <= value <= last:
                return True
        return False

    def matches(self, session: Session) -> bool:
        identity = session.identity
        return (
            self.client_matches(session)
            and (not self.users or identity.user in self.users)
            and (not self.groups or not self.groups.isdisjoint(identity.groups))
        )


@dataclass(frozen=True, slots=True)
class Scope:
    """Who shares one limit; :meth:`key` names the share a session belongs to."""

    kind: str  # one of SCOPES, or "network"
    ipv4_prefix: int = 32
    ipv6_prefix: int = 128

    def key(self, session: Session) -> Hashable:
        """Plain tuples of str and int: hashed several times per session, so no ipaddress objects."""
        if self.kind == "all":
            return ("all",)
        if self.kind == "user" and session.identity.user:
            return ("user", session.identity.user)
        host = session.client.host
        version = 4 if isinstance(host, ipaddress.IPv4Address) else 6
        if self.kind == "network":
            bits, prefix = (32, self.ipv4_prefix) if version == 4 else (128, self.ipv6_prefix)
            return ("network", version, prefix, int(host) >> (bits - prefix))
        return ("address", version, int(host))  # also the "user" of an anonymous session


@dataclass(frozen=True, slots=True)
class AuthThrottle:
    failures: int
    within: float
    block: float


@dataclass(frozen=True, slots=True)
class Entry:
    location: str
    match: Match
    per: Scope
    session_rate: Rate | None = None
    max_sessions: int | None = None
    max_handshakes: int | None = None
    up: Rate | None = None
    down: Rate | None = None
    auth: AuthThrottle | None = None
    ident: str = ""  # names the entry's runtime state: its place and its limits (see parse_entry)

    @property
    def at_accept(self) -> bool:
        """Whether the entry can be judged before the greeting (no identity needed)."""
        return not self.match.needs_identity and self.per.kind != "user"

    def describe(self, what: str) -> str:
        return f"{what} ({self.location}, per {self.per.kind})"


@dataclass(frozen=True, slots=True)
class Limits:
    at_accept: tuple[Entry, ...]
    at_request: tuple[Entry, ...]
    bandwidth: tuple[Entry, ...]
    auth: tuple[Entry, ...]
    handshakes: tuple[Entry, ...] = ()


def parse_entry(node: Node) -> Entry:
    items = node.as_map(ENTRY_KEYS)
    match = parse_match(items["match"]) if "match" in items else Match()
    default_scope = Scope("user" if match.needs_identity else "address")
    per = parse_scope(items["per"]) if "per" in items else default_scope
    entry = Entry(node.location, match, per)
    if "sessions_per_second" in items:
        rate = parse_count_rate(items["sessions_per_second"])
        burst = float(items["burst"].as_int(minimum=1)) if "burst" in items else max(1.0, rate)
        entry = replace(entry, session_rate=Rate(rate, burst))
    elif "burst" in items:
        raise items["burst"].error("burst goes with sessions_per_second (bandwidth: {down: .., burst: 1MiB})")
    if "max_sessions" in items:
        entry = replace(entry, max_sessions=items["max_sessions"].as_int(minimum=0))
    if "max_handshakes" in items:
        if match.needs_identity or per.kind not in ("address", "network", "all"):
            raise items["max_handshakes"].error(
                "max_handshakes counts per client address or network (before any login): match on 'from' only"
            )
        entry = replace(entry, max_handshakes=items["max_handshakes"].as_int(minimum=1))
    if per.kind == "session" and (entry.session_rate or entry.max_sessions is not None):
        raise items["per"].error("per session only applies to bandwidth")
    if "bandwidth" in items:
        up, down = parse_bandwidth(items["bandwidth"])
        entry = replace(entry, up=up, down=down)
    if "auth_failures" in items:
        if match.needs_identity or per.kind not in ("address", "network", "user"):
            raise items["auth_failures"].error(
                "auth_failures counts per client address, network or user name: match on 'from' only"
            )
        entry = replace(entry, auth=parse_auth_throttle(items["auth_failures"]))
    if not (
        entry.session_rate or entry.max_sessions is not None or entry.max_handshakes or entry.up or entry.down
        or entry.auth
    ):  # fmt: skip
        raise node.error(
            "no limit given (sessions_per_second, max_sessions, max_handshakes, bandwidth or auth_failures)"
        )
    # A reload keeps the buckets of an entry that stayed where it was with the same limits.
    return replace(
        entry,
        ident=f"{entry.location} {entry.session_rate} {entry.up} {entry.down} {entry.auth} {entry.max_handshakes}",
    )


def parse_match(node: Node) -> Match:
    items = node.as_map({"from", "user", "group"})
    nodes = {key: items[key].as_list() if key in items else [] for key in ("from", "user", "group")}
    return Match(
        networks=tuple(parse_network(item) for item in nodes["from"]),
        users=frozenset(str(item.value) for item in nodes["user"]),  # user names may look like numbers
        groups=frozenset(item.as_str() for item in nodes["group"]),
    )


def parse_network(node: Node) -> IPNetwork:
    try:
        return parse_ip_network(node.as_str())
    except ValueError as exc:
        raise node.error(f"{node.value!r} is not a network: {exc}") from None


def parse_scope(node: Node) -> Scope:
    text = node.as_str().strip()
    if text in SCOPES:
        return Scope(text)
    prefixes = text.split()
    if not 1 <= len(prefixes) <= 2 or not all(p.startswith("/") and p[1:].isdigit() for p in prefixes):
        raise node.error(f"{text!r} is not one of {', '.join(SCOPES)} or a prefix such as /24 (or '/24 /56')")
    ipv4, ipv6 = int(prefixes[0][1:]), int(prefixes[1][1:]) if len(prefixes) == 2 else DEFAULT_IPV6_PREFIX
    if ipv4 > 32 or ipv6 > 128:
        raise node.error(f"{text!r}: IPv4 prefixes go up to /32, IPv6 ones to /128 ('/24 /64' gives both)")
    return Scope("network", ipv4, ipv6)


def parse_count_rate(node: Node) -> float:
    """``50`` (per second), or a rate such as ``100/s`` or ``600/m``."""
    plain = isinstance(node.value, int | float) and not isinstance(node.value, bool)
    rate = float(node.value) if plain else node.as_rate()
    if rate <= 0:
        raise node.error("the rate must be above zero")
    return rate


def parse_byte_rate(node: Node, burst: float | None) -> Rate:
    rate = node.as_rate()
    if rate <= 0:
        raise node.error("the rate must be above zero")
    return Rate(rate, burst if burst is not None else max(1.0, rate * BANDWIDTH_BURST_SECONDS))


def parse_bandwidth(node: Node) -> tuple[Rate | None, Rate | None]:
    """``10MiB/s`` (each direction) or ``{up: .., down: .., burst: ..}``."""
    if not node.is_map:
        rate = parse_byte_rate(node, None)
        return rate, rate
    items = node.as_map({"up", "down", "burst"})
    burst = float(items["burst"].as_size()) if "burst" in items else None
    if burst is not None and burst < 1:
        raise items["burst"].error("the burst must be at least one byte")
    if "up" not in items and "down" not in items:
        raise node.error("give up:, down: or both")
    up = parse_byte_rate(items["up"], burst) if "up" in items else None
    down = parse_byte_rate(items["down"], burst) if "down" in items else None
    return up, down


def parse_auth_throttle(node: Node) -> AuthThrottle:
    items = node.as_map({"max", "within", "block"})
    if "max" not in items:
        raise node.error("give max: the failures allowed within the window")
    return AuthThrottle(
        failures=items["max"].as_int(minimum=1),
        within=items["within"].as_duration() if "within" in items else 60.0,
        block=items["block"].as_duration() if "block" in items else 900.0,
    )
