"""The acl plugin's hit counts, decision log, replay and shadow comparison, without a server."""

from __future__ import annotations

import asyncio
import ipaddress
from types import SimpleNamespace

import pytest
import socksflow_plugins.acl as acl
from socksflow_plugins.acl.sessions import decide_request

from socksflow import Address, Command, Config, Identity, Request, ResolveError, Stash, app

pytestmark = pytest.mark.smoke


def configure(text: str, file: str = "rules.yaml") -> Config:
    config = Config.from_text("listen: [127.0.0.1:1080]\n" + text, file)
    pm = app.build_plugin_manager(config)
    app.configure(pm, config)
    return config


class Session:
    def __init__(self, config: Config, server: SimpleNamespace, answers: dict[str, list[str]]) -> None:
        self.config, self.server, self.id = config, server, "7"
        self.client, self.local = Address.parse("10.1.1.1:5000"), Address.parse("127.0.0.1:1080")
        self.identity, self.stash, self.protocol = Identity("alice"), Stash(), "socks5"
        self._answers, self._resolved = answers, {}

    async def resolve(self, host=None, port=None):
        host = host or self.destination.host
        self._resolved[host] = tuple(ipaddress.ip_address(a) for a in self._answers[host])
        return self._resolved[host]

    def resolved(self, host):
        return self._resolved.get(host)


def decide(config: Config, session: Session, destination: str):
    session.destination = Address.parse(destination)
    verdict = decide_request(
        config.stash[acl.RULES], session, Request(Command.CONNECT, Address.parse(destination))
    )
    return asyncio.run(verdict) if asyncio.iscoroutine(verdict) else verdict


def test_hits_replay_with_recorded_answers_and_one_lookup_per_unrecorded_name():
    old = configure("rules:\n  - deny: {to: [192.0.2.0/24]}\n  - allow: all\n")  # resolves names
    new = configure("rules:\n  - allow: {to: [192.0.2.0/24]}\n  - deny: all\n", "new.yaml")
    server = SimpleNamespace(stash=Stash(), shadow=None, config=old)
    acl.record_decisions(server, 10)
    session = Session(old, server, {"in.example": ["192.0.2.9"], "out.example": ["198.51.100.1"]})
    assert not decide(old, session, "in.example:443").allowed  # resolved by the rules: answers recorded
    assert decide(old, session, "out.example:443").allowed
    assert decide(old, session, "203.0.113.5:80").allowed
    hits = acl.rule_hits(old)
    assert [(r["rule"], r["hits"]) for r in hits["rules"]] == [("rules.yaml:3", 1), ("rules.yaml:4", 2)]

    lookups = []

    async def resolve(host, port):
        lookups.append(host)
        raise ResolveError("must not be asked: the answers were recorded")

    server.resolve = lambda _session, host, port: resolve(host, port)
    report = asyncio.run(acl.replay_decisions(server, new))
    flips = {(f["destination"], f["before"], f["after"]) for f in report["flips"]}
    assert flips == {
        ("in.example:443", "deny by rules.yaml:3", "allow by new.yaml:3"),
        ("out.example:443", "allow by rules.yaml:4", "deny by new.yaml:4"),
        ("203.0.113.5:80", "allow by rules.yaml:4", "deny by new.yaml:4"),
    }
    assert report["replayed"] == 3 and lookups == []


def test_shadow_rules_count_disagreements_and_undecided_requests():
    in_force = configure("rules:\n  - deny: {to: [blocked.example]}\n  - allow: all\n")
    shadow = configure("rules:\n  - deny: {to: [192.0.2.0/24]}\n  - allow: {port: [443]}\n", "shadow.yaml")
    server = SimpleNamespace(stash=Stash(), shadow=shadow, config=in_force)
    session = Session(in_force, server, {})
    assert decide(in_force, session, "198.51.100.1:443").allowed  # both allow
    assert decide(in_force, session, "198.51.100.1:80").allowed  # the shadow rules deny: disagreement
    assert not decide(
        in_force, session, "blocked.example:443"
    ).allowed  # shadow needs DNS not done: undecided
    report = acl.shadow_report(shadow)
    assert (report["compared"], report["disagreed"], report["undecided"]) == (3, 1, 1)
    assert report["recent"][0]["in_force"] == "allow by rules.yaml:4"
    assert report["recent"][0]["shadow"] == "deny: no rule matched (default: deny)"
