"""``socksflow explain``: the evaluator's trace, the DNS answers used, the verdict and the reply."""

from __future__ import annotations

from socksflow import (
    Command,
    ExplainQuery,
    IPAddress,
    Registry,
    Reply,
    Resolver,
    detect,
    http_status_for,
    socks4_reply_code,
)

from . import tracer
from .evaluate import Query, Step, decide
from .rules import COMMAND_NAMES, RuleSet


async def explain(
    ruleset: RuleSet, request: ExplainQuery, resolve: Resolver, outbounds: Registry | None = None
) -> list[str]:
    """Lines explaining how ``request`` is decided (each rule tried, DNS, verdict, outbound, reply code)."""
    user = request.user or ""
    query = Query(
        request.client.host,  # type: ignore[arg-type]
        request.destination,
        request.command,
        user,
        ruleset.groups_of(user),
        ruleset.local,
        protocol=request.protocol,
    )
    destination = request.destination
    udp = request.command == Command.UDP_ASSOCIATE
    who = f"{request.client.host}" + (f" (user {user})" if user else "")
    who += f" over {request.protocol}" if request.protocol != "socks5" else ""
    what = f"a UDP datagram to {destination}" if udp else f"{COMMAND_NAMES[request.command]} {destination}"
    lines = [f"{ruleset.file}: {what} from {who}"]

    async def answers() -> tuple[IPAddress, ...]:
        return await resolve(destination.host, destination.port)  # type: ignore[arg-type]

    steps: list[Step] = []
    decision = await decide(ruleset, query, answers, steps)
    lines.extend(f"  {line}" for line in tracer.lines(query, steps))
    reason = f" ({decision.reason})" if decision.rule is not None and decision.reason else ""
    lines.append(f"verdict: {decision.outcome}{reason}")
    if decision.addresses is not None:
        lines.append(f"addresses used: {', '.join(map(str, decision.addresses))} (only these are dialled)")
    name = decision.verdict().outbound if decision.allowed else None
    if decision.allowed and (outbounds is not None or name is not None):  # a configuration that routes
        outbound = (outbounds or Registry()).get(name)
        lines.append(
            f"outbound: {outbound.name}" + (f" ({outbound.describe()})" if outbound.kind != "direct" else "")
        )
    if udp:
        fate = "it is relayed" if decision.allowed else "it is dropped"
        lines.append(f"reply: none, UDP has no per-datagram reply: {fate}")
    elif decision.allowed:
        lines.append(f"reply: {_code(Reply.SUCCEEDED, request.protocol)} once the connection is made")
    else:
        lines.append(f"reply: {_code(decision.reply, request.protocol)}")
    return lines


def _code(reply: Reply, protocol: str = detect.SOCKS5) -> str:
    """The answer as the client's protocol says it (HTTP: a status; SOCKS4: granted or rejected)."""
    if protocol == detect.HTTP:
        return "200 Connection established" if reply == Reply.SUCCEEDED else f"HTTP {http_status_for(reply)}"
    if protocol == detect.SOCKS4:
        code = socks4_reply_code(reply)
        return f"0x{code:02x} {code.name}"
    return f"0x{reply:02x} {reply.name}"
