"""Routing: the ``outbounds:`` section names ways out, and the rules' ``via:`` picks one.

```yaml
outbounds:
  office: {socks5: 127.0.0.1:1081, username: alice, password_file: office.secret}
  legacy: {socks4: 10.0.0.5:1080}                       # SOCKS4a when the destination is a name
  web:    {http: "https://proxy.example:3128", username: bob, password: s3cret}
  home:   {ssh: 203.0.113.9:22, user: me, key: ~/.ssh/id_ed25519, known_hosts: ~/.ssh/known_hosts}
  far:    {chain: [office, home]}                       # socksflow → office → home → destination
  out:    {fallback: [office, web], health: {interval: 10s, timeout: 3s, failures: 2}}
  spread: {balance: [office, web], hash: destination}   # or user, or none (round robin)
  quick:  {fastest: [office, web], tolerance: 50ms, health: {target: 192.0.2.10:443}}
  nope:   {reject: host_unreachable}
rules:
  - allow: {to: ["*.corp.example"]}
    via: office
  - allow: all                                          # no via: direct
```

Names go to the upstream (remote DNS) unless the outbound says ``dns: local``, or a rule had to
resolve the name to decide: then the first address the rules admitted is sent, so the upstream
cannot connect anywhere the rules did not check.  Groups check their members' health in the background
(a TCP connect to the first hop, or a request through the member to ``health.target``) and a
failed live dial marks a member down at once.  Without an ``outbounds:`` section this plugin
is dormant and every session goes direct.
"""

from __future__ import annotations

from socksflow import (
    OUTBOUNDS,
    ROUTE,
    Address,
    Command,
    Config,
    IPAddress,
    Outbound,
    OutboundError,
    Reply,
    ResolveError,
    Server,
    Session,
    Stream,
    direct_connect,
    hookimpl,
)

from .groups import ROUTE as CHOICES
from .groups import stop_checkers
from .settings import read_outbounds, register_standard_kinds
from .upstreams import SshUpstream

register_standard_kinds()


@hookimpl(tryfirst=True)  # before the rules, which check that each via names an outbound
def socksflow_configure(config: Config) -> bool | None:
    registry = read_outbounds(config)
    if registry is None:
        return False
    config.stash[OUTBOUNDS] = registry
    return None


@hookimpl
def socksflow_open_connection(session: Session, addresses: tuple[Address, ...]):
    verdict = session.verdict
    name = verdict.outbound if verdict is not None else None
    if name is None or name == "direct" or session.request.command != Command.CONNECT:
        return None  # the core dials: going direct costs nothing here
    outbound = session.config.stash[OUTBOUNDS][name]
    return _open(session, name, outbound, addresses)


async def _open(session: Session, name: str, outbound: Outbound, addresses: tuple[Address, ...]) -> Stream:
    destination = session.destination
    if destination.is_domain and addresses:
        destination = addresses[0]  # rules checked the name's addresses: the upstream must not pick others
    elif destination.is_domain and not getattr(outbound, "remote_dns", True):
        destination = Address(await _resolved(session), destination.port)
    choices: list[str] = []
    token = CHOICES.set(choices)
    try:
        return await outbound.open_stream(destination, direct_connect, session.identity.user)
    finally:
        CHOICES.reset(token)
        session.stash[ROUTE] = ",".join([name, *choices])


async def _resolved(session: Session) -> IPAddress:
    """The destination's first address (dns: local: the core leaves resolving to routed sessions)."""
    try:
        ips = await session.resolve()
    except ResolveError as exc:
        raise OutboundError(f"cannot resolve {session.destination.host}: {exc}", exc.reply) from None
    if not ips:
        raise OutboundError(f"{session.destination.host} has no address", Reply.HOST_UNREACHABLE)
    session.addresses = ips
    return ips[0]


@hookimpl
def socksflow_shutdown(server: Server) -> None:
    stop_checkers()
    registry = server.config.stash.get(OUTBOUNDS)
    for name in registry.names if registry is not None else ():
        outbound = registry[name]
        if isinstance(outbound, SshUpstream):
            outbound.close()
