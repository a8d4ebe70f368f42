"""``socksflow explain``: which ``limits`` entries a hypothetical request would be counted under."""

from __future__ import annotations

from dataclasses import dataclass

from socksflow import Address, Config, ExplainQuery, Identity

from .settings import Entry, Limits, Rate


@dataclass(frozen=True, slots=True)
class Asker:
    """What an entry's match reads of a session: the client and the identity."""

    client: Address
    identity: Identity


def explain(limits: Limits, query: ExplainQuery, config: Config) -> list[str]:
    user = query.user or ""
    asker = Asker(query.client, Identity(user, config.groups_of(user)))
    entries = dict.fromkeys([*limits.at_accept, *limits.at_request, *limits.bandwidth, *limits.auth])
    lines = []
    for entry in sorted(entries, key=_position):
        if entry.match.matches(asker):
            lines.append(f"limits: {entry.location} applies (per {entry.per.kind}): {_limits_of(entry)}")
        else:
            lines.append(f"limits: {entry.location} does not apply: {_mismatch(entry, asker)}")
    return lines


def _position(entry: Entry) -> tuple[str, int]:
    file, _, line = entry.location.rpartition(":")
    return file, int(line)


def _limits_of(entry: Entry) -> str:
    parts = []
    if entry.session_rate is not None:
        rate = entry.session_rate
        parts.append(f"at most {rate.per_second:g} new sessions/s (burst {rate.burst:g}), then refused")
    if entry.max_sessions is not None:
        parts.append(f"at most {entry.max_sessions} open sessions, then refused")
    if entry.max_handshakes is not None:
        parts.append(f"at most {entry.max_handshakes} connections in their handshake, then refused")
    if entry.up is not None or entry.down is not None:
        ways = [
            f"{way} {_bytes_per_second(rate)}"
            for way, rate in (("up", entry.up), ("down", entry.down))
            if rate
        ]
        parts.append(f"bandwidth {', '.join(ways)} (paced, never refused)")
    if entry.auth is not None:
        auth = entry.auth
        parts.append(
            f"after {auth.failures} failed logins within {auth.within:g}s, refused for {auth.block:g}s"
        )
    return "; ".join(parts)


def _bytes_per_second(rate: Rate) -> str:
    value = rate.per_second
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:g} {unit}/s"
        value /= 1024
    raise AssertionError("unreachable")


def _mismatch(entry: Entry, asker: Asker) -> str:
    match = entry.match
    user = asker.identity.user or "(none: no login)"
    if not match.client_matches(asker):
        return f"client {asker.client.host} is not in {', '.join(map(str, match.networks))}"
    if match.users and asker.identity.user not in match.users:
        return f"user {user} is not {', '.join(sorted(match.users))}"
    return f"user {user} is in none of the groups {', '.join(sorted(match.groups))}"
