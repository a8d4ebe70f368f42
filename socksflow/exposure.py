"""Secure defaults: no open proxy on an address other hosts can reach unless asked for.

The core knows no policy, so it asks the plugins (``socksflow_exposure``) what keeps unknown
clients out; when none answers, serving a non-loopback address would let anyone relay through
this machine.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from socksflow.config import Config
from socksflow.errors import PluginError
from socksflow.hooks import Hooks
from socksflow.plugins import PluginManager
from socksflow.protocol import Address


@dataclass(frozen=True, slots=True)
class Exposure:
    """Who can reach the listeners and what keeps strangers out.

    ``exposed``: the listen addresses that are not loopback; ``guards``: the plugins' answers
    (one line each); ``refusal``: why the proxy must not start, or ``""``.
    """

    exposed: tuple[Address, ...]
    guards: tuple[str, ...]
    refusal: str = ""


def is_loopback(address: Address) -> bool:
    """Whether only this machine can connect to ``address``."""
    host = address.host
    if isinstance(host, str):
        return host == "localhost"
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        host = host.ipv4_mapped
    return host.is_loopback


def assess(config: Config, pm: PluginManager, allow_open_proxy: bool = False) -> Exposure:
    """What serving ``config`` would expose; ``refusal`` is set when it would be an open proxy."""
    exposed = tuple(a for a in config.listen if not is_loopback(a))
    if not exposed:
        return Exposure(exposed, ())
    try:
        guards = tuple(Hooks(pm, config.timeouts.hook).exposure(config))
    except PluginError as exc:  # fail closed: a plugin that cannot tell protects nothing
        return Exposure(exposed, (), f"socksflow: cannot tell who may use the proxy: {exc}")
    if guards or allow_open_proxy or config.open_proxy:
        return Exposure(exposed, guards)
    where = ", ".join(str(a) for a in exposed)
    return Exposure(exposed, (), (
        f"socksflow: refusing to serve {where} as an open proxy: other hosts can reach it, no login "
        "is required and no rule limits which clients may connect, so anyone who reaches it could "
        "relay through this machine.  Require a login (auth: {methods: [userpass], users: FILE}), "
        "allow only your clients' networks in rules (allow: {from: [192.168.0.0/16]}), listen on "
        "127.0.0.1, or, on a trusted network, pass --allow-open-proxy "
        "(or set listen: {addresses: [...], open_proxy: true})."
    ))  # fmt: skip
