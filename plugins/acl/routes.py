"""Rules that route (``via:``): an outbound that cannot carry the command refuses it with 0x07.

BIND and UDP ASSOCIATE follow their rule's route; an outbound without ``open_bind`` /
``open_udp`` cannot carry them (UDP: SOCKS5 upstreams, and chains and groups of them; BIND:
SOCKS5 upstreams),
and letting them go direct instead would bypass the route the operator chose.
"""

from __future__ import annotations

import logging

from socksflow import Command, ConfigError, Registry, Reply, Verdict, carries

from .rules import COMMAND_NAMES, Rule

log = logging.getLogger("socksflow.acl")

CAPABILITY = {Command.BIND: "open_bind", Command.UDP_ASSOCIATE: "open_udp"}


def carried(verdict: Verdict, command: Command, registry: Registry | None) -> Verdict:
    """``verdict``, or a 0x07 refusal when its outbound cannot carry ``command``."""
    name = verdict.outbound
    if not verdict.allowed or name in (None, "direct") or command not in CAPABILITY or registry is None:
        return verdict
    if carries(registry.get(name), CAPABILITY[command]):
        return verdict
    reason = f"outbound {name!r} cannot carry {COMMAND_NAMES[command]} (rule {verdict.rule})"
    log.warning("%s: refused with 0x07", reason)
    return Verdict.deny(reason, reply=Reply.COMMAND_NOT_SUPPORTED, rule=verdict.rule)


def uncarried_commands(rules: tuple[Rule, ...], registry: Registry | None) -> list[ConfigError]:
    """A warning for each routed rule whose outbound cannot carry a command the rule allows."""
    warnings = []
    for rule in rules:
        if not rule.allow or rule.via in (None, "direct") or registry is None or rule.via not in registry:
            continue
        outbound = registry.get(rule.via)
        commands = rule.commands if rule.commands is not None else frozenset(Command)
        missing = [
            COMMAND_NAMES[c]
            for c in sorted(commands)
            if c in CAPABILITY and not carries(outbound, CAPABILITY[c])
        ]
        if missing:
            warnings.append(ConfigError(
                f"outbound {rule.via!r} cannot carry {', '.join(missing)}: those requests get 0x07"
                " (narrow the rule with command: connect)",
                rule.file, rule.line, f"rules[{rule.index}].via",
            ))  # fmt: skip
    return warnings
