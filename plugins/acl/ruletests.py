"""The ``tests:`` section: requests with the verdict the operator expects, run by ``socksflow check``.

```yaml
tests:
  - {from: 127.0.0.1, to: "localhost:80", expect: deny}
  - {from: 127.0.0.1, user: alice, command: udp, to: "192.0.2.7:53", expect: allow}
  - {to: "example.com:443", answers: [93.184.215.14], expect: allow}   # no DNS needed
  - {to: "intranet.corp.example:443", answers: [10.1.2.3], expect: allow, via: corp}
```

``via`` checks the outbound an allowed request goes through (``direct`` when its rule names none).

``from`` defaults to 127.0.0.1, ``protocol`` (the front door) to socks5 and ``command`` to
connect (``udp`` tests a datagram to ``to``).  ``answers`` gives the addresses a name resolves to, so a test needs no DNS;
without it, names resolve through the ``socksflow_resolve`` hook as in a live session.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from socksflow import Address, Command, Config, ConfigError, IPAddress, Node, Resolver, detect, parse_host

from .evaluate import Query, decide
from .rules import COMMANDS, RuleSet

EXPECTATIONS = ("allow", "deny")


@dataclass(frozen=True, slots=True)
class RuleTest:
    """One item of ``tests:``."""

    node: Node
    query: Query
    expect_allow: bool
    via: str | None  # the outbound expected (None: not checked)
    answers: tuple[IPAddress, ...] | None


def read_tests(node: Node, ruleset: RuleSet, config: Config) -> tuple[RuleTest, ...]:
    """Every valid test of the section; each invalid one is reported in ``config.errors``."""
    tests = []
    for item in node.as_list(scalar_ok=False):
        with config.errors.capture():
            tests.append(read_test(item, ruleset))
    return tuple(tests)


def read_test(node: Node, ruleset: RuleSet) -> RuleTest:
    items = node.as_map({"from", "user", "command", "protocol", "to", "expect", "via", "answers"})
    for required in ("to", "expect"):
        if required not in items:
            raise node.error(f"a test needs '{required}:'")
    client = ipaddress.ip_address("127.0.0.1")
    if "from" in items:
        client = items["from"].convert(_ip)
    user = items["user"].as_str() if "user" in items else ""
    command = COMMANDS[items["command"].as_choice(list(COMMANDS))] if "command" in items else Command.CONNECT
    answers = None
    if "answers" in items:
        answers = tuple(answer.convert(_ip) for answer in items["answers"].as_list())
    protocol = items["protocol"].as_choice(detect.PROTOCOLS) if "protocol" in items else detect.SOCKS5
    destination = items["to"].as_address()
    query = Query(client, destination, command, user, ruleset.groups_of(user), ruleset.local, False, protocol)
    expect_allow = items["expect"].as_choice(EXPECTATIONS) == "allow"
    via = items["via"].as_str() if "via" in items else None
    if via is not None and not expect_allow:
        raise items["via"].error("only an allowed request has an outbound")
    return RuleTest(node, query, expect_allow, via, answers)


async def run_tests(ruleset: RuleSet, tests: tuple[RuleTest, ...], resolve: Resolver) -> list[ConfigError]:
    """A located error for every test whose verdict is not the expected one."""
    failures = []
    for test in tests:
        destination = test.query.destination

        async def answers(test: RuleTest = test, destination: Address = destination) -> tuple[IPAddress, ...]:
            if test.answers is not None:
                return test.answers
            return await resolve(destination.host, destination.port)  # type: ignore[arg-type]

        decision = await decide(ruleset, test.query, answers)
        if decision.allowed != test.expect_allow:
            expected = EXPECTATIONS[0] if test.expect_allow else EXPECTATIONS[1]
            failures.append(test.node.error(f"expected {expected}, got {decision.outcome}"))
        elif test.via is not None and (decision.verdict().outbound or "direct") != test.via:
            got = decision.verdict().outbound or "direct"
            failures.append(
                test.node.error(f"expected allow via {test.via}, got {decision.outcome} (via {got})")
            )
    return failures


def _ip(text: object) -> IPAddress:
    host = parse_host(str(text))
    if isinstance(host, str):
        raise ValueError(f"{text!r} is not an IP address")
    return host
