"""Lints: rules that can never match because an earlier rule matches everything they match."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from socksflow import Command, ConfigError

from .rules import Rule


def shadowed_rules(rules: tuple[Rule, ...]) -> list[ConfigError]:
    """A warning for each rule an earlier rule covers, whatever either rule's action."""
    warnings = []
    for position, later in enumerate(rules):
        for earlier in rules[:position]:
            if covers(earlier, later):
                warnings.append(ConfigError(
                    f"never matches: rules[{earlier.index}] ({earlier.location}) comes first "
                    "and matches everything this rule matches",
                    later.file, later.line, f"rules[{later.index}]",
                ))  # fmt: skip
                break
    return warnings


def covers(earlier: Rule, later: Rule) -> bool:
    """Whether every request (and every resolved address) ``later`` matches, ``earlier`` matches too."""
    if _matches_associations(later) and not _matches_associations(earlier):
        return False  # a deny with to/port passes over UDP associations that ``later`` would decide
    return (
        _field(earlier.clients, later.clients, lambda a, b: a.covers(b))
        and _field(earlier.users, later.users, lambda a, b: b <= a)
        and _field(earlier.groups, later.groups, lambda a, b: b <= a)
        and _field(earlier.commands, later.commands, lambda a, b: b <= a)
        and _field(earlier.protocols, later.protocols, lambda a, b: b <= a)
        and _field(earlier.ports, later.ports, lambda a, b: a.covers(b))
        and _field(earlier.destinations, later.destinations, lambda a, b: a.covers(b))
    )


def _field(earlier: Any, later: Any, contains: Callable[[Any, Any], bool]) -> bool:
    """A field left out matches anything, so it covers anything and is covered by nothing else."""
    if earlier is None:
        return True
    return later is not None and contains(earlier, later)


def _matches_associations(rule: Rule) -> bool:
    """Whether the rule can decide a UDP ASSOCIATE request itself (see the evaluator)."""
    udp = rule.commands is None or Command.UDP_ASSOCIATE in rule.commands
    return udp and (rule.allow or (rule.destinations is None and rule.ports is None))
