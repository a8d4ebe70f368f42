"""The ``dns:`` section read into settings: name servers, static hosts, per-domain policy, limits."""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import dns.nameserver
import dns.query
import dns.resolver

from socksflow import ConfigError, Node, parse_ip

from .cache import CacheSettings, IPAddress

KEYS = frozenset({"servers", "hosts", "hosts_file", "policy", "prefer", "timeout", "retries", "cache"})
CACHE_KEYS = frozenset({"size", "min_ttl", "max_ttl", "negative_ttl"})
SERVER_KEYS = frozenset({"address", "tls_name", "ca", "bootstrap"})
PREFERENCES = ("ipv4", "ipv6", "both")
RESOLV_CONF = "/etc/resolv.conf"
MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63

Servers = tuple[dns.nameserver.Nameserver, ...]


@dataclass(slots=True)
class DnsSettings:
    """Everything the ``dns:`` section says, validated."""

    servers: Servers
    hosts: dict[str, tuple[IPAddress, ...]] = field(default_factory=dict)
    exact_policy: dict[str, Servers] = field(default_factory=dict)
    suffix_policy: dict[str, Servers] = field(default_factory=dict)  # "*.corp.example" → "corp.example"
    prefer: str = "ipv4"
    timeout: float = 2.0
    retries: int = 1
    cache: CacheSettings = field(default_factory=CacheSettings)

    @property
    def lifetime(self) -> float:
        """How long one look-up may take in all: every try, each up to ``timeout``."""
        return self.timeout * (self.retries + 1)

    def servers_for(self, name: str) -> Servers:
        """The servers for ``name``: an exact policy entry, else the longest matching ``*.suffix``."""
        servers = self.exact_policy.get(name)
        if servers is not None:
            return servers
        if self.suffix_policy:
            labels = name.split(".")
            for start in range(1, len(labels)):
                servers = self.suffix_policy.get(".".join(labels[start:]))
                if servers is not None:
                    return servers
        return self.servers


def read_settings(node: Node) -> DnsSettings:
    """Validate the ``dns:`` section; raises a located :class:`ConfigError`."""
    items = node.as_map(KEYS)
    if "servers" not in items:
        raise node.error("give the name servers to ask (servers: [system] for resolv.conf)")
    settings = DnsSettings(servers=read_servers(items["servers"]))
    if "hosts_file" in items:
        settings.hosts.update(read_hosts_file(items["hosts_file"]))
    if "hosts" in items:
        for name_node, value in _named_items(items["hosts"]):
            settings.hosts[normalise_name(name_node)] = tuple(_ip(ip) for ip in value.as_list())
    if "policy" in items:
        for name_node, value in _named_items(items["policy"]):
            pattern = normalise_name(name_node, wildcard=True)
            if pattern.startswith("*."):
                settings.suffix_policy[pattern[2:]] = read_servers(value)
            else:
                settings.exact_policy[pattern] = read_servers(value)
    if "prefer" in items:
        settings.prefer = items["prefer"].as_choice(PREFERENCES)
    if "timeout" in items:
        settings.timeout = items["timeout"].as_duration()
        if settings.timeout <= 0:
            raise items["timeout"].error("the timeout must be longer than 0s")
    if "retries" in items:
        settings.retries = items["retries"].as_int(minimum=0, maximum=10)
    if "cache" in items:
        settings.cache = read_cache(items["cache"])
    return settings


def read_cache(node: Node) -> CacheSettings:
    items = node.as_map(CACHE_KEYS)
    values: dict[str, float] = {}
    for key, child in items.items():
        values[key] = child.as_int(minimum=0) if key == "size" else child.as_duration()
    cache = CacheSettings(**values)  # type: ignore[arg-type]
    if cache.min_ttl > cache.max_ttl:
        raise node.error(f"min_ttl ({cache.min_ttl:g}s) is above max_ttl ({cache.max_ttl:g}s)")
    return cache


def _named_items(node: Node) -> Iterable[tuple[Node, Node]]:
    """A mapping's items with the key as a located node (for errors about the name itself)."""
    for key, value in node.as_map().items():
        yield Node(key, value.line, value.path, value.file), value


def _ip(node: Node) -> IPAddress:
    text = node.as_str() if isinstance(node.value, str) else str(node.value)
    try:
        return parse_ip(text)
    except ValueError:
        raise node.error(f"{text!r} is not an IPv4 or IPv6 address") from None


def normalise_name(node: Node, *, wildcard: bool = False) -> str:
    """A host name as the protocol layer gives it to resolvers: lower case, IDNA, no final dot."""
    text = node.as_str()
    prefix = "*." if wildcard and text.startswith("*.") else ""
    name = text[len(prefix) :].lower().removesuffix(".")
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise node.error(f"{text!r} is not a valid host name") from None
    if not name_is_valid(name):
        raise node.error(f"{text!r} is not a valid host name")
    return prefix + name


def name_is_valid(name: str) -> bool:
    """Whether ``name`` fits DNS's limits: at most 253 characters, labels of 1 to 63."""
    labels = name.split(".")
    return 0 < len(name) <= MAX_NAME_LENGTH and all(0 < len(label) <= MAX_LABEL_LENGTH for label in labels)


# ---------------------------------------------------------------------------- servers


def read_servers(node: Node) -> Servers:
    """A list of servers: ``system``, ``IP[:port]``, ``tls://IP[:port]``, ``https://…`` or mappings."""
    servers: list[dns.nameserver.Nameserver] = []
    for item in node.as_list():
        servers.extend(read_server(item))
    if not servers:
        raise node.error("list at least one name server")
    return tuple(servers)


def read_server(node: Node) -> list[dns.nameserver.Nameserver]:
    options: dict[str, Node] = {}
    if node.is_map:
        options = node.as_map(SERVER_KEYS)
        if "address" not in options:
            raise node.error("give the server's address (address: tls://IP:853 or https://…)")
        node = options["address"]
    text = node.as_str()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "udp", text
    if text == "system":
        _only(options, (), node)
        return _system_servers(node)
    if scheme == "udp":
        _only(options, (), node)
        address, port = _host_port(node, rest, 53)
        return [dns.nameserver.Do53Nameserver(address, port)]
    if scheme == "tls":
        _only(options, ("tls_name", "ca"), node)
        address, port = _host_port(node, rest, 853)
        name = options["tls_name"].as_str() if "tls_name" in options else address  # check the IP in the cert
        return [dns.nameserver.DoTNameserver(address, port, hostname=name, verify=_verify(options))]
    if scheme == "https":
        _only(options, ("ca", "bootstrap"), node)
        return [_doh_server(node, text, options)]
    raise node.error(f"unknown scheme {scheme!r} (use IP:port, tls://IP:port or https://host/path)")


def _only(options: dict[str, Node], allowed: tuple[str, ...], node: Node) -> None:
    for key, child in options.items():
        if key != "address" and key not in allowed:
            raise child.error(f"does not apply to {node.value!r}")


def _host_port(node: Node, text: str, default_port: int) -> tuple[str, int]:
    """``IP``, ``IP:port``, ``[IPv6]:port`` or a bare IPv6 address; servers are given by address."""
    host, port = text, default_port
    if text.startswith("["):
        host, sep, tail = text[1:].partition("]")
        if not sep or (tail and not tail.startswith(":")):
            raise node.error(f"{text!r} is not [IPv6]:port")
        if tail:
            port = _port(node, tail[1:])
    elif text.count(":") == 1:
        host, _, tail = text.partition(":")
        port = _port(node, tail)
    try:
        return str(parse_ip(host)), port
    except ValueError:
        raise node.error(f"{host!r} is not an IP address (name servers are given by address)") from None


def _port(node: Node, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise node.error(f"{text!r} is not a port (1 to 65535)")
    return int(text)


def _verify(options: dict[str, Node]) -> bool | str:
    if "ca" not in options:
        return True  # the system's trusted CAs
    path = options["ca"].as_path()
    if not path.is_file():
        raise options["ca"].error(f"no CA file at {str(path)!r}")
    return str(path)


def _doh_server(node: Node, url: str, options: dict[str, Node]) -> dns.nameserver.Nameserver:
    if not dns.query.have_doh:
        raise node.error("DNS over HTTPS needs dnspython's 'doh' extra: pip install 'dnspython[doh]'")
    parts = urlsplit(url)
    if not parts.hostname:
        raise node.error(f"{url!r} has no host")
    bootstrap = None
    if "bootstrap" in options:
        bootstrap = str(_ip(options["bootstrap"]))
    else:
        try:
            parse_ip(parts.hostname)
        except ValueError:  # the system resolver would be asked for the server's own name
            raise node.error(f"give the address of {parts.hostname!r} (bootstrap: IP)") from None
    verify = _verify(options)
    if isinstance(verify, str):  # httpx2 deprecates CA file names: it takes a context
        verify = ssl.create_default_context(cafile=verify)
    return dns.nameserver.DoHNameserver(url, bootstrap_address=bootstrap, verify=verify)  # type: ignore[arg-type]


def _system_servers(node: Node) -> list[dns.nameserver.Nameserver]:
    resolver = dns.resolver.Resolver(configure=False)
    try:
        resolver.read_resolv_conf(RESOLV_CONF)
    except (OSError, dns.resolver.NoResolverConfiguration) as exc:
        raise node.error(f"cannot use the system's name servers from {RESOLV_CONF}: {exc}") from None
    return [
        ns if isinstance(ns, dns.nameserver.Nameserver) else dns.nameserver.Do53Nameserver(ns)
        for ns in resolver.nameservers
    ]


# ---------------------------------------------------------------------------- hosts files


def read_hosts_file(node: Node) -> dict[str, tuple[IPAddress, ...]]:
    """Names and addresses from an ``/etc/hosts``-style file (``IP name alias…``, ``#`` comments)."""
    path = node.as_path()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise node.error(f"cannot read hosts file {str(path)!r}: {exc}") from None
    hosts: dict[str, tuple[IPAddress, ...]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.partition("#")[0].split()
        if not fields:
            continue
        where = f"{path}:{number}"
        try:
            address = parse_ip(fields[0])
        except ValueError:
            raise _file_error(node, f"{where}: {fields[0]!r} is not an IP address") from None
        if len(fields) == 1:
            raise _file_error(node, f"{where}: no name after {fields[0]}")
        for name in fields[1:]:
            key = name.lower().removesuffix(".")
            if not name_is_valid(key):
                raise _file_error(node, f"{where}: {name!r} is not a valid host name")
            if address not in hosts.get(key, ()):
                hosts[key] = (*hosts.get(key, ()), address)
    return hosts


def _file_error(node: Node, message: str) -> ConfigError:
    return ConfigError(message, node.file, node.line, node.path)
