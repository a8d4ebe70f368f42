"""UDP associations per client IP (``udp.max_per_client``): counted from the request to the session's end."""

from __future__ import annotations

import collections
import logging

from socksflow import StashKey, Verdict

log = logging.getLogger("socksflow.limits")

ASSOCIATIONS = StashKey[collections.Counter[str]]("limits.udp_associations")  # per client IP, server-wide
HOLDS = StashKey[str]("limits.udp_association")  # per session: the client IP it counts against


def admit(session) -> Verdict | None:
    """Count a UDP ASSOCIATE request in, or refuse it (REP 0x02) when its client holds the maximum."""
    if HOLDS in session.stash:  # asked again (a rewrite's judges): counted already
        return None
    counts = session.server.stash.setdefault(ASSOCIATIONS, collections.Counter())
    client_ip = str(session.client.host)
    held = counts[client_ip]
    if held >= session.config.udp.max_per_client:
        reason = f"limit reached: {client_ip} already holds {held} UDP associations (udp.max_per_client)"
        log.info("session %s from %s refused: %s", session.id, session.client, reason)
        return Verdict.deny(reason, rule="udp.max_per_client")
    counts[client_ip] = held + 1
    session.stash[HOLDS] = client_ip
    return None


def release(session) -> None:
    """Give the session's association back (``socksflow_session_end``)."""
    client_ip = session.stash.get(HOLDS)
    if client_ip is None:
        return
    del session.stash[HOLDS]
    counts = session.server.stash[ASSOCIATIONS]
    counts[client_ip] -= 1
    if not counts[client_ip]:
        del counts[client_ip]
