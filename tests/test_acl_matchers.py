"""The ACL plugin's parts: matchers, special sets, list files, rule parsing, first-match evaluation, lints."""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
from pathlib import Path
from types import SimpleNamespace

import pytest
import socksflow_plugins.acl as acl
from socksflow_plugins.acl.evaluate import NO_RULE_MATCHED, Decision, NeedAnswers, Query, decide, evaluate
from socksflow_plugins.acl.lists import EntryError, load_list
from socksflow_plugins.acl.matchers import DomainSet, NetworkSet, PortSet, embedded_ipv4, normalize
from socksflow_plugins.acl.sessions import decide_datagram, decide_request

from socksflow import Address, Command, Identity, Reply, ResolveError, Verdict
from socksflow.config import Config
from socksflow.stash import Stash

ip = ipaddress.ip_address
net = ipaddress.ip_network


# ---------------------------------------------------------------------------- helpers


def configure(text: str, directory: Path | None = None) -> Config:
    """A configuration read by the ACL plugin alone; errors stay in ``config.errors``."""
    if directory is None:
        config = Config.from_text(text, "rules.yaml")
    else:
        (directory / "rules.yaml").write_text(text, encoding="utf-8")
        config = Config.from_file(directory / "rules.yaml")
    try:
        acl.socksflow_configure(config)
    except Exception as exc:  # what app.configure does with a ConfigError
        config.errors.add(exc)
    return config


def ruleset(text: str, directory: Path | None = None):
    config = configure(text, directory)
    assert not config.errors, [str(e) for e in config.errors.errors]
    return config.stash[acl.RULES]


def errors(text: str, directory: Path | None = None) -> list[str]:
    return [str(e) for e in configure(text, directory).errors.errors]


def warnings(text: str, directory: Path | None = None) -> list[str]:
    config = configure(text, directory)
    assert not config.errors, [str(e) for e in config.errors.errors]
    return [str(w) for w in config.warnings]


class FakeDNS:
    """Answers from a table and counts look-ups; unknown names raise ResolveError."""

    def __init__(self, table: dict[str, list[str]] | None = None) -> None:
        self.table = table or {}
        self.lookups: list[str] = []

    def resolver(self, host: str):
        async def resolve():
            self.lookups.append(host)
            if host not in self.table:
                raise ResolveError(f"{host}: NXDOMAIN")
            return tuple(ip(a) for a in self.table[host])

        return resolve


def check(rules, destination: str, *, client: str = "127.0.0.1", command: Command = Command.CONNECT,
          user: str = "", groups: frozenset[str] = frozenset(), dns: FakeDNS | None = None,
          association: bool = False, steps: list | None = None) -> Decision:  # fmt: skip
    address = Address.parse(destination)
    query = Query(ip(client), address, command, user, rules.groups_of(user, groups), rules.local, association)
    dns = dns or FakeDNS()
    return asyncio.run(decide(rules, query, dns.resolver(str(address.host)), steps))


def where(decision: Decision) -> str:
    """``allow rules.yaml:3`` / ``deny rules.yaml:5`` / ``deny default``."""
    action = "allow" if decision.allowed else "deny"
    return f"{action} {decision.rule.location if decision.rule else 'default'}"


# ---------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "embedded"),
    [
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::ffff:a9fe:a9fe", "169.254.169.254"),
        ("::127.0.0.1", "127.0.0.1"),
        ("::a00:1", "10.0.0.1"),
        ("64:ff9b::7f00:1", "127.0.0.1"),  # NAT64 (RFC 6052): a gateway connects to 127.0.0.1
        ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
        ("2002:7f00:1::", "127.0.0.1"),  # 6to4 (RFC 3056)
        ("2002:a00:1:1::5", "10.0.0.1"),
        ("64:ff9b:1::7f00:1", None),  # the local-use NAT64 prefix embeds at a place of its own choosing
        ("2003:7f00:1::", None),
        ("::", None),
        ("::1", None),
        ("2001:db8::1", None),
        ("127.0.0.1", None),
    ],
)
def test_embedded_ipv4(text, embedded):
    assert embedded_ipv4(ip(text)) == (ip(embedded) if embedded else None)
    assert normalize(ip(text)) == ip(embedded or text)


def test_network_set_most_specific_label_both_families():
    networks = NetworkSet()
    networks.add(net("10.0.0.0/8"), "wide")
    networks.add(net("10.1.0.0/16"), "narrow")
    networks.add(net("2001:db8::/32"), "doc6")
    networks.add(net("192.0.2.7/32"), "host")
    assert networks.lookup(ip("10.1.2.3")) == "narrow"
    assert networks.lookup(ip("10.2.0.1")) == "wide"
    assert networks.lookup(ip("11.0.0.1")) is None
    assert networks.lookup(ip("2001:db8:1::5")) == "doc6"
    assert networks.lookup(ip("2001:db9::5")) is None
    assert networks.lookup(ip("192.0.2.7")) == "host"
    assert networks.lookup(ip("192.0.2.8")) is None
    assert len(networks) == 4


def test_network_set_matches_mapped_and_compatible_ipv6_against_ipv4_entries():
    networks = NetworkSet()
    networks.add(net("127.0.0.0/8"), "loop")
    assert networks.lookup(ip("::ffff:127.0.0.1")) == "loop"
    assert networks.lookup(ip("::127.0.0.1")) == "loop"
    assert networks.lookup(ip("::ffff:128.0.0.1")) is None


def test_network_set_stores_mapped_networks_as_ipv4():
    networks = NetworkSet()
    networks.add(net("::ffff:10.0.0.0/104"), "mapped")
    assert networks.lookup(ip("10.9.9.9")) == "mapped"
    assert networks.lookup(ip("::ffff:10.9.9.9")) == "mapped"
    assert networks.add(net("10.0.0.0/8"), "again") == "mapped"  # the same network: a duplicate


def test_network_set_containers_and_coverage():
    wide, narrow = NetworkSet(), NetworkSet()
    wide.add(net("10.0.0.0/8"), "a")
    wide.add(net("192.168.0.0/16"), "b")
    narrow.add(net("10.3.0.0/16"), "c")
    narrow.add(net("192.168.1.1/32"), "d")
    assert wide.container(net("10.3.0.0/16")) == (net("10.0.0.0/8"), "a")
    assert wide.container(net("10.0.0.0/8")) == (net("10.0.0.0/8"), "a")
    assert wide.container(net("10.0.0.0/8"), strict=True) is None
    assert wide.container(net("10.0.0.0/7")) is None
    assert wide.covers(narrow) and not narrow.covers(wide)


def test_domain_set_exact_and_subdomains():
    domains = DomainSet()
    domains.add_exact("example.com", "exact")
    domains.add_suffix("ads.example", "*.ads.example")
    assert domains.lookup("example.com") == "exact"
    assert domains.lookup("www.example.com") is None
    assert domains.lookup("x.ads.example") == "*.ads.example"
    assert domains.lookup("a.b.c.ads.example") == "*.ads.example"
    assert domains.lookup("ads.example") is None  # *.suffix is subdomains only
    assert domains.lookup("badads.example") is None


def test_port_set():
    ports = PortSet(((80, 80), (443, 443), (1024, 65535)))
    assert 80 in ports and 443 in ports and 1024 in ports and 65535 in ports
    assert 81 not in ports and 1023 not in ports and 0 not in ports
    assert ports.covers(PortSet(((2000, 3000), (80, 80))))
    assert not ports.covers(PortSet(((1000, 2000),)))
    assert PortSet(((1, 10), (11, 20))).covers(PortSet(((5, 15),)))
    assert str(ports) == "80, 443, 1024-65535"


# ---------------------------------------------------------------------------- special sets


SPECIAL = """
listen: [127.0.0.1:1080, "[::1]:1080", 192.0.2.53:1080]
rules:
  - deny: {to: special:loopback}
    reason: loopback
  - deny: {to: special:private}
    reason: private
  - deny: {to: special:link-local}
    reason: link-local
  - deny: {to: special:multicast}
    reason: multicast
  - deny: {to: special:self}
    reason: self
  - allow: all
"""


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"), ("127.255.255.254", "loopback"), ("0.0.0.0", "loopback"),
        ("0.1.2.3", "loopback"), ("::1", "loopback"), ("::", "loopback"),
        ("::ffff:127.0.0.1", "loopback"), ("::127.0.0.2", "loopback"), ("::ffff:0.0.0.0", "loopback"),
        ("10.0.0.1", "private"), ("172.16.0.1", "private"), ("172.31.255.255", "private"),
        ("192.168.1.1", "private"), ("100.64.0.1", "private"), ("100.127.255.255", "private"),
        ("fc00::1", "private"), ("fd12:3456::1", "private"), ("::ffff:10.1.2.3", "private"),
        ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
        ("::ffff:169.254.169.254", "link-local"),
        ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("ff02::1", "multicast"),
        ("192.0.2.53", "self"), ("::ffff:192.0.2.53", "self"),
        ("172.32.0.1", ""), ("100.128.0.1", ""), ("8.8.8.8", ""), ("2001:4860:4860::8888", ""),
        ("192.0.2.54", ""), ("::ffff:8.8.8.8", ""),
        ("64:ff9b::7f00:1", "loopback"), ("2002:7f00:1::", "loopback"), ("64:ff9b::a00:1", "private"),
        ("2002:a9fe:a9fe::1", "link-local"), ("64:ff9b::c000:235", "self"), ("64:ff9b::808:808", ""),
        ("2002:808:808::1", ""),
    ],
)  # fmt: skip
def test_special_sets(address, reason):
    decision = check(ruleset(SPECIAL), f"[{address}]:80" if ":" in address else f"{address}:80")
    assert decision.allowed == (not reason)
    assert decision.reason == reason


def test_every_network_rule_judges_the_ipv4_that_nat64_and_6to4_addresses_embed():
    rules = ruleset("rules:\n  - deny: {to: 198.51.100.0/24}\n    reason: v4\n  - allow: all\n")
    for address in ("198.51.100.7", "::ffff:198.51.100.7", "64:ff9b::c633:6407", "2002:c633:6407::9"):
        decision = check(rules, f"[{address}]:80" if ":" in address else f"{address}:80")
        assert (decision.allowed, decision.reason) == (False, "v4"), address
    assert check(rules, "[64:ff9b::c633:6507]:80").allowed


def test_unspecified_set():
    rules = ruleset("rules:\n  - deny: {to: special:unspecified}\n  - allow: all\n")
    assert not check(rules, "0.0.0.0:80").allowed
    assert not check(rules, "[::]:80").allowed
    assert check(rules, "0.0.0.1:80").allowed


def test_self_includes_the_address_a_session_came_in_on():
    rules = ruleset("listen: [0.0.0.0:1080]\nrules:\n  - deny: {to: special:self}\n  - allow: all\n")
    query = Query(ip("127.0.0.1"), Address.parse("198.51.100.4:22"), local=rules.local | {ip("198.51.100.4")})
    assert not evaluate(rules, query).allowed
    assert check(rules, "198.51.100.4:22").allowed  # without that session, only the listen addresses


# ---------------------------------------------------------------------------- list files


def test_list_file_kinds_per_line(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text(
        "# comment\n"
        "ads.example\n"
        "  Tracker.Example.   # trailing comment\n"
        "*.adnet.example\n"
        "0.0.0.0 hosts1.example hosts2.example\n"
        "127.0.0.1 localhost\n"
        ":: ip6-localhost\n"
        "198.51.100.0/24\n"
        "203.0.113.9\n"
        "2001:db8::/32\n"
        "\n",
        encoding="utf-8",
    )
    listed = load_list(path, "list.txt")
    assert listed.domains.exact == {
        "ads.example": "list.txt:2", "tracker.example": "list.txt:3",
        "hosts1.example": "list.txt:5", "hosts2.example": "list.txt:5",
    }  # fmt: skip
    assert listed.domains.suffixes == {"adnet.example": "list.txt:4"}
    assert listed.networks.lookup(ip("198.51.100.77")) == "list.txt:8"
    assert listed.networks.lookup(ip("203.0.113.9")) == "list.txt:9"
    assert listed.networks.lookup(ip("2001:db8::1")) == "list.txt:10"
    assert listed.lints == []


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("10.0.0.0/33", "'10.0.0.0/33' is not a network"),
        ("10.0.0.1/8", "'10.0.0.1/8' has host bits set (the network is 10.0.0.0/8)"),
        ("bad name.example x", "'bad name.example x': expected one domain or network per line, "
                               "or a hosts line 'IP name...'"),
        ("bad$name", "'bad$name' has characters not allowed in a host name"),
    ],
)  # fmt: skip
def test_list_file_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "list.txt"
    path.write_text(f"ok.example\n{line}\n", encoding="utf-8")
    with pytest.raises(EntryError) as info:
        load_list(path, "list.txt")
    assert (info.value.line, str(info.value)) == (2, message)


def test_list_file_overlaps_and_duplicates_are_lints(tmp_path):
    path = tmp_path / "nets.txt"
    path.write_text("10.0.0.0/8\n10.1.0.0/16\n192.0.2.0/24\n10.0.0.0/8\n", encoding="utf-8")
    assert load_list(path, "nets.txt").lints == [
        (2, "10.1.0.0/16 overlaps 10.0.0.0/8 (line 1), which holds it"),
        (4, "10.0.0.0/8 is listed twice (first on line 1)"),
    ]


def test_list_files_in_rules_are_relative_to_the_rules_file(tmp_path):
    (tmp_path / "block.txt").write_text("0.0.0.0 ads.example\n203.0.113.0/24\n", encoding="utf-8")
    rules = ruleset("rules:\n  - deny: {to: file:block.txt}\n  - allow: all\n", tmp_path)
    assert where(check(rules, "ads.example:80")) == f"deny {tmp_path}/rules.yaml:2"
    assert not check(rules, "203.0.113.5:80").allowed
    assert check(rules, "other.example:80", dns=FakeDNS({"other.example": ["198.51.100.1"]})).allowed


def test_list_file_errors_in_the_config(tmp_path):
    (tmp_path / "block.txt").write_text("ok.example\n10.0.0.0/33\n", encoding="utf-8")
    at = f"{tmp_path}/rules.yaml:2: rules[0].deny"
    assert errors("rules:\n  - deny: {to: [file:block.txt]}\n", tmp_path) == [
        f"{at}.to[0]: block.txt:2: '10.0.0.0/33' is not a network"
    ]
    assert errors("rules:\n  - deny: {to: [file:missing.txt]}\n", tmp_path) == [
        f"{at}.to[0]: cannot read list file 'missing.txt': No such file or directory"
    ]
    (tmp_path / "names.txt").write_text("ok.example\n", encoding="utf-8")
    assert errors("rules:\n  - deny: {from: [file:names.txt]}\n", tmp_path) == [
        f"{at}.from[0]: names.txt lists domain names; 'from' takes client addresses"
    ]


def test_list_file_lints_are_warnings_once(tmp_path):
    (tmp_path / "nets.txt").write_text("10.0.0.0/8\n10.1.0.0/16\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("# nothing yet\n", encoding="utf-8")
    text = (
        "rules:\n"
        "  - deny: {to: [file:nets.txt, file:empty.txt]}\n"
        "  - deny: {to: [file:nets.txt, 192.0.2.1]}\n"
        "  - allow: all\n"
    )
    assert warnings(text, tmp_path) == [
        f"{tmp_path}/rules.yaml:2: rules[0].deny.to[0]: nets.txt:2: "
        "10.1.0.0/16 overlaps 10.0.0.0/8 (line 1), which holds it",
        f"{tmp_path}/rules.yaml:2: rules[0].deny.to[1]: empty.txt has no entries: this matches nothing",
    ]


def test_an_empty_list_file_matches_nothing(tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    rules = ruleset("rules:\n  - deny: {to: file:empty.txt}\n  - allow: all\n", tmp_path)
    assert check(rules, "192.0.2.1:80").allowed


# ---------------------------------------------------------------------------- rule syntax


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ("- deny: {to: 10.0.0.0/33}", "2: rules[0].deny.to: '10.0.0.0/33' is not a network"),
        ("- deny: {to: [a.example, 10.0.0.1/8]}",
         "2: rules[0].deny.to[1]: '10.0.0.1/8' has host bits set (the network is 10.0.0.0/8)"),
        ("- deny: {to: 'bad name'}",
         "2: rules[0].deny.to: 'bad name' has characters not allowed in a host name "
         "(expected an IP, network, name, *.suffix, ~regex, special:NAME or file:PATH)"),
        ("- deny: {to: special:lan}",
         "2: rules[0].deny.to: unknown set 'special:lan' "
         "(expected one of: loopback, private, link-local, multicast, unspecified, self)"),
        ("- deny: {to: '~a[b'}",
         "2: rules[0].deny.to: '~a[b' is not a valid regular expression: "
         "unterminated character set at position 1"),
        ("- deny: {from: example.com}",
         "2: rules[0].deny.from: 'example.com' is not a network; "
         "'from' takes client IP addresses and networks"),
        ("- allow: {port: 70000}", "2: rules[0].allow.port: 70000 is above the maximum 65535"),
        ("- allow: {port: 2000-1000}",
         "2: rules[0].allow.port: '2000-1000': a range goes from a lower to a higher port, 0 to 65535"),
        ("- allow: {port: http}", "2: rules[0].allow.port: 'http' is not a port or a range like 1024-65535"),
        ("- allow: {command: associate}",
         "2: rules[0].allow.command: 'associate' is not one of: connect, bind, udp, resolve, resolve_ptr"),
        ("- allow: {user: no}",
         "2: rules[0].allow.user: 'no' is read as a boolean by YAML 1.1; write true/false, or quote it"),
        ("- allow: {users: alice}",
         "2: rules[0].allow.users: unknown key (expected one of: command, from, group, port, protocol, to, user)"),
        ("- allow: {to: []}",
         "2: rules[0].allow.to: an empty list matches nothing: remove the field or the rule"),
        ("- allow: {}", "2: rules[0].allow: no match fields: write 'allow: all' to match everything"),
        ("- allow: everything",
         "2: rules[0].allow: expected 'all' or a mapping of from, user, group, command, protocol, to, port"),
        ("- {allow: all, deny: all}", "2: rules[0]: a rule needs exactly one of 'allow:' or 'deny:'"),
        ("- allow: all\n  reply: 3", "3: rules[0].reply: only a denial has a reply code"),
        ("- deny: all\n  reply: 0", "3: rules[0].reply: 0 is not a failure reply code (1-8)"),
        ("- deny: all\n  reply: nope",
         "3: rules[0].reply: 'nope' is not a reply code (expected 1-8 or one of: general_failure, "
         "not_allowed, network_unreachable, host_unreachable, connection_refused, ttl_expired, "
         "command_not_supported, address_type_not_supported)"),
    ],
)  # fmt: skip
def test_rule_errors_are_located(rules, message):
    assert errors("rules:\n  " + rules.replace("\n", "\n  ") + "\n") == ["rules.yaml:" + message]


def test_every_bad_rule_is_reported_and_groups_and_tests_are_claimed():
    config = configure(
        "groups: {admins: [alice]}\n"
        "rules:\n"
        "  - deny: {to: 10.0.0.0/33}\n"
        "  - allow: {port: x, command: y}\n"
        "tests: []\n"
    )
    config.check_unclaimed()
    assert [str(e) for e in config.errors.errors] == [
        "rules.yaml:3: rules[0].deny.to: '10.0.0.0/33' is not a network",
        "rules.yaml:4: rules[1].allow.port: 'x' is not a port or a range like 1024-65535",
        "rules.yaml:4: rules[1].allow.command: 'y' is not one of: connect, bind, udp, resolve, resolve_ptr",
    ]


def test_tests_without_rules_is_an_error():
    assert errors("tests:\n  - {to: 'a.example:1', expect: deny}\n") == [
        "rules.yaml:1: tests: rule tests need a rules: section to test"
    ]


def test_no_rules_section_no_opinion():
    config = configure("groups: {admins: [alice]}\n")
    assert not config.errors and acl.RULES not in config.stash


@pytest.mark.parametrize(
    ("text", "reply"), [("host_unreachable", 4), ("Connection-Refused", 5), ("7", 7), (1, 1)]
)
def test_reply_codes(text, reply):
    rules = ruleset(f"rules:\n  - deny: all\n    reply: {text}\n    reason: closed\n")
    decision = check(rules, "192.0.2.1:80")
    assert decision.verdict() == Verdict.deny("closed", reply=Reply(reply), rule="rules.yaml:2")


# ---------------------------------------------------------------------------- evaluation


def test_first_match_wins_and_nothing_matched_denies():
    allow_first = ruleset("rules:\n  - allow: {port: 80}\n  - deny: {port: 80}\n")
    deny_first = ruleset("rules:\n  - deny: {port: 80}\n  - allow: {port: 80}\n")
    assert where(check(allow_first, "192.0.2.1:80")) == "allow rules.yaml:2"
    assert where(check(deny_first, "192.0.2.1:80")) == "deny rules.yaml:2"
    decision = check(allow_first, "192.0.2.1:81")
    assert where(decision) == "deny default" and decision.reason == NO_RULE_MATCHED
    assert decision.verdict() == Verdict.deny(NO_RULE_MATCHED, reply=Reply.NOT_ALLOWED)


def test_fields_and_across_or_within():
    rules = ruleset(
        "rules:\n"
        "  - allow: {from: [10.0.0.0/8, '2001:db8::/32'], port: [22, 8000-8999], command: [connect, bind]}\n"
    )
    assert check(rules, "192.0.2.1:22", client="10.1.1.1").allowed
    assert check(rules, "192.0.2.1:8500", client="2001:db8::7", command=Command.BIND).allowed
    assert check(rules, "192.0.2.1:8500", client="::ffff:10.0.0.9").allowed  # a dual-stack listener's client
    assert not check(rules, "192.0.2.1:23", client="10.1.1.1").allowed
    assert not check(rules, "192.0.2.1:22", client="11.1.1.1").allowed
    assert not check(rules, "192.0.2.1:22", client="10.1.1.1", command=Command.UDP_ASSOCIATE).allowed


def test_users_and_groups():
    rules = ruleset(
        "groups:\n  admins: [alice, bob]\n  ops: [carol]\n"
        "rules:\n"
        "  - deny: {user: bob, port: 22}\n"
        "  - allow: {group: admins}\n"
        "  - allow: {user: [dave, erin], port: 443}\n"
    )
    assert where(check(rules, "192.0.2.1:22", user="alice")) == "allow rules.yaml:6"
    assert where(check(rules, "192.0.2.1:22", user="bob")) == "deny rules.yaml:5"
    assert where(check(rules, "192.0.2.1:443", user="dave")) == "allow rules.yaml:7"
    assert where(check(rules, "192.0.2.1:80", user="dave")) == "deny default"
    assert where(check(rules, "192.0.2.1:80", user="carol")) == "deny default"
    from_login = frozenset({"admins"})  # groups an authentication plugin gave
    assert where(check(rules, "192.0.2.1:80", user="zed", groups=from_login)) == "allow rules.yaml:6"
    assert where(check(rules, "192.0.2.1:443")) == "deny default"  # no login, no user


def test_names_suffixes_and_patterns():
    rules = ruleset(
        "rules:\n"
        "  - deny: {to: [exact.example, '*.ads.example']}\n"
        "  - deny: {to: '~^track[0-9]+\\.'}\n"
        "  - deny: {to: 'regex:\\.onion$'}\n"
        "  - allow: all\n"
    )
    assert where(check(rules, "exact.example:80")) == "deny rules.yaml:2"
    assert where(check(rules, "www.exact.example:80")) == "allow rules.yaml:5"
    assert where(check(rules, "a.b.ads.example:80")) == "deny rules.yaml:2"
    assert where(check(rules, "ads.example:80")) == "allow rules.yaml:5"
    assert where(check(rules, "track42.example:443")) == "deny rules.yaml:3"
    assert where(check(rules, "mytrack42.example:443")) == "allow rules.yaml:5"
    assert where(check(rules, "abc.onion:80")) == "deny rules.yaml:4"


def test_names_in_rules_are_normalised_and_never_match_ip_literals():
    rules = ruleset("rules:\n  - deny: {to: [LOCALHOST., '*.Example.COM']}\n  - allow: all\n")
    assert where(check(rules, "localhost:80")) == "deny rules.yaml:2"
    assert where(check(rules, "www.example.com:80")) == "deny rules.yaml:2"
    assert where(check(rules, "127.0.0.1:80")) == "allow rules.yaml:3"


# ---------------------------------------------------------------------------- names and addresses


REBINDING = """
rules:
  - deny: {to: [special:loopback, special:private, special:link-local]}
    reason: internal
  - deny: {to: blocked.example}
  - allow: all
"""


@pytest.mark.parametrize(
    ("name", "answers"),
    [("localhost", ["127.0.0.1", "::1"]), ("outside.example", ["127.0.0.1"]),
     ("lan.example", ["192.168.1.10"]), ("meta.example", ["169.254.169.254"]),
     ("mapped.example", ["::ffff:127.0.0.1"])],
)  # fmt: skip
def test_ip_rules_check_what_a_name_resolves_to(name, answers):
    dns = FakeDNS({name: answers})
    decision = check(ruleset(REBINDING), f"{name}:80", dns=dns)
    assert where(decision) == "deny rules.yaml:3" and decision.reason == "internal"
    assert dns.lookups == [name]


def test_only_the_checked_addresses_are_used():
    dns = FakeDNS({"mixed.example": ["10.0.0.1", "192.0.2.1", "127.0.0.1", "2001:db8::1"]})
    decision = check(ruleset(REBINDING), "mixed.example:443", dns=dns)
    assert where(decision) == "allow rules.yaml:6"
    assert decision.addresses == (ip("192.0.2.1"), ip("2001:db8::1"))
    checked = (ip("192.0.2.1"), ip("2001:db8::1"))
    assert decision.verdict() == Verdict.allow(rule="rules.yaml:6", addresses=checked)
    assert dns.lookups == ["mixed.example"]


def test_a_name_is_resolved_only_when_a_rule_needs_addresses():
    rules = ruleset(
        "rules:\n  - deny: {to: '*.ads.example'}\n  - allow: {port: 443}\n  - deny: {to: 10.0.0.0/8}\n"
    )
    dns = FakeDNS({"x.example": ["192.0.2.1"]})
    assert where(check(rules, "x.ads.example:80", dns=dns)) == "deny rules.yaml:2"
    assert where(check(rules, "x.example:443", dns=dns)) == "allow rules.yaml:3"
    assert dns.lookups == []
    assert where(check(rules, "x.example:80", dns=dns)) == "deny default"
    assert dns.lookups == ["x.example"]
    query = Query(ip("127.0.0.1"), Address.parse("x.example:80"))
    assert evaluate(rules, query) == NeedAnswers(rules.rules[2])


def test_mixed_to_names_match_the_request_addresses_match_each_answer():
    rules = ruleset("rules:\n  - allow: {to: [good.example, 192.0.2.0/24]}\n")
    dns = FakeDNS({"good.example": ["203.0.113.1"], "other.example": ["192.0.2.9", "203.0.113.2"]})
    by_name = check(rules, "good.example:80", dns=dns)
    assert by_name.allowed and by_name.addresses is None and dns.lookups == []  # no address rule reached
    by_address = check(rules, "other.example:80", dns=dns)
    assert by_address.allowed and by_address.addresses == (ip("192.0.2.9"),)


def test_a_deny_removes_the_answers_it_matches_and_denies_when_none_is_left():
    rules = ruleset(
        "rules:\n"
        "  - deny: {to: 10.0.0.0/8}\n"
        "  - deny: {to: 192.168.0.0/16}\n"
        "  - allow: {to: 203.0.113.0/24}\n"
    )
    dns = FakeDNS({"a.example": ["10.0.0.1", "192.168.0.1"], "b.example": ["10.0.0.1", "198.51.100.1"],
                   "c.example": ["10.0.0.1", "203.0.113.5", "198.51.100.1"]})  # fmt: skip
    # the rule that removed the last address decides
    assert where(check(rules, "a.example:80", dns=dns)) == "deny rules.yaml:3"
    assert where(check(rules, "b.example:80", dns=dns)) == "deny default"  # 198.51.100.1: nothing matched
    decision = check(rules, "c.example:80", dns=dns)
    assert where(decision) == "allow rules.yaml:4" and decision.addresses == (ip("203.0.113.5"),)


def test_allowed_answers_and_later_rules_decide_the_rest():
    rules = ruleset(
        "rules:\n  - allow: {to: 203.0.113.0/24}\n  - deny: {to: 198.51.100.0/24}\n  - allow: all\n"
    )
    dns = FakeDNS({"n.example": ["198.51.100.1", "203.0.113.1", "192.0.2.1"]})
    decision = check(rules, "n.example:80", dns=dns)
    assert where(decision) == "allow rules.yaml:2"
    assert decision.addresses == (ip("203.0.113.1"), ip("192.0.2.1"))


def test_unresolvable_names():
    rules = ruleset(
        "rules:\n  - deny: {to: special:private}\n  - deny: {to: '*.ads.example'}\n  - allow: all\n"
    )
    decision = check(rules, "x.ads.example:80")  # the name rule still decides
    assert where(decision) == "deny rules.yaml:3" and decision.reply == Reply.NOT_ALLOWED
    decision = check(rules, "nx.example:80")
    assert where(decision) == "deny default" and decision.reply == Reply.HOST_UNREACHABLE
    assert decision.reason == "cannot resolve nx.example: nx.example: NXDOMAIN"
    decision = check(rules, "empty.example:80", dns=FakeDNS({"empty.example": []}))
    assert decision.reply == Reply.HOST_UNREACHABLE and decision.reason == "empty.example has no address"


# ---------------------------------------------------------------------------- UDP


UDP_RULES = """
rules:
  - deny: {to: special:loopback}
  - deny: {port: 25}
  - allow: {from: 10.0.0.0/8, port: 53}
  - deny: {from: 10.0.0.0/8}
  - allow: {command: udp, from: 192.0.2.0/24}
"""


def test_udp_associate_request_is_not_checked_as_a_destination():
    rules = ruleset(UDP_RULES)
    udp = Command.UDP_ASSOCIATE
    # 127.0.0.1:0 is where the client sends from: the to/port rules are about datagrams
    assert where(check(rules, "127.0.0.1:0", client="10.1.1.1", command=udp, association=True)) == (
        "allow rules.yaml:5"
    )
    assert where(check(rules, "0.0.0.0:0", client="192.0.2.7", command=udp, association=True)) == (
        "allow rules.yaml:7"
    )
    assert where(check(rules, "0.0.0.0:0", client="198.51.100.1", command=udp, association=True)) == (
        "deny default"
    )
    # ...and each datagram is checked with them
    assert where(check(rules, "127.0.0.1:53", client="10.1.1.1", command=udp)) == "deny rules.yaml:3"
    assert where(check(rules, "192.0.2.1:53", client="10.1.1.1", command=udp)) == "allow rules.yaml:5"
    assert where(check(rules, "192.0.2.1:54", client="10.1.1.1", command=udp)) == "deny rules.yaml:6"


class FakeSession:
    """What the ACL hooks read from a session."""

    def __init__(self, config: Config, dns: FakeDNS, user: str = "") -> None:
        self.config = config
        self.stash = Stash()
        self.client = Address.parse("10.1.1.1:5000")
        self.local = Address.parse("127.0.0.1:1080")
        self.identity = Identity(user)
        self.destination: Address | None = None
        self.protocol = "socks5"
        self.dns = dns
        self.id = "1"
        self.server = SimpleNamespace(stash=Stash(), shadow=None)  # what the hit counts and replay read
        self._resolved: dict[str, tuple] = {}

    async def resolve(self, host=None, port=None):
        host = host or self.destination.host
        self._resolved[host] = tuple(await self.dns.resolver(host)())
        return self._resolved[host]

    def resolved(self, host):
        return self._resolved.get(host)


def test_datagram_verdicts_are_remembered_per_destination(monkeypatch):
    config = configure(UDP_RULES)
    dns = FakeDNS({"dns.example": ["192.0.2.53"], "loop.example": ["127.0.0.1"]})
    session = FakeSession(config, dns)
    calls = []
    monkeypatch.setattr("socksflow_plugins.acl.sessions.evaluate", lambda *a: calls.append(a) or evaluate(*a))
    rules = config.stash[acl.RULES]
    first = decide_datagram(rules, session, Address.parse("192.0.2.1:53"))
    assert first == Verdict.allow(rule="rules.yaml:5")
    for _ in range(3):
        assert decide_datagram(rules, session, Address.parse("192.0.2.1:53")) is first
    assert len(calls) == 1
    denied = acl.socksflow_udp_datagram(session, Address.parse("127.0.0.1:53"))
    assert denied == Verdict.deny(rule="rules.yaml:3")
    named = Address.parse("dns.example:53")
    pending = acl.socksflow_udp_datagram(session, named)  # a coroutine: resolve first
    assert asyncio.run(pending) == Verdict.allow(rule="rules.yaml:5", addresses=(ip("192.0.2.53"),))
    assert acl.socksflow_udp_datagram(session, named).addresses == (ip("192.0.2.53"),)
    assert not asyncio.run(acl.socksflow_udp_datagram(session, Address.parse("loop.example:53"))).allowed
    assert dns.lookups == ["dns.example", "loop.example"]


def request_for(destination: str):
    return type("R", (), {"command": Command.CONNECT, "destination": Address.parse(destination)})()


def test_request_hook_uses_the_session_and_answers_at_once_without_dns():
    config = configure("groups: {ops: [carol]}\nrules:\n  - allow: {group: ops, to: special:self}\n")
    dns = FakeDNS()
    session = FakeSession(config, dns, user="carol")
    request = request_for("127.0.0.1:22")
    session.destination = request.destination
    assert decide_request(config.stash[acl.RULES], session, request).allowed
    assert acl.socksflow_request(session, request) == Verdict.allow(rule="rules.yaml:3")
    assert dns.lookups == []
    no_rules = FakeSession(configure("listen: [127.0.0.1:1]\n"), FakeDNS())
    assert acl.socksflow_request(no_rules, request) is None
    assert acl.socksflow_udp_datagram(no_rules, request.destination) is None


def test_request_hook_returns_a_coroutine_only_when_a_rule_needs_the_addresses():
    config = configure("rules:\n  - deny: {to: 192.0.2.0/24}\n  - allow: all\n")
    dns = FakeDNS({"blocked.example": ["192.0.2.7"], "fine.example": ["198.51.100.1"]})
    session = FakeSession(config, dns)
    for name, allowed in (("blocked.example", False), ("fine.example", True)):
        request = request_for(f"{name}:443")
        session.destination = request.destination
        pending = acl.socksflow_request(session, request)
        assert inspect.iscoroutine(pending)
        assert asyncio.run(pending).allowed is allowed
    assert dns.lookups == ["blocked.example", "fine.example"]


def request_with(command: Command, destination: str):
    return type("R", (), {"command": command, "destination": Address.parse(destination)})()


CACHED_RULES = """\
groups: {ops: [carol]}
rules:
  - deny: {user: bob}
  - deny: {group: ops, to: 192.0.2.9}
  - deny: {port: 25}
  - deny: {command: bind}
  - deny: {protocol: socks4}
  - deny: {from: 10.9.0.0/16}
  - deny: {to: special:self, port: 22}
  - deny: {to: ["*.blocked.example", 192.0.2.66]}
  - deny: {to: 198.51.100.0/24}
  - allow: all
"""


def test_a_kept_request_verdict_never_lets_a_different_request_through(monkeypatch):
    config = configure(CACHED_RULES)
    rules = config.stash[acl.RULES]
    dns = FakeDNS({"named.example": ["198.51.100.7"]})
    calls = []
    monkeypatch.setattr("socksflow_plugins.acl.sessions.evaluate", lambda *a: calls.append(a) or evaluate(*a))

    def decide_for(destination: str = "192.0.2.9:80", *, command: Command = Command.CONNECT, user: str = "",
                   client: str = "10.1.1.1:5000", local: str = "127.0.0.1:1080", protocol: str = "socks5"):  # fmt: skip
        session = FakeSession(config, dns, user)
        session.identity = Identity(user, config.groups_of(user))
        session.client, session.local, session.protocol = (
            Address.parse(client),
            Address.parse(local),
            protocol,
        )
        request = request_with(command, destination)
        session.destination = request.destination
        answer = decide_request(rules, session, request)
        return asyncio.run(answer) if inspect.iscoroutine(answer) else answer

    allowed = decide_for()
    assert allowed.allowed
    assert decide_for() is allowed and len(calls) == 1  # the same request again: kept, not evaluated
    # Each field a rule reads, changed alone, is decided afresh, and denied.
    assert decide_for(user="bob").rule == "rules.yaml:3"
    assert decide_for(user="carol").rule == "rules.yaml:4"  # by the groups the configuration gives
    assert decide_for("192.0.2.9:25").rule == "rules.yaml:5"
    assert decide_for(command=Command.BIND).rule == "rules.yaml:6"
    assert decide_for(protocol="socks4").rule == "rules.yaml:7"
    assert decide_for(client="10.9.1.1:5000").rule == "rules.yaml:8"
    assert decide_for("127.0.0.1:22", local="127.0.0.1:1080").rule == "rules.yaml:9"
    assert decide_for("127.0.0.2:22", local="127.0.0.2:1080").rule == "rules.yaml:9"
    assert decide_for("127.0.0.2:22", local="127.0.0.1:1080").allowed  # not this session's own address
    assert decide_for("[::ffff:192.0.2.66]:80").rule == "rules.yaml:10"  # an IPv6 form of a denied IPv4
    assert decide_for("a.blocked.example:80").rule == "rules.yaml:10"
    assert all(not decide_for(**case).allowed for case in (
        {"user": "bob"}, {"user": "carol"}, {"destination": "192.0.2.9:25"}, {"command": Command.BIND},
        {"protocol": "socks4"}, {"client": "10.9.1.1:5000"}, {"destination": "a.blocked.example:80"},
    ))  # fmt: skip  # and so they stay, kept
    # A verdict that needed the name resolved is not kept: the next session resolves it again.
    assert not decide_for("named.example:80").allowed
    assert not decide_for("named.example:80").allowed
    assert dns.lookups == ["named.example", "named.example"]
    hits = acl.rule_hits(config)
    assert hits is not None
    counts = {rule["rule"]: rule["hits"] for rule in hits["rules"]}
    assert counts["rules.yaml:3"] == 2 and counts["rules.yaml:12"] == 3  # kept verdicts count their rule too


def test_a_reload_starts_with_no_kept_verdicts(tmp_path):
    first = configure("rules:\n  - allow: all\n", tmp_path)
    session = FakeSession(first, FakeDNS())
    request = request_for("192.0.2.1:443")
    assert acl.socksflow_request(session, request).allowed
    assert first.stash[acl.RULES].decided  # kept for the rules in force
    reloaded = configure("rules:\n  - deny: {to: 192.0.2.1}\n  - allow: all\n", tmp_path)
    session.config = reloaded  # a session accepted after the reload sees the new configuration
    assert reloaded.stash[acl.RULES].decided == {}
    assert acl.socksflow_request(session, request) == Verdict.deny(rule=f"{tmp_path / 'rules.yaml'}:2")


# ---------------------------------------------------------------------------- lints


@pytest.mark.parametrize(
    ("rules", "shadowed"),
    [
        ("- allow: all\n- deny: {to: 10.0.0.0/8}", True),
        ("- deny: all\n- allow: {user: a}", True),
        ("- deny: {to: [10.0.0.0/8, '*.a.example']}\n"
         "- deny: {to: [10.1.0.0/16, x.a.example, '*.b.a.example']}", True),
        ("- allow: {from: 10.0.0.0/8, port: [80, 1000-2000]}\n"
         "- deny: {from: 10.9.0.0/16, port: 1500, user: a}", True),
        ("- deny: {to: special:private}\n- deny: {to: 192.168.1.1}", True),
        ("- allow: {to: 10.0.0.0/8}\n- deny: {to: 10.0.0.0/8, command: udp}", True),
        ("- allow: {group: g}\n- deny: {group: g, command: bind}", True),
        ("- deny: {to: 10.0.0.0/8}\n- deny: {to: x.example}", False),
        ("- deny: {to: '*.a.example'}\n- deny: {to: a.example}", False),
        ("- deny: {from: 10.1.0.0/16}\n- deny: {from: 10.0.0.0/8}", False),
        ("- deny: {user: a}\n- deny: {group: g}", False),
        ("- deny: {to: special:loopback}\n- deny: {to: special:self}", False),
        ("- deny: {to: '~ads'}\n- deny: {to: '~track'}", False),
        # a deny with to/port passes over UDP associations, which the later allow decides
        ("- deny: {to: 10.0.0.0/8}\n- allow: {to: 10.0.0.0/8}", False),
        ("- deny: {to: 10.0.0.0/8}\n- allow: {to: 10.0.0.0/8, command: connect}", True),
    ],
)  # fmt: skip
def test_shadowed_rules(rules, shadowed):
    text = "groups: {g: [a]}\nrules:\n" + "".join(f"  {line}\n" for line in rules.split("\n"))
    expected = (
        "rules.yaml:4: rules[1]: never matches: rules[0] (rules.yaml:3) comes first "
        "and matches everything this rule matches"
    )
    assert warnings(text) == ([expected] if shadowed else [])


def test_inline_overlaps_and_unknown_groups_are_lints():
    assert warnings(
        "rules:\n"
        "  - deny: {to: [10.0.0.0/8, special:loopback, 10.2.0.0/16, 127.0.0.1, 10.0.0.0/8]}\n"
        "  - allow: {group: admins}\n"
    ) == [
        "rules.yaml:2: rules[0].deny.to[4]: 10.0.0.0/8 is listed twice (first as to[0])",
        "rules.yaml:2: rules[0].deny.to: 10.2.0.0/16 overlaps 10.0.0.0/8 (to[0]), which holds it",
        "rules.yaml:3: rules[1].allow.group: group 'admins' is not in the groups: section "
        "(only an authentication plugin can set it)",
    ]


# ---------------------------------------------------------------------------- rule tests


def test_rule_test_errors_and_failures():
    config = configure(
        "rules:\n"
        "  - deny: {to: special:loopback}\n"
        "  - allow: {port: 443}\n"
        "tests:\n"
        "  - {to: 'localhost:80', answers: [127.0.0.1], expect: deny}\n"
        "  - {to: '192.0.2.1:443', expect: deny}\n"
        "  - {from: 10.0.0.1, to: 'a.example:80', answers: [192.0.2.1], expect: allow}\n"
        "  - {to: 'nx.example:443', expect: allow}\n"
        "  - {to: 'x', expect: allow}\n"
        "  - {to: 'a.example:1', expect: maybe}\n"
        "  - {to: 'a.example:1'}\n"
        "  - {from: a.example, to: 'a.example:1', expect: deny}\n"
    )
    assert [str(e) for e in config.errors.errors] == [
        "rules.yaml:9: tests[4].to: 'x' is not HOST:PORT",
        "rules.yaml:10: tests[5].expect: 'maybe' is not one of: allow, deny",
        "rules.yaml:11: tests[6]: a test needs 'expect:'",
        "rules.yaml:12: tests[7].from: 'a.example' is not an IP address",
    ]
    dns = FakeDNS()

    async def resolve(host, port):
        return await dns.resolver(host)()

    failures = asyncio.run(acl.socksflow_check(config, resolve))
    assert [str(e) for e in failures] == [
        "rules.yaml:6: tests[1]: expected deny, got allow by rules.yaml:3",
        "rules.yaml:7: tests[2]: expected allow, got deny: no rule matched (default: deny)",
        "rules.yaml:8: tests[3]: expected allow, got deny: cannot resolve nx.example: nx.example: NXDOMAIN",
    ]
    assert dns.lookups == ["nx.example"]  # answers: given in the test are used instead of DNS
