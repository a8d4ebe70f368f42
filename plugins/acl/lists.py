"""Destination entries as written in rules and in list files, and the list files themselves.

A list file holds one entry per line, its kind detected per line, ``#`` starting a comment:

* a domain (``ads.example``) or its subdomains (``*.ads.example``);
* an IP address or network (``203.0.113.7``, ``198.51.100.0/24``, ``2001:db8::/32``);
* a hosts-file line, ``IP name [name...]`` (``0.0.0.0 ads.example``): the names are the
  entries, the IP is ignored.  The header entries of hosts files that name the machine itself
  (``localhost``, ``broadcasthost``, ``ip6-*``…) are skipped: they are not blocklist entries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from socksflow import InvalidAddress, parse_host, parse_ip
from socksflow import parse_network as parse_ip_network

from .matchers import DomainSet, Network, NetworkSet, normalize_network

HOSTS_FILE_SELF_NAMES = frozenset({
    "localhost", "localhost.localdomain", "local", "broadcasthost", "ip6-localhost", "ip6-loopback",
    "ip6-localnet", "ip6-mcastprefix", "ip6-allnodes", "ip6-allrouters", "ip6-allhosts", "0.0.0.0",
})  # fmt: skip
_PLAIN_NAME = re.compile(r"[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*")


class EntryError(ValueError):
    """An entry that is not a domain, ``*.suffix`` or network; ``line`` is set for list files."""

    def __init__(self, message: str, line: int = 0) -> None:
        super().__init__(message)
        self.line = line


def parse_network(text: str) -> Network:
    """An IP address (as a one-address network) or a network in CIDR notation."""
    try:
        return parse_ip_network(text)
    except ValueError:
        pass
    try:
        network = parse_ip_network(text, strict=False)
    except ValueError as exc:
        raise EntryError(
            f"{text!r} is not a network" + (": zone ids are not accepted" if "%" in text else "")
        ) from exc
    raise EntryError(f"{text!r} has host bits set (the network is {network})")


def looks_like_network(text: str) -> bool:
    """Whether ``text`` can only be meant as an IP address or network (not a name)."""
    return "/" in text or ":" in text or text.rpartition(".")[2].isdigit()


def parse_name(text: str) -> str:
    """A domain name, normalised as the protocol layer does (lower case, no trailing dot, IDNA)."""
    name = text.lower().removesuffix(".")
    if len(name) <= 253 and _PLAIN_NAME.fullmatch(name):
        return name  # the common case, without parse_host's IP-literal attempt
    try:
        host = parse_host(text)
    except InvalidAddress as exc:
        raise EntryError(str(exc)) from None
    if not isinstance(host, str):
        raise EntryError(f"{text!r} is an IP address, not a name")
    return host


def parse_host_entry(text: str) -> Network | tuple[str, str]:
    """A network, or ``("name", name)`` / ``("suffix", name)`` for ``name`` / ``*.name``."""
    if text.startswith("*."):
        return "suffix", parse_name(text[2:])
    if looks_like_network(text):
        return parse_network(text)
    return "name", parse_name(text)


@dataclass
class ListFile:
    """The entries of one list file, each labelled ``shown:LINE``, and what looks like a mistake."""

    shown: str
    domains: DomainSet = field(default_factory=DomainSet)
    networks: NetworkSet = field(default_factory=NetworkSet)
    lints: list[tuple[int, str]] = field(default_factory=list)


def load_list(path: Path, shown: str) -> ListFile:
    """Read a list file; raises OSError, or :class:`EntryError` naming the bad line."""
    text = path.read_text(encoding="utf-8")
    result = ListFile(shown)
    lines: dict[Network, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        fields = raw.partition("#")[0].split()
        if not fields:
            continue
        try:
            if len(fields) > 1:
                _add_hosts_line(result, fields, f"{shown}:{number}")
            else:
                entry = parse_host_entry(fields[0])
                label = f"{shown}:{number}"
                if isinstance(entry, tuple):
                    kind, name = entry
                    (result.domains.add_suffix if kind == "suffix" else result.domains.add_exact)(name, label)
                else:
                    entry = normalize_network(entry)
                    if result.networks.add(entry, label) is not None:
                        first = lines[entry]
                        result.lints.append((number, f"{entry} is listed twice (first on line {first})"))
                    lines.setdefault(entry, number)
        except EntryError as exc:
            raise EntryError(str(exc), number) from None
    where = {network: f"line {number}" for network, number in lines.items()}
    result.lints.extend((lines[inner], message) for inner, message in overlaps(result.networks, where))
    result.lints.sort()
    return result


def _add_hosts_line(result: ListFile, fields: list[str], label: str) -> None:
    try:
        parse_ip(fields[0])
    except ValueError:
        raise EntryError(
            f"{' '.join(fields)!r}: expected one domain or network per line, or a hosts line 'IP name...'"
        ) from None
    for name in fields[1:]:
        if name.lower() not in HOSTS_FILE_SELF_NAMES:
            result.domains.add_exact(parse_name(name), label)


def overlaps(networks: NetworkSet, where: dict[Network, str]) -> list[tuple[Network, str]]:
    """``(network, message)`` for each network that lies inside another entry of the same list.

    ``where`` says where each (normalised) network was written, for the message.
    """
    found = []
    for network, _ in networks.items():
        container = networks.container(network, strict=True)
        if container is not None:
            outer = container[0]
            found.append((network, f"{network} overlaps {outer} ({where.get(outer, outer)}), which holds it"))
    return found
