"""Sessions and configuration as JSON: rows, filters, and secrets masked."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

from socksflow import Command, Session

FILTERS = ("client", "user", "destination", "rule", "command", "state")
SECRET_KEY = re.compile(r"pass|secret|token|key|credential", re.IGNORECASE)
URL_PASSWORD = re.compile(r"(?<=://)([^/@:\s]*):[^/@\s]*@")  # socks5://user:password@host
MASK = "***"
CLOSED_BY_ADMIN = "closed by admin"


def state(session: Any) -> str:  # Any: reads session.tunnel and .association, beyond socksflow.Session
    """Where the session is: handshake, deciding/connecting, relay, udp, bind (waiting for the peer)."""
    if session.tunnel is not None:
        return "relay"
    if session.association is not None:
        return "udp"
    request = session.request
    if request is None:
        return "handshake"
    if request.command == Command.BIND and session.bound is not None:
        return "bind"
    return "connecting"


def row(session: Session, now: float, rates: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
    """One live session as the API shows it."""
    request, verdict = session.request, session.verdict
    rate = rates.get(session.id, (0.0, 0.0))
    return {
        "id": session.id,
        "protocol": "socks5",
        "state": state(session),
        "client": str(session.client),
        "user": session.identity.user or None,
        "command": request.command.name.lower() if request else None,
        "destination": str(request.destination) if request else None,
        "address": str(session.remote) if session.remote else None,
        "rule": (verdict.rule or None) if verdict else None,
        "decided_by": session.decided_by or None,
        "outbound": None,  # routing (outbounds) does not exist yet
        "bound": str(session.bound) if session.bound else None,
        "bytes_up": session.bytes_up,
        "bytes_down": session.bytes_down,
        "rate_up": rate[0],
        "rate_down": rate[1],
        "started": session.started,
        "age": now - session.started,
    }


def matches(item: Mapping[str, Any], filters: Mapping[str, str]) -> bool:
    """Every filter is a substring of its field (``state`` and ``command``: equal)."""
    for name, wanted in filters.items():
        value = item.get(name)
        if value is None:
            return False
        if name in ("state", "command"):
            if value != wanted:
                return False
        elif wanted not in value:
            return False
    return True


def select(
    sessions: Iterable[Any], filters: Mapping[str, str], rates: Mapping[str, tuple[float, float]]
) -> list[dict[str, Any]]:
    """The rows of the sessions that match ``filters``, newest first."""
    now = time.time()
    rows = [row(s, now, rates) for s in sessions]
    rows = [r for r in rows if matches(r, filters)] if filters else rows
    rows.sort(key=lambda r: r["started"], reverse=True)
    return rows


def masked(value: Any) -> Any:
    """``value`` (a config tree as plain data) with the values of secret-looking keys replaced."""
    if isinstance(value, dict):
        return {
            k: MASK if SECRET_KEY.search(str(k)) and not isinstance(v, (dict, list)) else masked(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [masked(v) for v in value]
    if isinstance(value, str):
        return URL_PASSWORD.sub(rf"\1:{MASK}@", value)
    return value
