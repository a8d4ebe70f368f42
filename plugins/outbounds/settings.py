"""The ``outbounds:`` section: one entry per name, each with exactly one kind key.

Every kind is registered with :func:`socksflow.register_outbound_kind`; this module registers
the standard ones.  References (chain hops, group members) are checked once all entries are
read: a name that is not defined, a loop, an empty group are located errors.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

from socksflow import (
    Address,
    BuildContext,
    Config,
    ConfigError,
    Direct,
    Node,
    Outbound,
    Registry,
    Reject,
    Reply,
    clients,
    outbound_kinds,
    register_outbound_kind,
)

from .groups import Chain, Group, Health
from .upstreams import HttpUpstream, Socks4Upstream, Socks5Upstream, SshUpstream

GROUP_KINDS = ("fallback", "balance", "fastest")
COMMON = {"dns"}  # dns: remote (names go to the upstream, the default) or local


class _Context:
    def __init__(self) -> None:
        self.built: dict[str, Outbound] = {"direct": Direct()}

    def lookup(self, name: str) -> Outbound:
        return self.built[name]


def read_outbounds(config: Config) -> Registry | None:
    """The configuration's outbounds, or ``None`` without an ``outbounds:`` section."""
    node = config.section("outbounds")
    if node is None:
        return None
    context = _Context()
    nodes: dict[str, Node] = {}
    for name, item in node.as_map().items():
        nodes[name] = item
        with config.errors.capture():
            context.built[name] = Reject(name, Reply.GENERAL_FAILURE)  # stands in if the entry is wrong
            context.built[name] = build(name, item, context)
    for name, item in nodes.items():
        with config.errors.capture():
            check_references(name, item, context.built)
    return Registry(context.built)


def build(name: str, item: Node, context: BuildContext) -> Outbound:
    if name == "direct":
        raise item.error("'direct' is built in: pick another name")
    if not item.is_map:
        raise item.error(f"expected a mapping with one of: {', '.join(outbound_kinds())}")
    fields = item.as_map()
    found = [key for key in fields if key in outbound_kinds()]
    if len(found) != 1:
        raise item.error(f"an outbound needs exactly one kind: {', '.join(outbound_kinds())}")
    kind = found[0]
    rest = {key: value for key, value in fields.items() if key != kind}
    return outbound_kinds()[kind](name, fields[kind], rest, context)


def check_references(name: str, item: Node, built: dict[str, Outbound]) -> None:
    """Every hop defined, no loop through ``name``."""
    kind_node = next((child for key, child in item.as_map().items() if key in outbound_kinds()), item)
    for hop in built[name].hops():
        if hop not in built:
            raise kind_node.error(f"no outbound named {hop!r} (defined: {', '.join(sorted(built))})")
    path = _loop(name, built, [name])
    if path:
        raise kind_node.error("outbounds loop: " + " → ".join(path))


def _loop(name: str, built: dict[str, Outbound], path: list[str]) -> list[str]:
    outbound = built.get(name)
    for hop in outbound.hops() if outbound is not None else ():
        if hop == path[0]:
            return [*path, hop]
        if hop in path:
            continue  # a loop that does not pass through the entry being checked: reported there
        found = _loop(hop, built, [*path, hop])
        if found:
            return found
    return []


# --------------------------------------------------------------------------- fields


def _fields(kind_node: Node, fields: dict[str, Node], allowed: set[str]) -> None:
    for key, node in fields.items():
        if key not in allowed | COMMON:
            raise node.error(f"unknown key {key!r} for a {kind_node.path.rsplit('.', 1)[-1]} outbound"
                             f" (expected: {', '.join(sorted(allowed | COMMON))})")  # fmt: skip


def _remote_dns(fields: dict[str, Node]) -> bool:
    return fields["dns"].as_choice(("remote", "local")) == "remote" if "dns" in fields else True


def _secret(fields: dict[str, Node], key: str) -> str | None:
    """``password: TEXT`` or ``password_file: PATH`` (first line)."""
    if key in fields and f"{key}_file" in fields:
        raise fields[key].error(f"give {key!r} or '{key}_file', not both")
    if key in fields:
        return fields[key].as_str()
    if f"{key}_file" in fields:
        node = fields[f"{key}_file"]
        path = node.as_path()
        try:
            return next(iter(path.read_text().splitlines()), "")
        except OSError as exc:
            raise node.error(f"cannot read {path}: {exc.strerror}") from None
    return None


def _server(node: Node) -> Address:
    return node.as_address()


def _socks5(name: str, node: Node, fields: dict[str, Node], context: BuildContext) -> Outbound:
    _fields(node, fields, {"username", "password", "password_file"})
    username = fields["username"].as_str() if "username" in fields else None
    password = _secret(fields, "password")
    if (username is None) != (password is None):
        raise node.error("give both 'username' and a password, or neither")
    return Socks5Upstream(
        name,
        _server(node),
        username.encode() if username is not None else None,
        password.encode() if password is not None else None,
        _remote_dns(fields),
    )


def _socks4(name: str, node: Node, fields: dict[str, Node], context: BuildContext) -> Outbound:
    _fields(node, fields, {"user_id"})
    user_id = fields["user_id"].as_str().encode() if "user_id" in fields else b""
    return Socks4Upstream(name, _server(node), user_id, _remote_dns(fields))


def _http(name: str, node: Node, fields: dict[str, Node], context: BuildContext) -> Outbound:
    """``http: host:port`` or ``http://user:pass@host:port`` / ``https://…`` (TLS to the proxy)."""
    _fields(node, fields, {"username", "password", "password_file", "ca", "server_name"})
    text = node.as_str()
    url = urlsplit(text if "://" in text else f"http://{text}")
    if url.scheme not in ("http", "https") or not url.hostname or not url.port:
        raise node.error("expected HOST:PORT, http://[USER:PASS@]HOST:PORT or https://…")
    try:
        server = Address.parse(
            f"[{url.hostname}]:{url.port}" if ":" in url.hostname else f"{url.hostname}:{url.port}"
        )
    except ValueError as exc:
        raise node.error(str(exc)) from None
    username = fields["username"].as_str() if "username" in fields else unquote(url.username or "") or None
    password = _secret(fields, "password")
    if password is None and url.password is not None:
        password = unquote(url.password)
    authorization = clients.basic_authorization(username, password or "") if username is not None else None
    tls = None
    if url.scheme == "https":
        tls = ssl.create_default_context(cafile=str(fields["ca"].as_path()) if "ca" in fields else None)
    hostname = fields["server_name"].as_str() if "server_name" in fields else None
    return HttpUpstream(name, server, authorization, tls, hostname, _remote_dns(fields))


def _ssh(name: str, node: Node, fields: dict[str, Node], context: BuildContext) -> Outbound:
    _fields(node, fields, {"user", "key", "known_hosts"})
    try:
        import asyncssh  # noqa: F401
    except ImportError:
        raise node.error("ssh outbounds need asyncssh: pip install 'socksflow[ssh]'") from None
    for required in ("user", "key", "known_hosts"):
        if required not in fields:
            raise node.error(f"an ssh outbound needs '{required}:' (known_hosts: none turns host checks off)")
    keys = [str(key.as_path()) for key in fields["key"].as_list()]
    for key, path in zip(fields["key"].as_list(), keys, strict=True):
        try:
            open(path, "rb").close()
        except OSError as exc:
            raise key.error(f"cannot read {path}: {exc.strerror}") from None
    known = fields["known_hosts"]
    known_hosts = None if known.value == "none" else str(known.as_path())
    return SshUpstream(name, _server(node), fields["user"].as_str(), keys, known_hosts, _remote_dns(fields))


def _reject(name: str, node: Node, fields: dict[str, Node], context: BuildContext) -> Outbound:
    _fields(node, fields, set())
    if node.value is True:
        return Reject(name)
    names = {reply.name.lower(): reply for reply in Reply if reply != Reply.SUCCEEDED}
    if isinstance(node.value, int) and node.value in Reply._value2member_map_ and node.value:
        return Reject(name, Reply(node.value))
    return Reject(name, names[node.as_choice(tuple(names))])


def _chain(name: str, node: Node, fields: dict[str, Node], context: BuildContext) -> Outbound:
    _fields(node, fields, set())
    names = tuple(hop.as_str() for hop in node.as_list())
    if not names:
        raise node.error("a chain needs at least one hop")
    return Chain(name, names, context.lookup)


def _group(kind: str) -> Callable[[str, Node, dict[str, Node], BuildContext], Outbound]:
    def make(name: str, node: Node, fields: dict[str, Node], context: BuildContext) -> Outbound:
        allowed = (
            {"health"}
            | ({"hash"} if kind == "balance" else set())
            | ({"tolerance"} if kind == "fastest" else set())
        )
        _fields(node, fields, allowed)
        names = tuple(member.as_str() for member in node.as_list())
        if not names:
            raise node.error(f"a {kind} group needs at least one member")
        health = _health(fields["health"]) if "health" in fields else Health()
        hash_on = ""
        if "hash" in fields:
            hash_on = fields["hash"].as_choice(("none", "destination", "user"))
            hash_on = "" if hash_on == "none" else hash_on
        tolerance = fields["tolerance"].as_duration() if "tolerance" in fields else 0.05
        return Group(name, kind, names, context.lookup, health, hash_on, tolerance)

    return make


def _health(node: Node) -> Health:
    items = node.as_map({"interval", "timeout", "failures", "target"})
    return Health(
        interval=items["interval"].as_duration() if "interval" in items else 10.0,
        timeout=items["timeout"].as_duration() if "timeout" in items else 3.0,
        failures=items["failures"].as_int(minimum=1) if "failures" in items else 1,
        target=items["target"].as_address() if "target" in items else None,
    )


def register_standard_kinds() -> None:
    for kind, factory in {
        "socks5": _socks5,
        "socks4": _socks4,
        "http": _http,
        "ssh": _ssh,
        "reject": _reject,
        "chain": _chain,
        **{kind: _group(kind) for kind in GROUP_KINDS},
    }.items():
        register_outbound_kind(kind, factory)


__all__ = ["ConfigError", "read_outbounds", "register_standard_kinds"]
