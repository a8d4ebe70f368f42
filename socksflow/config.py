"""Configuration files: YAML with positions, validated node by node, every error located.

pyyaml's defaults hide mistakes (duplicate keys silently overwrite, ``no`` is ``False``,
``0080`` is octal, ``8:30`` is 510).  Here the file is composed into nodes that keep their
line, duplicate keys and YAML 1.1 surprises are errors, and validators raise
:class:`~socksflow.errors.ConfigError` as ``rules.yaml:14: rules[3].to: message``.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import re
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from socksflow import detect
from socksflow.errors import ConfigError, ConfigErrors
from socksflow.protocol import Address, IPAddress, parse_ip, parse_network
from socksflow.proxy_protocol import Version
from socksflow.stash import Stash
from socksflow.units import parse_duration, parse_rate, parse_size

if TYPE_CHECKING:
    from socksflow.plugins import HookCaller

T = TypeVar("T")

_BOOL_WORDS = {"true": True, "false": False}
_DECIMAL_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_DECIMAL_FLOAT = re.compile(r"[-+]?([0-9]+\.[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")


class Node:
    """A value from the file with its position.  Mappings hold Nodes, lists hold Nodes."""

    __slots__ = ("file", "line", "path", "value")

    def __init__(self, value: Any, line: int, path: str, file: str) -> None:
        self.value = value
        self.line = line
        self.path = path
        self.file = file

    def __repr__(self) -> str:
        return f"<Node {self.file}:{self.line} {self.path}={self.plain()!r}>"

    # ------------------------------------------------------------------ errors and location

    def error(self, message: str) -> ConfigError:
        return ConfigError(message, self.file, self.line, self.path)

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}"

    # ------------------------------------------------------------------ structure

    @property
    def is_map(self) -> bool:
        return isinstance(self.value, dict)

    @property
    def is_list(self) -> bool:
        return isinstance(self.value, list)

    def plain(self) -> Any:
        """The value as plain Python data (positions dropped)."""
        if isinstance(self.value, dict):
            return {k: v.plain() for k, v in self.value.items()}
        if isinstance(self.value, list):
            return [v.plain() for v in self.value]
        return self.value

    def as_map(self, allowed: set[str] | frozenset[str] | None = None) -> dict[str, Node]:
        """The mapping's items; with ``allowed``, any other key is an error.

        While a configuration is read (:meth:`ErrorCollector.collecting`), an unknown key is
        recorded and the known items are returned, so the errors in their values are reported
        too (a typo must not hide a bad value beside it); otherwise the first one is raised.
        """
        if not isinstance(self.value, dict):
            raise self.error(f"expected a mapping, got {_describe(self.value)}")
        if allowed is None:
            return self.value
        unknown = [
            child.error(f"unknown key (expected one of: {', '.join(sorted(allowed))})")
            for key, child in self.value.items()
            if key not in allowed
        ]
        if not unknown:
            return self.value
        collector = _COLLECTING.get()
        if collector is None:
            raise unknown[0]
        for error in unknown:
            collector.add(error)
        return {key: child for key, child in self.value.items() if key in allowed}

    def get(self, key: str) -> Node | None:
        return self.as_map().get(key)

    def as_list(self, *, scalar_ok: bool = True) -> list[Node]:
        """The list's items; a single scalar counts as a one-item list when ``scalar_ok``."""
        if isinstance(self.value, list):
            return self.value
        if scalar_ok and not isinstance(self.value, dict) and self.value is not None:
            return [self]
        raise self.error(f"expected a list, got {_describe(self.value)}")

    # ------------------------------------------------------------------ scalars

    def as_str(self) -> str:
        if not isinstance(self.value, str):
            raise self.error(f"expected text, got {_describe(self.value)}")
        return self.value

    def as_bool(self) -> bool:
        if not isinstance(self.value, bool):
            raise self.error(f"expected true or false, got {_describe(self.value)}")
        return self.value

    def as_int(self, minimum: int | None = None, maximum: int | None = None) -> int:
        if not isinstance(self.value, int) or isinstance(self.value, bool):
            raise self.error(f"expected a whole number, got {_describe(self.value)}")
        if minimum is not None and self.value < minimum:
            raise self.error(f"{self.value} is below the minimum {minimum}")
        if maximum is not None and self.value > maximum:
            raise self.error(f"{self.value} is above the maximum {maximum}")
        return self.value

    def as_choice(self, choices: tuple[str, ...] | list[str]) -> str:
        text = self.as_str() if isinstance(self.value, str) else str(self.value)
        if text not in choices:
            raise self.error(f"{text!r} is not one of: {', '.join(choices)}")
        return text

    def convert(self, parser: Callable[[Any], T]) -> T:
        """Apply ``parser``; its ValueError becomes a located error."""
        if isinstance(self.value, dict | list) or self.value is None:
            raise self.error(f"expected a single value, got {_describe(self.value)}")
        try:
            return parser(self.value)
        except ValueError as exc:
            raise self.error(str(exc)) from None

    def as_duration(self) -> float:
        return self.convert(parse_duration)

    def as_size(self) -> int:
        return self.convert(parse_size)

    def as_rate(self) -> float:
        return self.convert(parse_rate)

    def as_address(self) -> Address:
        return self.convert(lambda v: Address.parse(str(v)))

    def as_path(self) -> Path:
        """A file path; relative paths are relative to the configuration file's folder."""
        try:
            path = Path(self.as_str()).expanduser()
        except RuntimeError:  # "~name" of no such user
            raise self.error(f"{self.value!r}: no such user's home folder") from None
        if not path.is_absolute():
            path = Path(self.file).parent / path
        return path


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    return repr(value)


# ---------------------------------------------------------------------------- loading


class _Composer(yaml.SafeLoader):
    """Composes nodes only; construction is ours (see :func:`_build`)."""


def _build(
    node: yaml.Node,
    path: str,
    file: str,
    errors: list[ConfigError],
    parents: frozenset[int] = frozenset(),
    key_line: int = 0,
) -> Node:
    # A mapping's value is located at its key: errors about ``auth`` point at ``auth:``, not at
    # the first line of the block below it.
    line = key_line or node.start_mark.line + 1
    if isinstance(node, yaml.CollectionNode):
        if id(node) in parents:  # an alias inside its own anchor ("&x [*x]") would never end
            errors.append(ConfigError("recursive alias (the value contains itself)", file, line, path))
            return Node(None, line, path, file)
        parents = parents | {id(node)}
    if isinstance(node, yaml.MappingNode):
        items: dict[str, Node] = {}
        for key_node, value_node in node.value:
            child_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                errors.append(ConfigError("keys must be plain text", file, child_line, path))
                continue
            key = key_node.value
            child_path = f"{path}.{key}" if path else key
            if key in items:
                errors.append(ConfigError(
                    f"duplicate key (first given on line {items[key].line})", file, child_line, child_path,
                ))  # fmt: skip
                continue
            items[key] = _build(value_node, child_path, file, errors, parents, child_line)
        return Node(items, line, path, file)
    if isinstance(node, yaml.SequenceNode):
        return Node(
            [_build(child, f"{path}[{i}]", file, errors, parents) for i, child in enumerate(node.value)],
            line, path, file,
        )  # fmt: skip
    try:
        return Node(_scalar(node), line, path, file)
    except ValueError as exc:
        errors.append(ConfigError(str(exc), file, line, path))
        return Node(node.value, line, path, file)


def _scalar(node: yaml.ScalarNode) -> Any:
    """YAML 1.2-style scalars; values YAML 1.1 would silently reinterpret are errors."""
    text = node.value
    if node.style:  # quoted or block scalars are always text
        return text
    tag = node.tag.rpartition(":")[2]
    if tag == "null":
        return None
    if tag == "bool":
        if text.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[text.lower()]
        raise ValueError(f"{text!r} is read as a boolean by YAML 1.1; write true/false, or quote it")
    if tag == "int":
        if _DECIMAL_INT.fullmatch(text):
            return int(text)
        raise ValueError(f"{text!r} is an ambiguous number in YAML (octal, sexagesimal…); quote it")
    if tag == "float":
        if _DECIMAL_FLOAT.fullmatch(text):
            return float(text)
        if ":" in text:
            raise ValueError(f"{text!r} is read as a sexagesimal number by YAML 1.1; quote it")
        return text  # .inf, .nan: keep as text, validators reject
    return text


def parse_yaml(text: str, file: str) -> tuple[Node, list[ConfigError]]:
    """Compose ``text`` into a Node tree; returns the tree and the errors found."""
    errors: list[ConfigError] = []
    try:
        root = yaml.compose(text, Loader=_Composer)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        problem = exc.problem or str(exc)
        raise ConfigErrors([ConfigError(f"YAML syntax error: {problem}", file, line)]) from None
    except yaml.reader.ReaderError as exc:  # a control character: not a MarkedYAMLError
        line = text.count("\n", 0, exc.position) + 1
        problem = f"character #x{exc.character:04x} is not allowed in YAML"
        raise ConfigErrors([ConfigError(f"YAML syntax error: {problem}", file, line)]) from None
    if root is None:
        return Node({}, 1, "", file), errors
    tree = _build(root, "", file, errors)
    if not tree.is_map:
        errors.append(tree.error("the file must be a mapping of sections"))
        tree = Node({}, 1, "", file)
    return tree, errors


# ---------------------------------------------------------------------------- the config


class ErrorCollector:
    """Accumulates located errors so one run reports them all."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def add(self, error: ConfigError) -> None:
        self.errors.append(error)

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Record a :class:`ConfigError` raised in the block and carry on after it."""
        try:
            yield
        except ConfigError as exc:
            self.errors.append(exc)

    def __bool__(self) -> bool:
        return bool(self.errors)

    @contextlib.contextmanager
    def collecting(self) -> Iterator[None]:
        """Within the block, :meth:`Node.as_map` records unknown keys here rather than raising."""
        token = _COLLECTING.set(self)
        try:
            yield
        finally:
            _COLLECTING.reset(token)


_COLLECTING: contextvars.ContextVar[ErrorCollector | None] = contextvars.ContextVar(
    "socksflow_config_errors", default=None
)


@dataclass(slots=True)
class Timeouts:
    """The core's time limits, in seconds.  ``idle`` 0 means never."""

    handshake: float = 10.0
    connect: float = 10.0
    idle: float = 300.0
    hook: float = 5.0
    shutdown: float = 30.0


@dataclass(slots=True)
class UdpSettings:
    """UDP ASSOCIATE (section ``udp``).

    ``advertise``: the IP put in replies instead of the relay socket's own address (for NAT;
    never a wildcard).  ``idle``: an association in which no datagram moved for this long is
    ended, its control connection closed (0 means never).  ``max_per_client``: associations
    one client IP may hold at once.  ``replies_from``: which remote hosts may send datagrams
    back to the client — ``sent`` (only addresses the client has sent to) or ``any``.
    """

    advertise: IPAddress | None = None
    idle: float = 120.0
    max_per_client: int = 16
    replies_from: str = "sent"


@dataclass(slots=True)
class BindSettings:
    """BIND (section ``bind``).

    ``timeout``: how long to wait for the peer before the second reply 0x06 (TTL expired).
    ``peer_check``: which incoming peers are accepted when the request named one —
    ``strict`` (its IP, and its port when DST.PORT is not 0), ``ip`` (its IP; DST.PORT is
    often the client's control port, as in FTP), ``any``.  A DST.ADDR of 0.0.0.0 or ``::``
    names no peer.  ``advertise``: the IP put in the first reply instead of the listening
    socket's own address (for NAT; never a wildcard).
    """

    timeout: float = 30.0
    peer_check: str = "ip"
    advertise: IPAddress | None = None


@dataclass(slots=True)
class DoorSettings:
    """The front doors other than plain SOCKS5 (section ``doors``).

    ``socks4_userid``: a SOCKS4 USERID names the session's user for ``user:`` rules (it is a
    claim, not a login: off unless the operator trusts the network).  ``http_reason_header``:
    the response header that carries a denial's reason to HTTP clients (``false`` to send
    none).  ``http_via``: the ``Via`` value added to forwarded requests.  ``tor_resolve``:
    answer Tor's SOCKS5 extensions RESOLVE (0xF0) and RESOLVE_PTR (0xF1).
    """

    socks4_userid: bool = False
    http_reason_header: str = "X-Socksflow-Reason"
    http_via: str = "1.1 socksflow"
    tor_resolve: bool = False


@dataclass(frozen=True, slots=True)
class ProxyProtocolSettings:
    """A listener behind a load balancer (``proxy_protocol`` and ``trusted`` of a ``listen`` entry).

    ``versions``: the PROXY protocol versions accepted; ``trusted``: the networks allowed to
    send the header.  Every connection must come from ``trusted`` and open with a header.
    """

    versions: frozenset[Version]
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    def trusts(self, ip: IPAddress) -> bool:
        """Whether a connection from ``ip`` may carry a header."""
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:  # a dual-stack listener
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.trusted)


@dataclass(slots=True)
class StateSettings:
    """Where limit state lives (section ``state``).

    ``redis``: a ``redis://``, ``rediss://`` or ``unix://`` URL; every instance pointing at the
    same Redis enforces one set of limits.  Without it, state is shared by the workers of this
    machine only.  ``on_outage``: while Redis is unreachable, ``local`` (default: enforce this
    instance's own limits, and rejoin when Redis is back) or ``refuse`` (admit no session).
    ``prefix``: the prefix of socksflow's keys in Redis.
    """

    redis: str | None = None
    on_outage: str = "local"
    prefix: str = "socksflow:"


def _redis_url(node: Node) -> str:
    def parse(value: Any) -> str:
        text = str(value)
        if text.partition("://")[0] not in ("redis", "rediss", "unix"):
            raise ValueError(f"{text!r}: give a redis://, rediss:// or unix:// URL")
        return text

    return node.convert(parse)


def _advertised_ip(node: Node) -> IPAddress:
    """An IP address clients can reach: a wildcard is refused."""

    def parse(value: Any) -> IPAddress:
        ip = parse_ip(str(value))
        if ip.is_unspecified:
            raise ValueError(f"{value!r} is a wildcard; give an address clients can reach")
        return ip

    return node.convert(parse)


_SETTING_READERS: dict[str, dict[str, Callable[[Node], Any]]] = {
    "timeouts": {key: Node.as_duration for key in Timeouts.__slots__},
    "udp": {
        "advertise": _advertised_ip,
        "idle": Node.as_duration,
        "max_per_client": lambda node: node.as_int(minimum=1),
        "replies_from": lambda node: node.as_choice(("sent", "any")),
    },
    "doors": {
        "socks4_userid": Node.as_bool,
        "http_reason_header": lambda node: "" if node.value is False else node.as_str(),
        "http_via": Node.as_str,
        "tor_resolve": Node.as_bool,
    },
    "state": {
        "redis": _redis_url,
        "on_outage": lambda node: node.as_choice(("local", "refuse")),
        "prefix": Node.as_str,
    },
    "bind": {
        "timeout": Node.as_duration,
        "peer_check": lambda node: node.as_choice(("strict", "ip", "any")),
        "advertise": _advertised_ip,
    },
}


@dataclass(slots=True)
class PluginSettings:
    paths: list[Path] = field(default_factory=list)
    disable: list[str] = field(default_factory=list)
    autoload: bool = True


DEFAULT_LISTEN = (Address.parse("127.0.0.1:1080"),)


class Config:
    """One loaded configuration: the node tree, the core's settings and plugins' stash."""

    CORE_SECTIONS = frozenset({"listen", "timeouts", "udp", "bind", "doors", "state", "groups", "plugins"})

    def __init__(self, root: Node, file: str, errors: list[ConfigError] | None = None) -> None:
        self.root = root
        self.file = file
        self.errors = ErrorCollector()
        self._disabled_at: dict[str, Node] = {}
        self._path_nodes: dict[
            Path, Node
        ] = {}  # plugins.paths: each path and where it was given  # plugins.disable: each name and where it was given
        self.hooks: HookCaller | None = None  # the plugins' hooks for sessions under this configuration
        self.warnings: list[ConfigError] = []  # lints: the file works, but probably not as meant
        self.checks_run = 0  # socksflow check: tests the plugins' socksflow_check hooks ran
        for error in errors or ():
            self.errors.add(error)
        self.stash = Stash()
        self._claimed: set[str] = set()
        self.listen: tuple[Address, ...] = DEFAULT_LISTEN
        self._listen_in_file = DEFAULT_LISTEN
        self.listen_override: tuple[Address, ...] | None = None  # run --listen: what the file says is ignored
        self.listen_protocols: tuple[frozenset[str], ...] = (detect.SOCKS5_ONLY,)  # one per listen address
        self.listen_proxy: tuple[ProxyProtocolSettings | None, ...] = (None,)  # one per listen address
        self.open_proxy = False  # serve non-loopback listeners even if nothing keeps strangers out
        self.timeouts = Timeouts()
        self.udp = UdpSettings()
        self.bind = BindSettings()
        self.doors = DoorSettings()
        self.state = StateSettings()
        self.plugins = PluginSettings()
        self.group_names: frozenset[str] = frozenset()
        self.user_groups: dict[str, frozenset[str]] = {}
        with self.errors.collecting():
            self._read_core()

    @classmethod
    def from_text(cls, text: str, file: str = "<config>") -> Config:
        root, errors = parse_yaml(text, file)
        return cls(root, file, errors)

    @classmethod
    def from_file(cls, path: str | Path) -> Config:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigErrors([ConfigError(f"cannot read: {exc.strerror}", str(path))]) from None
        return cls.from_text(text, str(path))

    def section(self, name: str) -> Node | None:
        """Claim the top-level section ``name`` and return it (``None`` if absent)."""
        self._claimed.add(name)
        return self.root.value.get(name)

    def check_disabled(self, found: Collection[str], flags: Iterable[str] = ()) -> None:
        """An error for each plugin to disable, here or by ``--disable-plugin``, that is not among ``found``.

        A misspelt name would otherwise leave the plugin it meant running, unnoticed.
        """
        listed = ", ".join(sorted(found)) or "none"
        for name, node in self._disabled_at.items():
            if name not in found:
                self.errors.add(node.error(f"no plugin named {name!r} to disable (found: {listed})"))
        for name in flags:
            if name not in found:
                self.errors.add(ConfigError(f"--disable-plugin: no plugin named {name!r} (found: {listed})"))

    def check_unclaimed(self) -> None:
        """Report sections no plugin and not the core claimed."""
        for name, node in self.root.value.items():
            if name not in self._claimed:
                self.errors.add(ConfigError(
                    "unknown section (no loaded plugin reads it)", self.file, node.line, name,
                ))  # fmt: skip

    def raise_errors(self) -> None:
        if self.errors:
            raise ConfigErrors(self.errors.errors)

    # ------------------------------------------------------------------ core sections

    def _read_core(self) -> None:
        with self.errors.capture():
            node = self.section("listen")
            if node is not None:
                self._read_listen(node)
        for name, readers in _SETTING_READERS.items():
            with self.errors.capture():
                node = self.section(name)
                if node is not None:
                    for key, child in node.as_map(set(readers)).items():
                        with self.errors.capture():
                            setattr(getattr(self, name), key, readers[key](child))
        with self.errors.capture():
            node = self.section("groups")
            if node is not None:
                self._read_groups(node)
        with self.errors.capture():
            node = self.section("plugins")
            if node is not None:
                items = node.as_map({"paths", "disable", "autoload"})
                if "paths" in items:
                    self._path_nodes = {node.as_path(): node for node in items["paths"].as_list()}
                    self.plugins.paths = list(self._path_nodes)
                if "disable" in items:
                    self._disabled_at = {p.as_str(): p for p in items["disable"].as_list()}
                    self.plugins.disable = list(self._disabled_at)
                if "autoload" in items:
                    self.plugins.autoload = items["autoload"].as_bool()

    def existing_plugin_paths(self) -> list[Path]:
        """``plugins.paths`` that exist; each missing one is a located error, and the rest still load."""
        found = []
        for path in self.plugins.paths:
            if path.exists():
                found.append(path)
            elif path in self._path_nodes:
                self.errors.add(self._path_nodes[path].error(f"plugin path {str(path)!r} does not exist"))
            else:
                self.errors.add(ConfigError(f"plugin path {str(path)!r} does not exist", self.file))
        return found

    @property
    def listen_in_file(self) -> tuple[Address, ...]:
        """The listen addresses the file gives (or the default), whatever ``--listen`` or ``:0`` became."""
        return self._listen_in_file

    def override_listen(
        self,
        addresses: tuple[Address, ...],
        protocols: tuple[frozenset[str], ...] | None = None,
        proxy: tuple[ProxyProtocolSettings | None, ...] = (),
    ) -> None:
        """Listen on ``addresses`` instead of the file's (``socksflow run --listen``), reloads included.

        ``proxy``: the PROXY protocol settings of each address (none unless given).
        """
        self.listen = self.listen_override = addresses
        if protocols is not None:
            self.listen_protocols = protocols
        self.listen_proxy = proxy

    def _read_listen(self, node: Node) -> None:
        """``listen: [ADDRESS, ...]``, or ``listen: {addresses: [ADDRESS, ...], open_proxy: true}``."""
        addresses: Node | None = node
        if node.is_map:
            items = node.as_map({"addresses", "open_proxy"})
            if "open_proxy" in items:
                self.open_proxy = items["open_proxy"].as_bool()
            addresses = items.get("addresses")
        if addresses is not None:
            entries = [_listen_entry(item) for item in addresses.as_list()]
            if not entries:
                raise addresses.error("give at least one address to listen on")
            self.listen = self._listen_in_file = tuple(address for address, _, _ in entries)
            self.listen_protocols = tuple(protocols for _, protocols, _ in entries)
            self.listen_proxy = tuple(proxy for _, _, proxy in entries)

    def protocols_at(self, index: int) -> frozenset[str]:
        """The protocols the ``index``-th listen address accepts (SOCKS5 alone unless configured)."""
        return self.listen_protocols[index] if index < len(self.listen_protocols) else detect.SOCKS5_ONLY

    def proxy_protocol_at(self, index: int) -> ProxyProtocolSettings | None:
        """The PROXY protocol settings of the ``index``-th listen address; None: connections are direct."""
        return self.listen_proxy[index] if index < len(self.listen_proxy) else None

    def _read_groups(self, node: Node) -> None:
        """``groups: {admins: [alice, bob]}``: every plugin sees them in ``session.identity.groups``."""
        members: dict[str, set[str]] = {}
        for group, users in node.as_map().items():
            for user in users.as_list():
                members.setdefault(user.as_str(), set()).add(group)
        self.group_names = frozenset(node.as_map())
        self.user_groups = {user: frozenset(groups) for user, groups in members.items()}

    def groups_of(self, user: str, extra: frozenset[str] = frozenset()) -> frozenset[str]:
        """The groups ``user`` is in: those the ``groups`` section gives and ``extra`` (a login's).

        The one place the two merge: the engine (an identity after login) and the rules (a
        query, whatever the session's identity says) both ask here.
        """
        given = self.user_groups.get(user) if user else None
        return given | extra if given else extra


def _listen_entry(node: Node) -> tuple[Address, frozenset[str], ProxyProtocolSettings | None]:
    """``HOST:PORT`` (SOCKS5), or ``{address: HOST:PORT, protocols: [socks5, socks4, http] | mixed,
    proxy_protocol: v1 | v2 | [v1, v2], trusted: [CIDR, ...]}``."""
    if not node.is_map:
        return node.as_address(), detect.SOCKS5_ONLY, None
    items = node.as_map({"address", "protocols", "proxy_protocol", "trusted"})
    if "address" not in items:
        raise node.error("give the address to listen on (address: HOST:PORT)")
    protocols = detect.SOCKS5_ONLY
    if "protocols" in items:
        given = items["protocols"]
        if given.is_list:
            protocols = frozenset(item.as_choice(detect.PROTOCOLS) for item in given.as_list())
            if not protocols:
                raise given.error("give at least one protocol (socks5, socks4, http) or mixed")
        elif given.as_choice((*detect.PROTOCOLS, "mixed")) == "mixed":
            protocols = detect.MIXED
        else:
            protocols = frozenset({given.value})
    return items["address"].as_address(), protocols, _proxy_protocol(node, items)


_PROXY_VERSIONS = {"v1": Version.V1, "v2": Version.V2}


def _proxy_protocol(node: Node, items: dict[str, Node]) -> ProxyProtocolSettings | None:
    """``proxy_protocol`` and ``trusted`` of a listen entry: both, or neither."""
    given = items.get("proxy_protocol")
    trusted = items.get("trusted")
    if given is None:
        if trusted is not None:
            raise trusted.error("trusted applies to a listener with proxy_protocol: v1 | v2 | [v1, v2]")
        return None
    versions = frozenset(_PROXY_VERSIONS[item.as_choice(tuple(_PROXY_VERSIONS))] for item in given.as_list())
    if not versions:
        raise given.error("give v1, v2 or [v1, v2]")
    if trusted is None:
        raise node.error(
            "proxy_protocol needs trusted: [CIDR, ...], the load balancers allowed to send the header"
        )
    networks = tuple(item.convert(lambda v: parse_network(str(v))) for item in trusted.as_list())
    if not networks:
        raise trusted.error("give at least one network (the load balancers' addresses)")
    return ProxyProtocolSettings(versions, networks)


def default_config() -> Config:
    """The configuration used when no file is given: listen on 127.0.0.1:1080, no auth."""
    return Config.from_text("", "<built-in defaults>")
