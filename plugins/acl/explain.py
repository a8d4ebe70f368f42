"""``socksflow explain``: the evaluator's trace, the DNS answers used, the verdict and the reply."""

from __future__ import annotations

from socksflow import Command, ExplainQuery, IPAddress, Reply, Resolver

from .evaluate import Query, decide
from .rules import COMMAND_NAMES, RuleSet


async def explain(ruleset: RuleSet, request: ExplainQuery, resolve: Resolver) -> list[str]:
    """Lines explaining how ``request`` is decided (each rule tried, DNS, verdict, reply code)."""
    user = request.user or ""
    query = Query(
        request.client.host,  # type: ignore[arg-type]
        request.destination,
        request.command,
        user,
        ruleset.groups_of(user),
        ruleset.local,
    )
    destination = request.destination
    udp = request.command == Command.UDP_ASSOCIATE
    who = f"{request.client.host}" + (f" (user {user})" if user else "")
    what = f"a UDP datagram to {destination}" if udp else f"{COMMAND_NAMES[request.command]} {destination}"
    lines = [f"{ruleset.file}: {what} from {who}"]

    async def answers() -> tuple[IPAddress, ...]:
        return await resolve(destination.host, destination.port)  # type: ignore[arg-type]

    trace: list[str] = []
    decision = await decide(ruleset, query, answers, trace)
    lines.extend(f"  {line}" for line in trace)
    reason = f" ({decision.reason})" if decision.rule is not None and decision.reason else ""
    lines.append(f"verdict: {decision.outcome}{reason}")
    if decision.addresses is not None:
        lines.append(f"addresses used: {', '.join(map(str, decision.addresses))} (only these are dialled)")
    if udp:
        fate = "it is relayed" if decision.allowed else "it is dropped"
        lines.append(f"reply: none, UDP has no per-datagram reply: {fate}")
    elif decision.allowed:
        lines.append(f"reply: {_code(Reply.SUCCEEDED)} once the connection is made")
    else:
        lines.append(f"reply: {_code(decision.reply)}")
    return lines


def _code(reply: Reply) -> str:
    return f"0x{reply:02x} {reply.name}"
