"""What operators see of the rules at work: hit counts, recent decisions, shadow rules, replay.

All of it is opt-in or an integer increment at decision time:

* :class:`RuleHits` (one per rule set, in ``config.stash``): how many requests each rule
  decided since the configuration was loaded, and how many no rule matched.
* :class:`DecisionLog` (in ``server.stash``, only once :func:`record_decisions` asked for it):
  the inputs of the last N decisions — client, user, command, destination and the DNS answers
  used, never a payload — so a new rule set can be tried on them before it is applied.
* shadow rules: when ``server.shadow`` holds a second configuration (``socksflow run
  --shadow``), each request is decided by it too; disagreements are logged and counted in its
  :class:`ShadowStats`, and nothing else changes.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from socksflow import IPAddress, ResolveError, Session, StashKey

from .evaluate import Decision, NeedAnswers, Query, decide, evaluate
from .rules import COMMAND_NAMES, RuleSet

log = logging.getLogger("socksflow.acl.shadow")

MAX_DISAGREEMENTS = 200  # kept for the admin API; all are counted and logged


class RuleHits:
    """Decisions per rule (by its index) since the rule set was loaded; ``unmatched``: none matched."""

    __slots__ = ("counts", "since", "unmatched")

    def __init__(self, rules: int) -> None:
        self.counts = [0] * rules
        self.unmatched = 0
        self.since = time.time()

    def count(self, decision: Decision) -> None:
        if decision.rule is None:
            self.unmatched += 1
        else:
            self.counts[decision.rule.index] += 1


HITS = StashKey[RuleHits]("acl.hits")


@dataclass(frozen=True, slots=True)
class Decided:
    """The inputs of one decision: enough to decide it again under other rules."""

    query: Query
    identity_groups: frozenset[str]  # the login's groups, before the rules' groups: section
    answers: tuple[IPAddress, ...] | None  # what the destination name resolved to, if it was


class DecisionLog:
    """The inputs of the last ``size`` decisions, oldest first (tuples of :class:`Decided`'s fields:
    a tuple costs a fraction of a frozen dataclass, on every decision)."""

    def __init__(self, size: int) -> None:
        self.entries: collections.deque[tuple[Any, ...]] = collections.deque(maxlen=size)

    def decided(self) -> list[Decided]:
        return [Decided(*entry) for entry in self.entries]


DECISIONS = StashKey[DecisionLog]("acl.decisions")


class ShadowStats:
    """How often the shadow rules were asked, disagreed, or could not decide without DNS."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.compared = 0
        self.disagreed = 0
        self.undecided = 0  # the shadow rules needed a name resolved that the rules in force did not
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_DISAGREEMENTS)
        self.since = time.time()

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file, "since": self.since, "compared": self.compared,
            "disagreed": self.disagreed, "undecided": self.undecided, "recent": list(self.recent),
        }  # fmt: skip


SHADOW = StashKey[ShadowStats]("acl.shadow")


# session: Any, as it reads session.server.shadow, beyond socksflow.Server.
def observe(session: Any, ruleset: RuleSet, query: Query, decision: Decision) -> None:
    """Count the decision, remember its inputs when asked to, and compare it with the shadow rules."""
    hits = session.config.stash.get(HITS)
    if hits is not None:
        hits.count(decision)
    server = session.server
    decisions = server.stash.get(DECISIONS)
    answers = session.resolved(query.destination.host) if isinstance(query.destination.host, str) else None
    if decisions is not None:
        decisions.entries.append((query, session.identity.groups, answers))
    shadow = server.shadow
    if shadow is not None:
        _compare(session, shadow, ruleset, query, decision, answers)


def _compare(session: Session, shadow: Any, ruleset: RuleSet, query: Query, decision: Decision,
             answers: tuple[IPAddress, ...] | None) -> None:  # fmt: skip
    from . import RULES  # the shadow configuration's rules, read by this plugin's configure

    rules = shadow.stash.get(RULES)
    stats = shadow.stash.get(SHADOW)
    if rules is None or stats is None:
        return
    other = evaluate(rules, requery(query, session.identity.groups, ruleset, rules), answers)
    stats.compared += 1
    if isinstance(other, NeedAnswers):
        stats.undecided += 1
        return
    if other.allowed == decision.allowed:
        return
    stats.disagreed += 1
    entry = describe(query) | {
        "time": time.time(), "session": session.id,
        "in_force": decision.outcome, "shadow": other.outcome,
    }  # fmt: skip
    stats.recent.append(entry)
    log.warning(
        "shadow: session %s %s %s -> %s: in force: %s; shadow: %s",
        session.id, entry["client"], entry["command"], entry["destination"], decision.outcome, other.outcome,
    )  # fmt: skip


def requery(query: Query, identity_groups: frozenset[str], old: RuleSet, new: RuleSet) -> Query:
    """``query`` as ``new`` would see it: its groups: section and listen addresses."""
    local = (query.local - old.local) | new.local
    return replace(query, groups=new.groups_of(query.user, identity_groups), local=local)


def describe(query: Query) -> dict[str, Any]:
    """The JSON fields of a decision's inputs."""
    return {
        "client": str(query.client),
        "user": query.user or None,
        "command": COMMAND_NAMES[query.command],
        "destination": str(query.destination),
    }


def hit_table(ruleset: RuleSet, hits: RuleHits) -> dict[str, Any]:
    """Every rule with its hit count, those never hit included, in file order."""
    return {
        "since": hits.since,
        "rules": [
            {
                "rule": rule.location,
                "action": rule.action,
                "reason": rule.reason,
                "hits": hits.counts[rule.index],
            }
            for rule in ruleset.rules
        ],
        "unmatched": hits.unmatched,
    }


async def replay(entries: list[Decided], old: RuleSet, new: RuleSet, resolve: Any) -> dict[str, Any]:
    """Decide ``entries`` again under ``old`` and ``new``; the ones whose verdict flips.

    A name no recorded decision resolved is resolved now, once, if either rule set needs its
    addresses (``await resolve(host, port)``).
    """
    looked_up: dict[str, Any] = {}

    def answers_for(entry: Decided) -> Any:
        async def answers() -> tuple[IPAddress, ...]:
            if entry.answers is not None:
                return entry.answers
            destination = entry.query.destination
            if destination.host not in looked_up:
                try:
                    looked_up[destination.host] = tuple(await resolve(destination.host, destination.port))
                except Exception as exc:  # decided below as the rules decide an unresolvable name
                    looked_up[destination.host] = (
                        exc if isinstance(exc, ResolveError) else ResolveError(str(exc))
                    )
            found = looked_up[destination.host]
            if isinstance(found, Exception):
                raise found
            return found

        return answers

    flips = []
    for entry in entries:
        before = await decide(old, entry.query, answers_for(entry))
        after = await decide(new, requery(entry.query, entry.identity_groups, old, new), answers_for(entry))
        if before.allowed != after.allowed:
            flips.append(describe(entry.query) | {"before": before.outcome, "after": after.outcome})
    return {"replayed": len(entries), "flipped": len(flips), "flips": flips}
