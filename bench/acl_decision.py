"""How long the ACL takes to load a big rule set and to decide one request.

Generates, in a temporary folder, a blocklist of 100 000 domains (plain names, ``*.suffix``
entries and hosts-file lines) and one of 10 000 networks, loads them as ``rules.yaml`` would,
and times single decisions: a listed domain, an unlisted domain (its address already
resolved), a listed IP and an unlisted IP.  Standard library and socksflow only::

    python bench/acl_decision.py [--domains 100000] [--networks 10000]
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import resource
import tempfile
import time
from pathlib import Path

import socksflow_plugins.acl as acl
from socksflow_plugins.acl.evaluate import Decision, Query, evaluate

from socksflow import Address, Command
from socksflow.config import Config

RULES = """\
listen: [127.0.0.1:1080]
rules:
  - deny: {to: file:domains.txt}
    reason: domain blocklist
  - deny: {to: file:networks.txt}
    reason: network blocklist
  - deny: {to: [special:loopback, special:private, special:link-local]}
  - allow: all
"""


def write_lists(folder: Path, domains: int, networks: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """Write the two list files; return some listed names and listed IPs to look up."""
    names, lines = [], ["# generated blocklist"]
    for index in range(domains):
        name = f"host{index:06d}.{rng.choice(['ads', 'track', 'cdn', 'pix'])}{index % 997}.example"
        kind = index % 10
        if kind < 6:
            lines.append(name)
        elif kind < 8:
            lines.append(f"0.0.0.0 {name}")
        else:
            lines.append(f"*.{name}")
            name = f"www.{name}"
        names.append(name)
    (folder / "domains.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ips, lines = [], []
    for _ in range(networks):
        length = rng.choice([16, 20, 24, 24, 28, 32])
        network = ipaddress.ip_network((rng.randrange(1 << 32) >> (32 - length) << (32 - length), length))
        lines.append(str(network))
        ips.append(str(network.network_address + rng.randrange(network.num_addresses)))
    (folder / "networks.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return names, ips


def time_per_call(queries: list[tuple[Query, tuple | None]], ruleset, allowed: bool, rounds: int) -> float:
    """Mean microseconds per :func:`evaluate` call over ``rounds`` passes of ``queries``."""
    for query, answers in queries:
        decision = evaluate(ruleset, query, answers)
        assert isinstance(decision, Decision) and decision.allowed == allowed, (query, decision)
    start = time.perf_counter()
    for _ in range(rounds):
        for query, answers in queries:
            evaluate(ruleset, query, answers)
    return (time.perf_counter() - start) / (rounds * len(queries)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=100_000)
    parser.add_argument("--networks", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    rng = random.Random(1928)
    client = ipaddress.ip_address("127.0.0.1")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names, ips = write_lists(folder, args.domains, args.networks, rng)
        (folder / "rules.yaml").write_text(RULES, encoding="utf-8")
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        config = Config.from_file(folder / "rules.yaml")
        acl.socksflow_configure(config)
        load = time.perf_counter() - start
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        config.raise_errors()
        ruleset = config.stash[acl.RULES]

    def query(host: str, port: int = 443) -> Query:
        return Query(client, Address.parse(f"{host}:{port}"), Command.CONNECT, local=ruleset.local)

    sample = rng.sample(range(len(names)), 1000)
    unlisted = [ipaddress.ip_address(f"192.0.2.{i % 250 + 1}") for i in range(1000)]
    cases = {
        "domain hit (listed name)": ([(query(names[i]), None) for i in sample], False),
        "domain miss (resolved, allowed)": (
            [(query(f"site{i}.example.org"), (unlisted[i],)) for i in range(1000)], True
        ),
        "IP hit (listed network)": ([(query(ips[i % len(ips)]), None) for i in sample], False),
        "IP miss (allowed)": ([(query(str(unlisted[i])), None) for i in range(1000)], True),
    }  # fmt: skip
    print(f"rule set: {args.domains} domains, {args.networks} networks, 4 rules")
    print(f"load: {load:.2f} s (parse, index, lint), memory +{(rss_after - rss_before) / 1024:.0f} MiB")
    for label, (queries, allowed) in cases.items():
        print(f"{label:34} {time_per_call(queries, ruleset, allowed, args.rounds):6.2f} µs per decision")


if __name__ == "__main__":
    main()
