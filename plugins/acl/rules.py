"""The ``rules:`` and ``groups:`` sections, read into :class:`Rule` objects that know their line."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from socksflow import OUTBOUNDS, Command, Config, ConfigError, IPAddress, Node, Reply, detect

from .lists import (
    EntryError,
    ListFile,
    load_list,
    looks_like_network,
    overlaps,
    parse_host_entry,
    parse_network,
)
from .matchers import (
    AddressMatcher,
    Destination,
    DomainSet,
    NameMatcher,
    Network,
    NetworkSet,
    Pattern,
    PortSet,
    normalize,
    normalize_network,
)
from .special import SELF, SPECIAL_NAMES, special_networks

COMMANDS = {
    "connect": Command.CONNECT,
    "bind": Command.BIND,
    "udp": Command.UDP_ASSOCIATE,
    "resolve": Command.RESOLVE,  # Tor's RESOLVE: the proxy looks the name up for the client
    "resolve_ptr": Command.RESOLVE_PTR,
}
COMMAND_NAMES = {command: name for name, command in COMMANDS.items()}
FIELDS = ("from", "user", "group", "command", "protocol", "to", "port")
ACTIONS = ("allow", "deny")


MAX_LIST_LINTS = 10  # lint lines shown per list file


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``- allow: {...}`` or ``- deny: {...}`` item; a field left out (``None``) matches anything."""

    index: int
    file: str
    line: int
    allow: bool
    reply: Reply = Reply.NOT_ALLOWED
    reason: str = ""
    clients: AddressMatcher | None = None
    users: frozenset[str] | None = None
    groups: frozenset[str] | None = None
    commands: frozenset[Command] | None = None
    protocols: frozenset[str] | None = None  # front doors: socks5, socks4, http
    destinations: Destination | None = None
    ports: PortSet | None = None
    via: str | None = None  # the outbound an allowed session goes through (None: direct)

    @property
    def action(self) -> str:
        return "allow" if self.allow else "deny"

    @property
    def location(self) -> str:
        """``rules.yaml:14``: what a verdict names as its rule."""
        return f"{self.file}:{self.line}"

    @property
    def title(self) -> str:
        """``rules.yaml:14 deny (internal networks)``: how logs and explanations name the rule."""
        return f"{self.location} {self.action}" + (f" ({self.reason})" if self.reason else "")


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Everything the ACL decides with, built once per configuration (kept in ``config.stash``)."""

    file: str
    rules: tuple[Rule, ...]
    # The groups ``user`` is in, given those ``extra`` its login gave: the configuration's
    # Config.groups_of, so the engine and the rules merge them one way.
    groups_of: Callable[..., frozenset[str]]
    local: frozenset[IPAddress] = frozenset()  # the listen addresses: special:self
    # Requests decided without DNS, by everything they were decided on (see sessions.py): made
    # with the rule set, so a reload, which reads a new one, starts with none.
    decided: dict[tuple[Any, ...], Any] = field(default_factory=dict, compare=False, repr=False)


class RuleReader:
    """Reads the sections of one configuration; list files are read once however often named."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.lints: list[ConfigError] = []
        self._lists: dict[Path, ListFile] = {}
        self._linted_lists: set[Path] = set()
        self.defined_groups: set[str] = set()

    # ------------------------------------------------------------------ sections

    def read(self) -> RuleSet | None:
        config = self.config
        self.defined_groups = set(config.group_names)
        node = config.section("rules")
        if node is None:
            return None
        rules = []
        for index, item in enumerate(node.as_list(scalar_ok=False)):
            with config.errors.capture():
                rule = self.read_rule(index, item)
                if rule is not None:
                    rules.append(rule)
        local = frozenset(normalize(a.host) for a in config.listen if not a.is_domain)  # type: ignore[arg-type]
        return RuleSet(config.file, tuple(rules), config.groups_of, local)

    def read_rule(self, index: int, node: Node) -> Rule | None:
        """The rule, or None when a field had errors (reported in ``config.errors``)."""
        items = node.as_map({*ACTIONS, "reply", "reason", "via"})
        actions = [name for name in ACTIONS if name in items]
        if len(actions) != 1:
            raise node.error("a rule needs exactly one of 'allow:' or 'deny:'")
        action = actions[0]
        rule: dict[str, object] = {"index": index, "file": node.file, "line": node.line}
        rule["allow"] = action == "allow"
        errors = self.config.errors
        with errors.capture():
            if "reason" in items:
                rule["reason"] = items["reason"].as_str()
        with errors.capture():
            if "reply" in items:
                if action == "allow":
                    raise items["reply"].error("only a denial has a reply code")
                rule["reply"] = parse_reply(items["reply"])
        with errors.capture():
            if "via" in items:
                rule["via"] = self.read_via(items["via"], action)
        match = items[action]
        if match.value == "all":
            return Rule(**rule)  # type: ignore[arg-type]
        if not match.is_map:
            raise match.error(f"expected 'all' or a mapping of {', '.join(FIELDS)}")
        fields = match.as_map(set(FIELDS))
        if not fields:
            raise match.error(f"no match fields: write '{action}: all' to match everything")
        count = len(errors.errors)
        readers: dict[str, tuple[str, Callable[[Node], object]]] = {
            "from": ("clients", self.read_addresses),
            "user": ("users", lambda n: frozenset(u.as_str() for u in n.as_list())),
            "group": ("groups", self.read_group_field),
            "command": ("commands", parse_commands),
            "protocol": ("protocols", parse_protocols),
            "to": ("destinations", self.read_destinations),
            "port": ("ports", parse_ports),
        }
        for name, child in fields.items():
            with errors.capture():
                if child.is_list and not child.value:
                    raise child.error("an empty list matches nothing: remove the field or the rule")
                attribute, reader = readers[name]
                rule[attribute] = reader(child)
        if len(errors.errors) > count:
            return None
        return Rule(**rule)  # type: ignore[arg-type]

    def read_via(self, node: Node, action: str) -> str:
        if action != "allow":
            raise node.error("only an allow rule has an outbound")
        name = node.as_str()
        registry = self.config.stash.get(OUTBOUNDS)
        known = registry.names if registry is not None else ("direct",)
        if name not in known:
            raise node.error(f"no outbound named {name!r} (defined: {', '.join(known)})")
        return name

    def read_group_field(self, node: Node) -> frozenset[str]:
        groups = frozenset(g.as_str() for g in node.as_list())
        for group in sorted(groups - self.defined_groups):
            self.lints.append(node.error(
                f"group {group!r} is not in the groups: section (only an authentication plugin can set it)"
            ))  # fmt: skip
        return groups

    # ------------------------------------------------------------------ addresses and names

    def read_addresses(self, node: Node) -> AddressMatcher:
        """``from``: IPs, networks, ``special:NAME`` and list files of networks."""
        networks = NetworkSet()
        includes_self = False
        written: dict[Network, str] = {}
        for item in node.as_list():
            text = _text(item)
            if text.startswith("special:"):
                includes_self |= self._add_special(item, text, networks)
            elif text.startswith("file:"):
                listed = self.read_list(item, text)
                if listed.domains:
                    raise item.error(f"{listed.shown} lists domain names; 'from' takes client addresses")
                networks.update(listed.networks)
            else:
                try:
                    network = parse_network(text)
                except EntryError as exc:
                    raise item.error(f"{exc}; 'from' takes client IP addresses and networks") from None
                self._add_written(item, network, text, networks, written)
        self._lint_overlaps(node, networks, written)
        return AddressMatcher(networks, includes_self, tuple(_text(i) for i in node.as_list()))

    def read_destinations(self, node: Node) -> Destination:
        """``to``: IPs, networks, names, ``*.suffix``, ``~regex``, ``special:NAME``, ``file:PATH``."""
        networks = NetworkSet()
        includes_self = has_networks = False
        domain_sources: list[DomainSet] = []
        network_sources: list[NetworkSet] = []
        inline = DomainSet()
        patterns: list[Pattern] = []
        written: dict[Network, str] = {}
        for item in node.as_list():
            text = _text(item)
            if text.startswith("special:"):
                includes_self |= self._add_special(item, text, networks)
                has_networks = True
            elif text.startswith("file:"):
                listed = self.read_list(item, text)
                domain_sources.append(listed.domains)
                network_sources.append(listed.networks)
            elif text.startswith(("~", "regex:")):
                patterns.append(_pattern(item, text))
            else:
                try:
                    entry = parse_host_entry(text)
                except EntryError as exc:
                    if looks_like_network(text):
                        raise item.error(str(exc)) from None
                    raise item.error(
                        f"{exc} (expected an IP, network, name, *.suffix, ~regex, special:NAME or file:PATH)"
                    ) from None
                if isinstance(entry, tuple):
                    kind, name = entry
                    (inline.add_suffix if kind == "suffix" else inline.add_exact)(name, text)
                else:
                    self._add_written(item, entry, text, networks, written)
                    has_networks = True
        self._lint_overlaps(node, networks, written)
        if inline:
            domain_sources.append(inline)
        domains = _merged(domain_sources, DomainSet)
        if has_networks or any(network_sources):
            network_sources.append(networks)
            networks = _merged(network_sources, NetworkSet)
        texts = tuple(_text(i) for i in node.as_list())
        return Destination(
            NameMatcher(domains, tuple(patterns)) if domains or patterns else None,
            AddressMatcher(networks, includes_self, texts) if networks or includes_self else None,
            texts,
        )

    def _add_special(self, item: Node, text: str, networks: NetworkSet) -> bool:
        """Add a ``special:NAME`` set; True for ``special:self``, which is checked per session."""
        name = text.removeprefix("special:")
        if name not in SPECIAL_NAMES:
            raise item.error(f"unknown set {text!r} (expected one of: {', '.join(SPECIAL_NAMES)})")
        if name == SELF:
            return True
        for network in special_networks(name):
            networks.add(network, text)
        return False

    def _add_written(
        self, item: Node, network: Network, text: str, networks: NetworkSet, written: dict[Network, str]
    ) -> None:
        network = normalize_network(network)
        if networks.add(network, text) is not None and network in written:
            self.lints.append(item.error(f"{text} is listed twice (first as {written[network]})"))
        written.setdefault(network, item.path.rpartition(".")[2])

    def _lint_overlaps(self, node: Node, networks: NetworkSet, written: dict[Network, str]) -> None:
        explicit = NetworkSet()
        for network in written:
            explicit.add(network, str(network))
        for _, message in overlaps(explicit, written):
            self.lints.append(node.error(message))

    def read_list(self, item: Node, text: str) -> ListFile:
        shown = text.removeprefix("file:")
        path = Node(shown, item.line, item.path, item.file).as_path()
        listed = self._lists.get(path)
        if listed is None:
            try:
                listed = load_list(path, shown)
            except OSError as exc:
                raise item.error(f"cannot read list file {shown!r}: {exc.strerror}") from None
            except EntryError as exc:
                raise item.error(f"{shown}:{exc.line}: {exc}") from None
            self._lists[path] = listed
        if path not in self._linted_lists:
            self._linted_lists.add(path)
            shown_lints = listed.lints[:MAX_LIST_LINTS]  # a big published list can hold thousands
            self.lints.extend(item.error(f"{shown}:{line}: {message}") for line, message in shown_lints)
            if len(listed.lints) > MAX_LIST_LINTS:
                more = len(listed.lints) - MAX_LIST_LINTS
                self.lints.append(item.error(f"{shown}: {more} more duplicate or overlapping entries"))
            if not listed.domains and not listed.networks:
                self.lints.append(item.error(f"{shown} has no entries: this matches nothing"))
        return listed


def parse_commands(node: Node) -> frozenset[Command]:
    """``connect``, ``bind``, ``udp`` (UDP ASSOCIATE and its datagrams)."""
    return frozenset(COMMANDS[item.as_choice(list(COMMANDS))] for item in node.as_list())


def parse_protocols(node: Node) -> frozenset[str]:
    """``socks5``, ``socks4``, ``http``: the front door the client came through."""
    return frozenset(item.as_choice(detect.PROTOCOLS) for item in node.as_list())


def parse_reply(node: Node) -> Reply:
    """A failure reply code by name (``host_unreachable``) or number (1–8)."""
    names = {r.name.lower(): r for r in Reply if r != Reply.SUCCEEDED}
    if isinstance(node.value, int) and not isinstance(node.value, bool):
        if node.value in names.values():
            return Reply(node.value)
        raise node.error(f"{node.value} is not a failure reply code (1-8)")
    key = node.as_str().lower().replace("-", "_")
    if key not in names:
        raise node.error(f"{node.value!r} is not a reply code (expected 1-8 or one of: {', '.join(names)})")
    return names[key]


def parse_ports(node: Node) -> PortSet:
    """Ports and ranges: ``[80, 443, 1024-65535]``."""
    ranges = []
    for item in node.as_list():
        if isinstance(item.value, int) and not isinstance(item.value, bool):
            ranges.append((item.as_int(0, 65535),) * 2)
            continue
        low, sep, high = _text(item).partition("-")
        if not (sep and low.strip().isdigit() and high.strip().isdigit()):
            raise item.error(f"{item.value!r} is not a port or a range like 1024-65535")
        first, last = int(low), int(high)
        if not 0 <= first <= last <= 65535:
            raise item.error(f"{item.value!r}: a range goes from a lower to a higher port, 0 to 65535")
        ranges.append((first, last))
    return PortSet(tuple(ranges))


def _text(node: Node) -> str:
    if isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return str(node.value)
    return node.as_str()


def _pattern(node: Node, text: str) -> Pattern:
    source = text[1:] if text.startswith("~") else text.removeprefix("regex:")
    try:
        return Pattern(re.compile(source), text)
    except re.error as exc:
        raise node.error(f"{text!r} is not a valid regular expression: {exc}") from None


def _merged(sources: list[Any], make: Callable[[], Any]) -> Any:
    """One set for a field: the only source as it is (no copy of a large list), else a union."""
    sources = [s for s in sources if s]
    if len(sources) == 1:
        return sources[0]
    merged = make()
    for source in sources:
        merged.update(source)
    return merged
