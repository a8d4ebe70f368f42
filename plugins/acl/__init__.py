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
``special:NAME``, ``file:PATH``), ``user``, ``group``, ``command`` (connect, bind, udp),
``to`` (IPs, networks, ``name``, ``*.suffix`` for subdomains, ``~regex`` / ``regex:...``
searched in the name, ``special:NAME``, ``file:PATH``), ``port`` (``80``, ``1024-65535``).
List files are read relative to the rules file (see :mod:`.lists`); ``special:`` sets are
``loopback``, ``private``, ``link-local``, ``multicast``, ``unspecified`` and ``self`` (see
:mod:`.special`).  How domains, resolved addresses and UDP are decided: :mod:`.evaluate`.

Without a ``rules:`` section this plugin has no opinion.  All state lives in
``config.stash``: a reload with a bad file keeps the rules in force.
"""

from __future__ import annotations

from collections.abc import Awaitable

from socksflow import (
    Address,
    Config,
    ConfigError,
    ExplainQuery,
    Request,
    Resolver,
    StashKey,
    Verdict,
    hookimpl,
)

from .explain import explain
from .exposure import client_restriction
from .lint import shadowed_rules
from .rules import RuleReader, RuleSet
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
    if tests is not None:
        with config.errors.capture():
            config.stash[TESTS] = read_tests(tests, ruleset, config)
    config.warnings.extend(reader.lints)
    config.warnings.extend(shadowed_rules(ruleset.rules))


@hookimpl
def socksflow_exposure(config: Config) -> str | None:
    ruleset = config.stash.get(RULES)
    return None if ruleset is None else client_restriction(ruleset)


@hookimpl
def socksflow_request(session, request: Request) -> Verdict | Awaitable[Verdict] | None:
    # Sync unless a rule needs the destination's addresses (as socksflow_udp_datagram below).
    ruleset = session.config.stash.get(RULES)
    if ruleset is None:
        return None
    return decide_request(ruleset, session, request)


@hookimpl
def socksflow_udp_datagram(session, destination: Address) -> Verdict | Awaitable[Verdict] | None:
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
    return await run_tests(config.stash[RULES], tests, resolve)


@hookimpl
async def socksflow_explain(config: Config, query: ExplainQuery, resolve: Resolver) -> list[str] | None:
    ruleset = config.stash.get(RULES)
    if ruleset is None:
        return None
    return await explain(ruleset, query, resolve)
