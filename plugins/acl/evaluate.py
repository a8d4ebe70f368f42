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

from .rules import Rule, RuleSet

Resolve = Callable[[], Awaitable[tuple[IPAddress, ...]]]


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
WHOLE = "whole request"  # a rule matched every (remaining) address, or the name itself
Match = str | list[IPAddress] | NeedAnswers | None  # what trying a rule gives: see _match


# ---------------------------------------------------------------------------- steps
# What the evaluator did, recorded only when asked (``steps``), for a tracer (explain) to word.


@dataclass(frozen=True, slots=True)
class Tried:
    """``rule`` was tried with ``remaining`` still undecided (None: the name, unresolved)."""

    rule: Rule
    remaining: list[IPAddress] | None
    matched: Match


@dataclass(frozen=True, slots=True)
class EndOfRules:
    """No rule decided ``remaining`` (None: the destination itself)."""

    remaining: list[IPAddress] | None


@dataclass(frozen=True, slots=True)
class Resolved:
    """The destination name resolved to ``answers``, because the rule ``needed_by`` names needed them."""

    host: str
    answers: tuple[IPAddress, ...]
    needed_by: str


@dataclass(frozen=True, slots=True)
class Unresolved:
    """The destination name did not resolve (``failure`` says why): address entries match nothing."""

    failure: str
    needed_by: str


Step = Tried | EndOfRules | Resolved | Unresolved
Steps = list[Step] | None


def evaluate(ruleset: RuleSet, query: Query, answers: tuple[IPAddress, ...] | None = None,
             steps: Steps = None) -> Decision | NeedAnswers:  # fmt: skip
    """Decide ``query``, given the destination's ``answers`` when known; what it did goes to ``steps``."""
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
        matched = _match(rule, query, remaining)
        if steps is not None:
            steps.append(Tried(rule, remaining, matched))
        if matched is None:
            continue
        if isinstance(matched, NeedAnswers):
            return matched
        if rule.allow:
            first_allow = first_allow or rule
            admitted.extend((remaining or ()) if matched is WHOLE else matched)
        else:
            last_deny = rule
        if matched is WHOLE:
            remaining = []
            break
        remaining = left_after(remaining, matched)
        if not remaining:
            break
    else:
        if steps is not None:
            steps.append(EndOfRules(remaining))
    if first_allow is not None:
        addresses = None
        if is_name and answers is not None:
            kept = set(admitted)
            addresses = tuple(ip for ip in answers if ip in kept)
        return Decision(True, first_allow, addresses, Reply.SUCCEEDED, first_allow.reason)
    if last_deny is not None and not remaining:
        return Decision(False, last_deny, None, last_deny.reply, last_deny.reason)
    return Decision(False, None, None, Reply.NOT_ALLOWED, NO_RULE_MATCHED)


def _match(rule: Rule, query: Query, remaining: list[IPAddress] | None) -> Match:
    """``WHOLE``, the addresses of ``remaining`` the rule matches, NeedAnswers, or None (no match)."""
    if mismatch(rule, query) is not None:
        return None
    destinations = rule.destinations
    if query.association and (destinations is not None or rule.ports is not None):
        return WHOLE if rule.allow else None  # a deny is passed over: to/port apply to datagrams
    if destinations is None:
        return WHOLE
    host = query.destination.host
    if (
        isinstance(host, str)
        and destinations.names is not None
        and destinations.names.match(host) is not None
    ):
        return WHOLE
    if destinations.addresses is None:
        return None
    if remaining is None:
        return NeedAnswers(rule)
    matched = [ip for ip in remaining if destinations.addresses.match(ip, query.local) is not None]
    if not matched:
        return None
    return WHOLE if len(matched) == len(remaining) else matched


def left_after(remaining: list[IPAddress] | None, matched: list[IPAddress]) -> list[IPAddress]:
    """The addresses of ``remaining`` a rule that matched ``matched`` of them leaves undecided."""
    return [ip for ip in remaining or () if ip not in matched]


async def decide(ruleset: RuleSet, query: Query, resolve: Resolve, steps: Steps = None) -> Decision:
    """:func:`evaluate`, resolving the destination once if a rule needs its addresses.

    When the name does not resolve, address entries match nothing: a name rule may still deny
    the request (with its own reply); otherwise it is denied as unreachable.
    """
    start = len(steps) if steps is not None else 0
    result = evaluate(ruleset, query, None, steps)
    if isinstance(result, Decision):
        return result
    if steps is not None:
        del steps[start:]  # evaluated again below, with the answers
    host = query.destination.host
    needed_by = f"needed by {result.rule.location}"
    try:
        answers = tuple(await resolve())
    except (ResolveError, PluginError) as exc:
        answer = resolve_error(exc)  # a resolver plugin's own answer: NXDOMAIN, SERVFAIL…
        reply = answer.reply if answer is not None else Reply.HOST_UNREACHABLE
        why = answer if answer is not None else exc
        return _unresolved(ruleset, query, steps, f"cannot resolve {host}: {why}", reply, needed_by)
    if not answers:
        return _unresolved(ruleset, query, steps, f"{host} has no address", Reply.HOST_UNREACHABLE, needed_by)
    if steps is not None:
        steps.append(Resolved(str(host), answers, needed_by))
    decision = evaluate(ruleset, query, answers, steps)
    assert isinstance(decision, Decision)
    return decision


def _unresolved(ruleset: RuleSet, query: Query, steps: Steps, failure: str, reply: Reply,
                needed_by: str) -> Decision:  # fmt: skip
    if steps is not None:
        steps.append(Unresolved(failure, needed_by))
    decision = evaluate(ruleset, query, (), steps)
    assert isinstance(decision, Decision)
    if decision.rule is not None and not decision.allowed:
        return decision
    return Decision(False, None, None, reply, failure)


# ---------------------------------------------------------------------------- request fields


def mismatch(rule: Rule, query: Query) -> str | None:
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
