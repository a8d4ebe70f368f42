"""UDP associations per client IP (``udp.max_per_client``): counted from the request to the session's end,
in the server's shared limit table (so for every worker together)."""

from __future__ import annotations

import logging
import time

from socksflow import Session, StashKey, Verdict

log = logging.getLogger("socksflow.limits")

HOLDS = StashKey[str]("limits.udp_association")  # per session: the client IP it counts against


async def admit(session: Session, state) -> Verdict | None:
    """Count a UDP ASSOCIATE request in, or refuse it (REP 0x02) when its client holds the maximum."""
    if HOLDS in session.stash:  # asked again (a rewrite's judges): counted already
        return None
    client_ip = str(session.client.host)
    cap = session.config.udp.max_per_client
    if not await state.acquire("udp", client_ip, cap, time.monotonic()):
        reason = f"limit reached: {client_ip} already holds {cap} UDP associations (udp.max_per_client)"
        log.info("session %s from %s refused: %s", session.id, session.client, reason)
        return Verdict.deny(reason, rule="udp.max_per_client")
    session.stash[HOLDS] = client_ip
    return None


def release(session: Session, state) -> None:
    """Give the session's association back (``socksflow_session_end``)."""
    client_ip = session.stash.get(HOLDS)
    if client_ip is None:
        return
    del session.stash[HOLDS]
    state.release("udp", client_ip)
