"""The one rule evaluator, used by live requests, UDP datagrams, rule tests and ``socksflow explain``.

Rules are tried top to bottom and the first match decides; nothing matched means deny.  A
domain destination is decided as if each address it resolves to had been asked for on its
own, except that name entries (``example.com``, ``*.example.com``, ``~regex``) match the name
itself and so every address:

* a rule whose matching ``to`` entry is a name matches the whole request;
* a rule whose ``to`` needs addresses makes the destination resolve (once) and matches the
  addresses it covers: a **deny** removes them and, when none is left, denies the request;
  an **allow** admits them and the rules go on for the others;
* the connection goes only to the admitted addresses (``Verdict.allow(addresses=...)``), so
  what was checked is what is dialled: no DNS-rebinding hole.

A domain is resolved only when a rule reached in order needs addresses, so a name denied by a
name rule never leaks to DNS.

For a UDP ASSOCIATE request the address sent is the client's own, not a destination: rules
with ``to`` or ``port`` are about its datagrams (each checked by the datagram hook), so such
a **deny** rule is passed over for the association and such an **allow** rule admits it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from socksflow import Address, Command, IPAddress, PluginError, Reply, ResolveError, Verdict, resolve_error

from .rules import COMMAND_NAMES, Rule, RuleSet

Resolve = Callable[[], Awaitable[tuple[IPAddress, ...]]]
Trace = list[str] | None
_LISTED = 4  # entries of a field shown in an explanation before "…"


@dataclass(frozen=True, slots=True)
class Query:
    """A request as the rules see it: who asks, for what, through which of our addresses."""

    client: IPAddress
    destination: Address
    command: Command = Command.CONNECT
    user: str = ""
    groups: frozenset[str] = frozenset()
    local: frozenset[IPAddress] = frozenset()  # the proxy's own addresses: special:self
    association: bool = False  # a UDP ASSOCIATE request, whose address is the client's
    protocol: str = "socks5"  # the front door the client came through


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome: the deciding rule (``None``: none matched), and the admitted addresses."""

    allowed: bool
    rule: Rule | None
    addresses: tuple[IPAddress, ...] | None = None
    reply: Reply = Reply.NOT_ALLOWED
    reason: str = ""

    @property
    def outcome(self) -> str:
        """``allow by rules.yaml:14``, or ``deny: <why no rule decided>``."""
        action = "allow" if self.allowed else "deny"
        if self.rule is None:
            return f"{action}: {self.reason}"
        via = f" via {self.rule.via}" if self.allowed and self.rule.via else ""
        return f"{action} by {self.rule.location}{via}"

    def verdict(self) -> Verdict:
        rule = self.rule.location if self.rule is not None else ""
        if self.allowed:
            via = self.rule.via if self.rule is not None else None
            return Verdict.allow(self.reason, rule=rule, addresses=self.addresses, outbound=via)
        return Verdict.deny(self.reason, reply=self.reply, rule=rule)


@dataclass(frozen=True, slots=True)
class NeedAnswers:
    """Evaluation stopped at ``rule``: it needs the addresses the destination name resolves to."""

    rule: Rule


NO_RULE_MATCHED = "no rule matched (default: deny)"
_WHOLE = "whole request"  # a rule matched every (remaining) address, or the name itself


def evaluate(ruleset: RuleSet, query: Query, answers: tuple[IPAddress, ...] | None = None,
             trace: Trace = None) -> Decision | NeedAnswers:  # fmt: skip
    """Decide ``query``, given the destination's ``answers`` when known; lines go to ``trace``."""
    host = query.destination.host
    is_name = isinstance(host, str)
    # The addresses still undecided; None while a name is not resolved (it stands for all of them).
    remaining: list[IPAddress] | None = [host] if not is_name else None  # type: ignore[list-item]
    if is_name and answers is not None:
        remaining = list(answers)
    admitted: list[IPAddress] = []
    first_allow: Rule | None = None
    last_deny: Rule | None = None
    for rule in ruleset.rules:
        matched = _match(rule, query, remaining, trace)
        if matched is None:
            continue
        if isinstance(matched, NeedAnswers):
            return matched
        if rule.allow:
            first_allow = first_allow or rule
            admitted.extend((remaining or ()) if matched is _WHOLE else matched)
        else:
            last_deny = rule
        if matched is _WHOLE:
            remaining = []
            break
        remaining = [ip for ip in remaining or () if ip not in matched]
        if not remaining:
            break
        if trace is not None:
            trace.append(f"  still to decide: {', '.join(map(str, remaining))}")
    else:
        if trace is not None:
            trace.append(f"end of rules: no rule matched {', '.join(map(str, remaining or [host]))}")
    if first_allow is not None:
        addresses = None
        if is_name and answers is not None:
            kept = set(admitted)
            addresses = tuple(ip for ip in answers if ip in kept)
        return Decision(True, first_allow, addresses, Reply.SUCCEEDED, first_allow.reason)
    if last_deny is not None and not remaining:
        return Decision(False, last_deny, None, last_deny.reply, last_deny.reason)
    return Decision(False, None, None, Reply.NOT_ALLOWED, NO_RULE_MATCHED)


def _match(rule: Rule, query: Query, remaining: list[IPAddress] | None,
           trace: Trace) -> str | list[IPAddress] | NeedAnswers | None:  # fmt: skip
    """``_WHOLE``, the addresses of ``remaining`` the rule matches, NeedAnswers, or None (no match)."""
    field = _mismatch(rule, query)
    if field is not None:
        if trace is not None:
            trace.append(f"{rule.title}: no match: {_why_not(field, rule, query)}")
        return None
    destinations = rule.destinations
    if query.association and (destinations is not None or rule.ports is not None):
        if not rule.allow:
            if trace is not None:
                trace.append(f"{rule.title}: passed over: to/port apply to datagrams, not the association")
            return None
        if trace is not None:
            trace.append(f"{rule.title}: matches{_matched_fields(rule, query)}")
        return _WHOLE
    if destinations is None:
        if trace is not None:
            trace.append(f"{rule.title}: matches{_matched_fields(rule, query)}")
        return _WHOLE
    host = query.destination.host
    if isinstance(host, str) and destinations.names is not None:
        label = destinations.names.match(host)
        if label is not None:
            if trace is not None:
                trace.append(f"{rule.title}: matches {host} in {label}")
            return _WHOLE
    if destinations.addresses is None:
        if trace is not None:
            trace.append(f"{rule.title}: no match: {_why_not('to', rule, query)}")
        return None
    if remaining is None:
        return NeedAnswers(rule)
    labels = [(ip, destinations.addresses.match(ip, query.local)) for ip in remaining]
    matched = [ip for ip, label in labels if label is not None]
    if not matched:
        if trace is not None:
            answers = remaining if isinstance(host, str) else None
            trace.append(f"{rule.title}: no match: {_why_not('to', rule, query, answers)}")
        return None
    if trace is not None:
        hits = ", ".join(f"{ip} in {label}" for ip, label in labels if label is not None)
        verb = "matches" if not isinstance(host, str) else "admits" if rule.allow else "removes"
        trace.append(f"{rule.title}: {verb} {hits}")
    return _WHOLE if len(matched) == len(remaining) else matched


async def decide(ruleset: RuleSet, query: Query, resolve: Resolve, trace: Trace = None) -> Decision:
    """:func:`evaluate`, resolving the destination once if a rule needs its addresses.

    When the name does not resolve, address entries match nothing: a name rule may still deny
    the request (with its own reply); otherwise it is denied as unreachable.
    """
    start = len(trace) if trace is not None else 0
    result = evaluate(ruleset, query, None, trace)
    if isinstance(result, Decision):
        return result
    if trace is not None:
        del trace[start:]  # evaluated again below, with the answers
    host = query.destination.host
    needed_by = f"needed by {result.rule.location}"
    try:
        answers = tuple(await resolve())
    except (ResolveError, PluginError) as exc:
        answer = resolve_error(exc)  # a resolver plugin's own answer: NXDOMAIN, SERVFAIL…
        reply = answer.reply if answer is not None else Reply.HOST_UNREACHABLE
        why = answer if answer is not None else exc
        return _unresolved(ruleset, query, trace, f"cannot resolve {host}: {why}", reply, needed_by)
    if not answers:
        return _unresolved(ruleset, query, trace, f"{host} has no address", Reply.HOST_UNREACHABLE, needed_by)
    if trace is not None:
        trace.append(f"DNS: {host} -> {', '.join(map(str, answers))} ({needed_by})")
    decision = evaluate(ruleset, query, answers, trace)
    assert isinstance(decision, Decision)
    return decision


def _unresolved(ruleset: RuleSet, query: Query, trace: Trace, failure: str, reply: Reply,
                needed_by: str) -> Decision:  # fmt: skip
    if trace is not None:
        trace.append(f"DNS: {failure} ({needed_by}); address entries match nothing")
    decision = evaluate(ruleset, query, (), trace)
    assert isinstance(decision, Decision)
    if decision.rule is not None and not decision.allowed:
        return decision
    return Decision(False, None, None, reply, failure)


# ---------------------------------------------------------------------------- request fields


def _mismatch(rule: Rule, query: Query) -> str | None:
    """The first field (other than ``to``) that does not match, or None."""
    if rule.commands is not None and query.command not in rule.commands:
        return "command"
    if rule.protocols is not None and query.protocol not in rule.protocols:
        return "protocol"
    if rule.clients is not None and rule.clients.match(query.client, query.local) is None:
        return "from"
    if rule.users is not None and query.user not in rule.users:
        return "user"
    if rule.groups is not None and rule.groups.isdisjoint(query.groups):
        return "group"
    if rule.ports is not None and not query.association and query.destination.port not in rule.ports:
        return "port"
    return None


def _why_not(field: str, rule: Rule, query: Query, answers: list[IPAddress] | None = None) -> str:
    if field == "command":
        commands = _listed(sorted(COMMAND_NAMES[c] for c in rule.commands))
        return f"command {COMMAND_NAMES[query.command]} is not {commands}"
    if field == "protocol":
        return f"protocol {query.protocol} is not {_listed(sorted(rule.protocols))}"
    if field == "from":
        return f"client {query.client} is not in {_listed(rule.clients.texts)}"
    if field == "user":
        return f"user {query.user or '(none: no login)'} is not {_listed(sorted(rule.users))}"
    if field == "group":
        return f"user {query.user or '(none: no login)'} is in none of {_listed(sorted(rule.groups))}"
    if field == "port":
        return f"port {query.destination.port} is not in {rule.ports}"
    listed = _listed(rule.destinations.texts)
    if answers == []:
        return f"{query.destination.host} has no address to match against {listed}"
    if answers is not None:
        return f"none of {', '.join(map(str, answers))} is in {listed}"
    return f"{query.destination.host} is not in {listed}"


def _matched_fields(rule: Rule, query: Query) -> str:
    parts = []
    if rule.commands is not None:
        parts.append(f"command {COMMAND_NAMES[query.command]}")
    if rule.protocols is not None:
        parts.append(f"protocol {query.protocol}")
    if rule.clients is not None:
        parts.append(f"client {query.client} in {rule.clients.match(query.client, query.local)}")
    if rule.users is not None:
        parts.append(f"user {query.user}")
    if rule.groups is not None:
        parts.append(f"group {', '.join(sorted(rule.groups & query.groups))}")
    if rule.ports is not None and not query.association:
        parts.append(f"port {query.destination.port}")
    if query.association and (rule.destinations is not None or rule.ports is not None):
        parts.append("the association (its to/port apply to each datagram)")
    return ": " + ", ".join(parts) if parts else " everything"


def _listed(items: object) -> str:
    items = list(items)  # type: ignore[call-overload]
    shown = ", ".join(map(str, items[:_LISTED]))
    return f"[{shown}{', …' if len(items) > _LISTED else ''}]"
