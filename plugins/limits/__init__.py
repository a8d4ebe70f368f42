"""Limits: the ``limits`` section — session rates, concurrent sessions, bandwidth, auth throttling.

```yaml
limits:                            # evaluated for every session: EVERY matching entry applies
  - match: {user: alice}           # from: CIDRs, user: names, group: names; all given must match,
    bandwidth: 10MiB/s             #   any item of a list may; no match = every session
  - match: {from: 0.0.0.0/0}
    sessions_per_second: 50        # new sessions: a number, or a rate (100/s, 600/m)
    burst: 100                     # sessions accepted at once before the rate applies (default: the rate)
    max_sessions: 200              # open at the same time
    max_handshakes: 20             # connections still in their handshake (greeting, login, request):
                                   #   a slowloris flood from one address cannot crowd out the rest
    per: address                   # who shares one limit: address | /24 (a network; "/24 /56" for IPv6) |
                                   #   user | session | all.  Default: user if match names users or
                                   #   groups, else address.  Anonymous sessions' "user" is their address.
  - match: {group: guests}
    bandwidth: {up: 1MiB/s, down: 8MiB/s, burst: 1MiB}   # a bare rate applies to each direction
  - auth_failures: {max: 5, within: 1m, block: 15m}    # brute-force defence, per client address
  - auth_failures: {max: 20, within: 10m, block: 1h}
    per: user                      # or per account, whatever address the guesses come from
```

When each limit is checked:

* Entries that need no identity (no ``user``/``group`` in ``match``, ``per`` not ``user``) are
  checked as the connection is accepted: over the limit, it is closed before the greeting, so
  a flood costs no handshake and no password check.
* The others are checked on the request, before the rules decide: over the limit, the client
  gets REP 0x02 (not allowed).  This plugin's decision hooks run ``tryfirst`` so an allowing
  plugin cannot skip them; they only ever deny.
* Bandwidth is a :class:`~socksflow.Limiter` handed to the relay of CONNECT and BIND tunnels,
  which pauses reading for as long as the token buckets ask: memory stays bounded and nothing
  is dropped.  Per-user and wider buckets are shared by every tunnel they cover, and exist while
  one does.  UDP associations get one too: datagrams over the rate wait their turn (up to
  256 KiB per direction), and beyond that are dropped, as UDP may.
* ``group`` matches the groups of ``session.identity`` (as set by the authenticating plugin).
* Failed logins count the moment they happen, whatever the login path (username/password,
  GSSAPI…: the ``socksflow_auth_result`` hook), not when the session ends.  A block is checked
  at accept (per address or network), before the password is checked, and on the login's
  outcome, so a connection opened before the block cannot log in while it lasts.  Per ``user``,
  the account is the user name the client gave.  The block is logged once when it starts; the
  connections it refuses are counted by the metrics plugin (``socksflow_denials_total``
  with ``plugin="limits"``, ``stage`` ``accept`` or ``auth``), not logged one by one.
* UDP associations per client IP are capped by ``udp.max_per_client`` (default 16), with or
  without a ``limits`` section: over it, UDP ASSOCIATE gets REP 0x02 (not allowed).

Counters, buckets, failed logins and blocks live in the server's shared limit table, so they
survive reloads, and with ``socksflow run --workers N`` every worker enforces the same limits
(``max_sessions: 100`` admits 100 in all, a user's bandwidth is shared by its tunnels in every
worker, a block made in one worker holds in the others; a worker that dies gives back what it
held).  Each session remembers what it counted and gives it back in ``socksflow_session_end``,
which the core calls exactly once per accepted connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Coroutine, Hashable
from typing import Any, TypeVar

from socksflow import Command, Config, Session, StashKey, Verdict, hookimpl

from . import associations
from .buckets import Bandwidth, TokenBucket
from .explain import explain
from .settings import Entry, Limits, parse_entry
from .state import Check, LeasedBucket, SharedBucket, State, rate_lease, settled

log = logging.getLogger("socksflow.limits")
T = TypeVar("T")

SETTINGS = StashKey[Limits]("limits")
STATE = StashKey[State]("limits.state")
COUNTED = StashKey[set[Hashable]]("limits.counted")  # per session: the concurrency keys it holds
HANDSHAKING = StashKey[list[Hashable]]("limits.handshaking")  # per session, until its request


# Without a limits section, only the UDP association cap (udp.max_per_client) is left to keep.
UDP_CAP_HOOKS = frozenset({"socksflow_request", "socksflow_session_end"})


@hookimpl
def socksflow_configure(config: Config) -> bool | frozenset[str] | None:
    node = config.section("limits")
    if node is None:
        return UDP_CAP_HOOKS
    entries = []
    for item in node.as_list(scalar_ok=False):
        with config.errors.capture():
            entries.append(parse_entry(item))
    admission = [e for e in entries if e.session_rate or e.max_sessions is not None]
    config.stash[SETTINGS] = Limits(
        at_accept=tuple(e for e in admission if e.at_accept),
        at_request=tuple(e for e in admission if not e.at_accept),
        bandwidth=tuple(e for e in entries if e.up or e.down),
        auth=tuple(e for e in entries if e.auth),
        handshakes=tuple(e for e in entries if e.max_handshakes),
    )


# ---------------------------------------------------------------------------- runtime state


def _answer(session: Session, work: Coroutine[Any, Any, T]) -> T | Coroutine[Any, Any, T]:
    """``work``'s result now when the limit table answers at once (one machine's shared memory
    never waits: the coroutine runs to its end in one step), else ``work`` for the caller to await
    (Redis, when a lease must be asked for)."""
    if not _state(session).answers_at_once:
        return work
    try:
        work.send(None)
    except StopIteration as done:
        return done.value
    work.close()
    raise RuntimeError("the limit table waited although it answers at once")


def _state(session: Session) -> State:
    state = session.server.stash.get(STATE)
    if state is None:
        state = session.server.stash[STATE] = State(session.server.shared_state)
    return state


def _admit(
    session: Session, entries: tuple[Entry, ...], at_accept: bool = False
) -> Verdict | Awaitable[Verdict | None] | None:
    """Check session rates and concurrency; count the session in when every entry lets it in.

    One critical section of the shared table for all of it (an awaitable only with Redis).
    At accept, what to check depends on the client's address alone: planned once per address.
    """
    state = _state(session)
    counted = session.stash.get(COUNTED)
    if counted is None:
        counted = session.stash[COUNTED] = set()
    if at_accept:
        host = session.client.host
        plans = state.plans_under(session.config.stash.get(SETTINGS))
        plan = plans.get((host.__class__, int(host)))
        if plan is None:
            plan = plans[(host.__class__, int(host))] = _plan(session, entries, counted)
    else:
        plan = _plan(session, entries, counted)
    checks, by, wanted, acquires = plan
    if not checks and not wanted:
        return None
    refused = state.admit(checks, acquires, time.monotonic())
    if isinstance(refused, int):
        return _admitted(session, refused, checks, by, wanted, counted)
    return _admitted_later(session, refused, checks, by, wanted, counted)


Plan = tuple[list[Check], list[Entry], dict[Hashable, Entry], list[tuple[Hashable, int]]]


def _plan(session: Session, entries: tuple[Entry, ...], counted: set[Hashable]) -> Plan:
    """What admitting ``session`` takes: the checks in entry order, the entry of each, and the keys
    to count (each with its entry of the lowest ``max_sessions``)."""
    # In entry order: a session counted already must still fit with itself counted, and a rate
    # gives a token.
    checks: list[Check] = []
    by: list[Entry] = []
    wanted: dict[Hashable, Entry] = {}
    for entry in entries:
        if not entry.match.matches(session):
            continue
        key = entry.per.key(session)
        if entry.max_sessions is not None:
            if key in counted:  # counted at accept
                checks.append(("within", ("sessions", key), entry.max_sessions))
                by.append(entry)
            elif key not in wanted or entry.max_sessions < wanted[key].max_sessions:  # type: ignore[operator]
                wanted[key] = entry
        rate = entry.session_rate
        if rate is not None:
            lease = rate_lease(rate.per_second, rate.burst)
            checks.append(("take", ("rate", entry.ident, key), rate.per_second, rate.burst, lease))
            by.append(entry)
    return checks, by, wanted, [(key, entry.max_sessions) for key, entry in wanted.items()]  # type: ignore[misc]


async def _admitted_later(session: Session, refused: Awaitable[int], checks: list[Check], by: list[Entry],
                          wanted: dict[Hashable, Entry], counted: set[Hashable]) -> Verdict | None:  # fmt: skip
    return _admitted(session, await refused, checks, by, wanted, counted)


def _admitted(session: Session, refused: int, checks: list[Check], by: list[Entry],
              wanted: dict[Hashable, Entry], counted: set[Hashable]) -> Verdict | None:  # fmt: skip
    """The outcome of :meth:`State.admit`: the session counted in, or the refusal of the limit that refused."""
    if refused < 0:
        counted.update(wanted)
        return None
    if refused < len(checks) and checks[refused][0] == "take":
        entry = by[refused]
        assert entry.session_rate is not None
        return _refuse(session, entry, entry.describe(f"{entry.session_rate.per_second:g} new sessions/s"))
    entry = by[refused] if refused < len(checks) else list(wanted.values())[refused - len(checks)]
    return _refuse(session, entry, entry.describe(f"{entry.max_sessions} open sessions"))


def _refuse(session: Session, entry: Entry, what: str, level: int = logging.INFO) -> Verdict:
    """A denial (REP 0x02 on a request; before the greeting the connection is just closed)."""
    reason = f"limit reached: {what}"
    log.log(level, "session %s from %s refused: %s", session.id, session.client, reason)
    return Verdict.deny(reason, rule=entry.location)


def _auth_key(entry: Entry, session: Session, user: str | None) -> Hashable:
    """Whose failures an ``auth_failures`` entry counts: the account tried, or the client's address."""
    if entry.per.kind == "user" and user:
        return (entry.ident, ("user", user))
    return (entry.ident, entry.per.key(session))


def _blocked(session: Session, user: str | None, accepting: bool = False) -> Verdict | None:
    """A quiet denial while a block covers the client (or, given ``user``, the account)."""
    limits = session.config.stash.get(SETTINGS)
    if limits is None:
        return None
    state = _state(session)
    now = time.monotonic()
    for entry in limits.auth:
        if (accepting and entry.per.kind == "user") or not entry.match.client_matches(session):
            continue  # an account is known only at login
        until = state.blocked_until(_auth_key(entry, session, user), now)
        if until:
            assert entry.auth is not None
            what = f"{entry.auth.failures} failed logins, blocked for {until - now:.0f}s more"
            return _refuse(session, entry, entry.describe(what), logging.DEBUG)  # logged when it began
    return None


# ---------------------------------------------------------------------------- hooks


@hookimpl(tryfirst=True)
def socksflow_client_connected(session: Session) -> Verdict | Awaitable[Verdict | None] | None:
    limits = session.config.stash.get(SETTINGS)
    if limits is None:
        return None
    if limits.auth or limits.handshakes:
        return _answer(session, _on_accept(session, limits))
    return (
        _admit(session, limits.at_accept, True) if limits.at_accept else None
    )  # the common case: no coroutine


async def _on_accept(session: Session, limits: Limits) -> Verdict | None:
    if limits.auth:
        refusal = _blocked(session, None, accepting=True)
        if refusal is not None:
            return refusal
    if limits.handshakes:
        refusal = await _start_handshake(session, limits.handshakes)
        if refusal is not None:
            return refusal
    return await settled(_admit(session, limits.at_accept, True)) if limits.at_accept else None


async def _start_handshake(session: Session, entries: tuple[Entry, ...]) -> Verdict | None:
    """Count the connection among its address's handshakes in progress, or refuse it (quietly:
    a flood's refusals are counted by the metrics, not logged one by one)."""
    state = _state(session)
    now = time.monotonic()
    keys: list[Hashable] = []
    for entry in entries:
        if entry.match.client_matches(session):
            key = (entry.ident, entry.per.key(session))
            if not await state.acquire("handshakes", key, entry.max_handshakes, now):  # type: ignore[arg-type]
                _end_handshake(state, keys)
                return _refuse(
                    session, entry, entry.describe(f"{entry.max_handshakes} handshakes"), logging.DEBUG
                )
            keys.append(key)
    if keys:
        session.stash[HANDSHAKING] = keys
    return None


def _taken(session: Session, key: StashKey[list[Hashable]]) -> list[Hashable]:
    value = session.stash[key]
    del session.stash[key]
    return value


def _end_handshake(state: State, keys: list[Hashable]) -> None:
    for key in keys:
        state.release("handshakes", key)


@hookimpl(tryfirst=True)
def socksflow_authenticate(session: Session, username: bytes) -> Verdict | None:
    """Refuse a blocked client or account before its password costs a bcrypt check."""
    limits = session.config.stash.get(SETTINGS)
    if limits is None or not limits.auth:
        return None
    return _blocked(session, username.decode("utf-8", "backslashreplace"))


@hookimpl
def socksflow_auth_result(
    session: Session, user: str | None, accepted: bool
) -> Verdict | Awaitable[None] | None:
    """Count a failure now; refuse any login, even a right one, while a block is in force."""
    limits = session.config.stash.get(SETTINGS)
    if limits is None or not limits.auth:
        return None
    refusal = _blocked(session, user)
    if refusal is not None or accepted:
        return refusal  # failures while blocked are not counted again: the block runs its course
    return _answer(session, _record_auth_failure(session, limits.auth, user))


@hookimpl(tryfirst=True)
def socksflow_request(session: Session) -> Verdict | Awaitable[Verdict | None] | None:
    if session.stash.get(HANDSHAKING) is not None:  # get: one C call, `in`: a Python method
        _end_handshake(_state(session), _taken(session, HANDSHAKING))
    udp = session.request.command is Command.UDP_ASSOCIATE
    limits = session.config.stash.get(SETTINGS)
    if not udp and (limits is None or not limits.at_request):
        return None
    return _answer(session, _on_request(session, udp, limits))


async def _on_request(session: Session, udp: bool, limits: Limits | None) -> Verdict | None:
    if udp and (refusal := await associations.admit(session, _state(session))):
        return refusal
    if limits is None or not limits.at_request:
        return None
    return await settled(_admit(session, limits.at_request))


@hookimpl
def socksflow_relay_start(session: Session) -> Bandwidth | None:
    limits = session.config.stash.get(SETTINGS)
    if limits is None or not limits.bandwidth:
        return None
    # A tunnel's buckets depend on its client's address and identity: the same Bandwidth for
    # every tunnel of one client, unless it has buckets of its own (per: session).
    state = _state(session)
    plans = state.plans_under(limits)
    host, identity = session.client.host, session.identity
    key = ("bandwidth", host.__class__, int(host), identity.user, frozenset(identity.groups))
    bandwidth = plans.get(key, _NONE)
    if bandwidth is not _NONE:
        return bandwidth  # type: ignore[no-any-return]
    up: list[TokenBucket | LeasedBucket | SharedBucket] = []
    down: list[TokenBucket | LeasedBucket | SharedBucket] = []
    own = False
    for entry in limits.bandwidth:
        if not entry.match.matches(session):
            continue
        own |= entry.per.kind == "session"
        scope = None if entry.per.kind == "session" else entry.per.key(session)
        for way, rate, found in (("up", entry.up, up), ("down", entry.down, down)):
            if rate is None:
                continue
            if scope is None:
                found.append(TokenBucket(rate.per_second, rate.burst, time.monotonic()))
            else:
                found.append(state.bucket(("bytes", entry.ident, way, scope), rate.per_second, rate.burst))
    bandwidth = Bandwidth(up, down) if up or down else None
    if not own:
        plans[key] = bandwidth
    return bandwidth


_NONE = object()  # no plan yet


@hookimpl
def socksflow_explain(config: Config, query) -> list[str] | None:
    limits = config.stash.get(SETTINGS)
    return None if limits is None else explain(limits, query, config)


@hookimpl
def socksflow_session_end(session: Session) -> None:
    state = session.server.stash.get(STATE)
    if state is None:
        return  # nothing was ever counted
    associations.release(session, state)
    if session.stash.get(HANDSHAKING) is not None:  # get: one C call, `in`: a Python method
        _end_handshake(state, _taken(session, HANDSHAKING))
    counted = session.stash.get(COUNTED)
    if counted:
        for key in counted:
            state.release("sessions", key)
        counted.clear()


async def _record_auth_failure(session: Session, entries: tuple[Entry, ...], user: str | None) -> None:
    state = _state(session)
    for entry in entries:
        if not entry.match.client_matches(session):
            continue
        assert entry.auth is not None
        if await state.fail(_auth_key(entry, session, user), entry.auth):
            who = f"user {user!r}" if entry.per.kind == "user" and user else str(session.client.host)
            log.warning(
                "%s: %d failed logins within %gs: refusing it for %gs (%s)",
                who, entry.auth.failures, entry.auth.within, entry.auth.block, entry.location,
            )  # fmt: skip
