"""Deciding for live sessions: the query a session's request or datagram makes, and verdicts kept.

Requests: a rule set keeps the verdicts it reached without DNS (``RuleSet.decided``), keyed
by everything a rule can look at — client, destination, port, command, front door, user,
the login's groups, the listen address — as ints and strings (an ``ipaddress`` object hashes
in Python, a tuple of ints in C).  The rules read nothing else: no clock, no counter, and
group membership is the configuration's.  A reload reads a new rule set, which starts with
none; a decision that needed the destination's addresses is never kept (the name is resolved
for the session anyway, and its answers may change); rule hits are still counted per
request; the opt-in decision log and shadow rules see every query, so with either on
nothing is kept.

UDP datagrams: remembered per association and destination.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from socksflow import OUTBOUNDS, Address, Command, Registry, Request, Session, StashKey, Verdict

from .evaluate import Decision, Query, Resolve, decide, evaluate
from .matchers import normalize
from .observe import DECISIONS, HITS, observe
from .routes import carried
from .rules import RuleSet

DATAGRAM_VERDICTS = StashKey[dict[Address, Verdict]]("acl.datagram_verdicts")
MAX_REMEMBERED_DESTINATIONS = 4096  # per UDP association; a client spraying destinations starts over
MAX_DECIDED = 65536  # requests kept per rule set; beyond, it starts over


def session_query(ruleset: RuleSet, session: Session, destination: Address, command: Command,
                  association: bool = False) -> Query:  # fmt: skip
    """The query ``session`` makes for ``destination``: its client, identity and local address."""
    identity = session.identity
    return Query(
        session.client.host,
        destination,
        command,
        identity.user,
        ruleset.groups_of(identity.user, identity.groups),
        ruleset.local | {normalize(session.local.host)},
        association,
        session.protocol or "socks5",
    )


def decide_request(ruleset: RuleSet, session: Session, request: Request) -> Verdict | Awaitable[Verdict]:
    """The verdict on a CONNECT, BIND or UDP ASSOCIATE request.

    Returns a coroutine only when a rule needs the destination's addresses, which it resolves once.
    """
    server: Any = session.server  # server.shadow: beyond socksflow.Server
    key = None
    if server.shadow is None and server.stash.get(DECISIONS) is None:
        key = _request_key(session, request)
        kept = ruleset.decided.get(key)
        if kept is not None:
            decision, verdict = kept
            hits = session.config.stash.get(HITS)
            if hits is not None:
                hits.count(decision)
            return verdict  # type: ignore[no-any-return]
    association = request.command == Command.UDP_ASSOCIATE
    query = session_query(ruleset, session, request.destination, request.command, association)
    result = evaluate(ruleset, query)
    outbounds = session.config.stash.get(OUTBOUNDS)
    if isinstance(result, Decision):
        observe(session, ruleset, query, result)
        verdict = carried(result.verdict(), request.command, outbounds)
        if key is not None:
            if len(ruleset.decided) >= MAX_DECIDED:
                ruleset.decided.clear()
            ruleset.decided[key] = (result, verdict)
        return verdict
    return _routed(
        _resolve_and_decide(ruleset, session, query, session.resolve, None), request.command, outbounds
    )


def _request_key(session: Session, request: Request) -> tuple[Any, ...]:
    """Everything :func:`session_query` takes from ``session`` and ``request``, as ints and strings
    (an IP address as its class and number: IPv4 and IPv6 numbers overlap)."""
    identity = session.identity
    client, local = session.client.host, session.local.host
    destination = request.destination
    host = destination.host
    return (
        client.__class__,
        int(client),
        host if isinstance(host, str) else (host.__class__, int(host)),
        destination.port,
        request.command,
        session.protocol,
        identity.user,
        frozenset(identity.groups),  # the same object when it is one already, as it should be
        local.__class__,
        int(local),
    )


async def _routed(verdict: Awaitable[Verdict], command: Command, outbounds: Registry | None) -> Verdict:
    return carried(await verdict, command, outbounds)


def decide_datagram(ruleset: RuleSet, session: Session, destination: Address) -> Verdict | Awaitable[Verdict]:
    """The verdict on a datagram to ``destination``: remembered per association and destination.

    Returns a coroutine only when a name must be resolved first.
    """
    verdicts = session.stash.get(DATAGRAM_VERDICTS)
    if verdicts is None:
        verdicts = session.stash[DATAGRAM_VERDICTS] = {}
    verdict = verdicts.get(destination)
    if verdict is not None:
        return verdict
    query = session_query(ruleset, session, destination, Command.UDP_ASSOCIATE)
    result = evaluate(ruleset, query)
    if isinstance(result, Decision):
        observe(session, ruleset, query, result)
        return _remember(verdicts, destination, result)
    resolve = lambda: session.resolve(destination.host, destination.port)  # noqa: E731
    return _resolve_and_decide(ruleset, session, query, resolve, verdicts)


async def _resolve_and_decide(ruleset: RuleSet, session: Session, query: Query, resolve: Resolve,
                              verdicts: dict[Address, Verdict] | None) -> Verdict:  # fmt: skip
    decision = await decide(ruleset, query, resolve)
    observe(session, ruleset, query, decision)
    if verdicts is None:
        return decision.verdict()
    return _remember(verdicts, query.destination, decision)


def _remember(verdicts: dict[Address, Verdict], destination: Address, decision: Decision) -> Verdict:
    if len(verdicts) >= MAX_REMEMBERED_DESTINATIONS:
        verdicts.clear()
    verdict = verdicts[destination] = decision.verdict()
    return verdict
