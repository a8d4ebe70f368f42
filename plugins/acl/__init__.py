"""Access control: the ``rules:`` section of ``rules.yaml`` (with ``groups:`` and rule ``tests:``).

```yaml
groups:
  admins: [alice, bob]
rules:                                   # top to bottom, first match wins; nothing matched = deny
  - deny: {to: [special:loopback, special:private, special:link-local, special:self]}
    reason: internal networks            # goes to the log
    reply: host_unreachable              # a reply code name or number (default 2, not allowed)
  - deny: {to: ["*.doubleclick.net", "file:blocklist.txt"]}
  - allow: {from: [127.0.0.0/8, "::1"], port: [80, 443, 1024-65535]}
  - allow: {group: admins, command: [connect, udp]}
  # - allow: all
```

Match fields (AND across fields, OR within a list): ``from`` (client IPs, networks,
``special:NAME``, ``file:PATH``), ``user``, ``group``, ``command`` (connect, bind, udp,
resolve, resolve_ptr), ``protocol`` (the front door: socks5, socks4, http),
``to`` (IPs, networks, ``name``, ``*.suffix`` for subdomains, ``~regex`` / ``regex:...``
searched in the name, ``special:NAME``, ``file:PATH``), ``port`` (``80``, ``1024-65535``).
List files are read relative to the rules file (see :mod:`.lists`); ``special:`` sets are
``loopback``, ``private``, ``link-local``, ``multicast``, ``unspecified`` and ``self`` (see
:mod:`.special`).  How domains, resolved addresses and UDP are decided: :mod:`.evaluate`.

Without a ``rules:`` section this plugin has no opinion.  All state lives in
``config.stash``: a reload with a bad file keeps the rules in force.

For the admin API (and anyone holding the server), the module offers :func:`rule_hits`,
:func:`record_decisions`, :func:`replay_decisions` and :func:`shadow_report` (see :mod:`.observe`).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from socksflow import (
    OUTBOUNDS,
    Address,
    Config,
    ConfigError,
    ExplainQuery,
    Request,
    Resolver,
    Server,
    Session,
    StashKey,
    Verdict,
    hookimpl,
)

from .explain import explain
from .exposure import client_restriction
from .lint import shadowed_rules
from .observe import DECISIONS, HITS, SHADOW, DecisionLog, RuleHits, ShadowStats, hit_table, replay
from .routes import uncarried_commands
from .rules import Rule, RuleReader, RuleSet
from .ruletests import RuleTest, read_tests, run_tests
from .sessions import decide_datagram, decide_request

RULES = StashKey[RuleSet]("acl.rules")
TESTS = StashKey[tuple[RuleTest, ...]]("acl.tests")


@hookimpl
def socksflow_configure(config: Config) -> bool | None:
    reader = RuleReader(config)
    tests = config.section("tests")
    ruleset = reader.read()
    if ruleset is None:
        if tests is not None:
            raise tests.error("rule tests need a rules: section to test")
        return False  # dormant: no rules, no opinion
    config.stash[RULES] = ruleset
    config.stash[HITS] = RuleHits(len(ruleset.rules))
    config.stash[SHADOW] = ShadowStats(config.file)
    if tests is not None:
        with config.errors.capture():
            config.stash[TESTS] = read_tests(tests, ruleset, config)
    config.warnings.extend(reader.lints)
    config.warnings.extend(shadowed_rules(ruleset.rules))
    config.warnings.extend(uncarried_commands(ruleset.rules, config.stash.get(OUTBOUNDS)))


@hookimpl
def socksflow_exposure(config: Config) -> str | None:
    ruleset = config.stash.get(RULES)
    return None if ruleset is None else client_restriction(ruleset)


@hookimpl
def socksflow_request(session: Session, request: Request) -> Verdict | Awaitable[Verdict] | None:
    # Sync unless a rule needs the destination's addresses (as socksflow_udp_datagram below).
    ruleset = session.config.stash.get(RULES)
    if ruleset is None:
        return None
    return decide_request(ruleset, session, request)


@hookimpl
def socksflow_udp_datagram(session: Session, destination: Address) -> Verdict | Awaitable[Verdict] | None:
    # Sync, so a destination decided before costs a dict look-up; when a name must be resolved
    # first this returns a coroutine, which the core's hook caller awaits like any async answer.
    ruleset = session.config.stash.get(RULES)
    if ruleset is None:
        return None
    return decide_datagram(ruleset, session, destination)


@hookimpl
async def socksflow_check(config: Config, resolve: Resolver) -> list[ConfigError] | None:
    tests = config.stash.get(TESTS)
    if not tests:
        return None
    config.checks_run += len(tests)
    return await run_tests(config.stash[RULES], tests, resolve)


@hookimpl
async def socksflow_explain(config: Config, query: ExplainQuery, resolve: Resolver) -> list[str] | None:
    ruleset = config.stash.get(RULES)
    if ruleset is None:
        return None
    return await explain(ruleset, query, resolve, config.stash.get(OUTBOUNDS))


# ---------------------------------------------------------------------------- for the admin API


def rule_hits(config: Config) -> dict[str, Any] | None:
    """Every rule of ``config`` with the requests it decided since it was loaded (None: no rules)."""
    ruleset, hits = config.stash.get(RULES), config.stash.get(HITS)
    return None if ruleset is None or hits is None else hit_table(ruleset, hits)


def record_decisions(server: Server, size: int) -> None:
    """Keep the inputs of the server's last ``size`` decisions, for :func:`replay_decisions`."""
    server.stash[DECISIONS] = DecisionLog(size)


async def replay_decisions(server: Server, config: Config) -> dict[str, Any] | None:
    """Which recent decisions ``config``'s rules would turn around (None: nothing to compare)."""
    old, new = server.config.stash.get(RULES), config.stash.get(RULES)
    decisions = server.stash.get(DECISIONS)
    if decisions is None:
        return None
    return await replay(
        decisions.decided(), old or _no_rules(server.config), new or _no_rules(config),
        server.resolver(),
    )  # fmt: skip


def shadow_report(config: Config | None) -> dict[str, Any] | None:
    """What the shadow rules (``config``) disagreed with, if they are rules."""
    stats = config.stash.get(SHADOW) if config is not None else None
    return None if stats is None else stats.as_dict()


def _no_rules(config: Config) -> RuleSet:
    """What a configuration without rules amounts to: this plugin allows everything."""
    return RuleSet(config.file, (Rule(0, config.file, 0, True, reason="no rules section"),), config.groups_of)
