"""The evaluator's steps in words: what ``socksflow explain`` prints for each rule tried and each look-up.

The evaluator records only which rule it tried on which addresses and what matched (see
:mod:`.evaluate`), so deciding a live request costs nothing for explanations; the why (the
field that did not match, the list entry that did) is worked out here, from the same rule and
query.
"""

from __future__ import annotations

from socksflow import IPAddress

from .evaluate import (
    WHOLE,
    EndOfRules,
    NeedAnswers,
    Query,
    Resolved,
    Step,
    Tried,
    Unresolved,
    left_after,
    mismatch,
)
from .rules import COMMAND_NAMES, Rule

_LISTED = 4  # entries of a field shown in an explanation before "…"


def lines(query: Query, steps: list[Step]) -> list[str]:
    """One line per step (a rule that did not match, matched, or left addresses undecided; DNS)."""
    out: list[str] = []
    for step in steps:
        if isinstance(step, Tried):
            line = _tried(step, query)
            if line is not None:
                out.append(line)
            if isinstance(step.matched, list) and (left := left_after(step.remaining, step.matched)):
                out.append(f"  still to decide: {_joined(left)}")
        elif isinstance(step, EndOfRules):
            out.append(f"end of rules: no rule matched {_joined(step.remaining or [query.destination.host])}")
        elif isinstance(step, Resolved):
            out.append(f"DNS: {step.host} -> {_joined(step.answers)} ({step.needed_by})")
        elif isinstance(step, Unresolved):
            out.append(f"DNS: {step.failure} ({step.needed_by}); address entries match nothing")
    return out


def _tried(step: Tried, query: Query) -> str | None:
    """Why ``step.rule`` matched what it did (None: it stopped for the name's addresses)."""
    rule, remaining = step.rule, step.remaining
    if isinstance(step.matched, NeedAnswers):
        return None
    field = mismatch(rule, query)
    if field is not None:
        return f"{rule.title}: no match: {_why_not(field, rule, query)}"
    destinations = rule.destinations
    if query.association and (destinations is not None or rule.ports is not None):
        if not rule.allow:
            return f"{rule.title}: passed over: to/port apply to datagrams, not the association"
        return f"{rule.title}: matches{_matched_fields(rule, query)}"
    if destinations is None:
        return f"{rule.title}: matches{_matched_fields(rule, query)}"
    host = query.destination.host
    if isinstance(host, str) and destinations.names is not None:
        label = destinations.names.match(host)
        if label is not None:
            return f"{rule.title}: matches {host} in {label}"
    if step.matched is None:
        answers = remaining if isinstance(host, str) and destinations.addresses is not None else None
        return f"{rule.title}: no match: {_why_not('to', rule, query, answers)}"
    assert destinations.addresses is not None and remaining is not None
    matched = remaining if step.matched is WHOLE else step.matched
    hits = ", ".join(f"{ip} in {destinations.addresses.match(ip, query.local)}" for ip in matched)
    verb = "matches" if not isinstance(host, str) else "admits" if rule.allow else "removes"
    return f"{rule.title}: {verb} {hits}"


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


def _joined(addresses: object) -> str:
    return ", ".join(map(str, addresses))  # type: ignore[call-overload]
