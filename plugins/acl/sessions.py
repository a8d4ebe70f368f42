"""Deciding for live sessions: the query a session's request or datagram makes, and UDP verdicts kept."""

from __future__ import annotations

from collections.abc import Awaitable

from socksflow import OUTBOUNDS, Address, Command, Registry, Request, Session, StashKey, Verdict

from .evaluate import Decision, Query, Resolve, decide, evaluate
from .matchers import normalize
from .observe import observe
from .routes import carried
from .rules import RuleSet

DATAGRAM_VERDICTS = StashKey[dict[Address, Verdict]]("acl.datagram_verdicts")
MAX_REMEMBERED_DESTINATIONS = 4096  # per UDP association; a client spraying destinations starts over


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
    association = request.command == Command.UDP_ASSOCIATE
    query = session_query(ruleset, session, request.destination, request.command, association)
    result = evaluate(ruleset, query)
    outbounds = session.config.stash.get(OUTBOUNDS)
    if isinstance(result, Decision):
        observe(session, ruleset, query, result)
        return carried(result.verdict(), request.command, outbounds)
    return _routed(
        _resolve_and_decide(ruleset, session, query, session.resolve, None), request.command, outbounds
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
