"""``socksflow check`` and ``socksflow explain`` with the ACL plugin, run as the operator runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Names resolve through this plugin only: no test reaches the machine's resolver.
FAKE_DNS = """
import ipaddress
from socksflow import ResolveError, hookimpl

ANSWERS = {
    "localhost": ["127.0.0.1", "::1"],
    "outside.example": ["127.0.0.1"],
    "www.example.com": ["93.184.215.14", "10.1.2.3"],
}


@hookimpl
def socksflow_resolve(host, port):
    if host not in ANSWERS:
        raise ResolveError(f"{host}: NXDOMAIN")
    return [ipaddress.ip_address(a) for a in ANSWERS[host]]
"""

RULES = """\
listen: [127.0.0.1:1080]
groups:
  admins: [alice]
rules:
  - deny: {to: ["*.doubleclick.net", "file:blocklist.txt"]}
    reason: blocklist
  - deny: {to: [special:loopback, special:private, special:link-local, special:self]}
    reason: internal networks
  - allow: {from: [127.0.0.0/8, "::1"], port: [80, 443]}
  - allow: {group: admins}
tests:
  - {to: "localhost:80", expect: deny}
  - {to: "www.example.com:443", expect: allow}
  - {to: "ads.example:443", expect: deny}
  - {from: 192.0.2.1, user: alice, to: "192.0.2.80:22", expect: allow}
"""

BLOCKLIST = "# ads\n0.0.0.0 ads.example\n*.tracker.example\n198.51.100.0/24\n"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "fake_dns.py").write_text(FAKE_DNS, encoding="utf-8")
    (tmp_path / "blocklist.txt").write_text(BLOCKLIST, encoding="utf-8")
    (tmp_path / "rules.yaml").write_text(RULES, encoding="utf-8")
    return tmp_path


def socksflow(workdir: Path, *args: str, autoload: bool = False) -> subprocess.CompletedProcess[str]:
    """``python -m socksflow ARGS`` in ``workdir``, with only the ACL plugin and the fake resolver."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOCKSFLOW_")}
    if not autoload:
        env["SOCKSFLOW_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        env["SOCKSFLOW_PLUGINS"] = f"socksflow_plugins.acl,{workdir / 'fake_dns.py'}"
    return subprocess.run(
        [sys.executable, "-m", "socksflow", *args], cwd=workdir, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def test_check_passes(workdir):
    result = socksflow(workdir, "check", "rules.yaml")
    assert (result.returncode, result.stdout, result.stderr) == (0, "rules.yaml: OK, 4 tests passed\n", "")


def test_check_reports_every_error_located(workdir):
    (workdir / "rules.yaml").write_text(
        "rules:\n"
        "  - deny: {to: [10.0.0.0/33, special:lan]}\n"
        "  - allow: {from: 127.0.0.1, port: 1024-99999}\n"
        "  - allow: {user: alice, command: udp_associate}\n"
        "  - allow: {to: file:missing.txt}\n"
        "  - deny: all\n"
        "    reply: nope\n"
        "tests:\n"
        "  - {to: 'localhost', expect: deny}\n",
        encoding="utf-8",
    )
    result = socksflow(workdir, "check", "rules.yaml")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "rules.yaml:2: rules[0].deny.to[0]: '10.0.0.0/33' is not a network",
        "rules.yaml:3: rules[1].allow.port: '1024-99999': "
        "a range goes from a lower to a higher port, 0 to 65535",
        "rules.yaml:4: rules[2].allow.command: 'udp_associate' is not one of: connect, bind, udp, resolve, resolve_ptr",
        "rules.yaml:5: rules[3].allow.to: cannot read list file 'missing.txt': No such file or directory",
        "rules.yaml:7: rules[4].reply: 'nope' is not a reply code (expected 1-8 or one of: general_failure, "
        "not_allowed, network_unreachable, host_unreachable, connection_refused, ttl_expired, "
        "command_not_supported, address_type_not_supported)",
        "rules.yaml:9: tests[0].to: 'localhost' is not HOST:PORT",
    ]


def test_check_runs_the_rule_tests(workdir):
    text = RULES + (
        '  - {to: "outside.example:80", expect: allow}\n'
        '  - {from: 192.0.2.1, to: "192.0.2.80:443", expect: allow}\n'
        '  - {to: "x.tracker.example:443", answers: [192.0.2.9], expect: allow}\n'
        '  - {to: "nowhere.example:443", expect: allow}\n'
    )
    (workdir / "rules.yaml").write_text(text, encoding="utf-8")
    result = socksflow(workdir, "check", "rules.yaml")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        "rules.yaml:16: tests[4]: expected allow, got deny by rules.yaml:7",
        "rules.yaml:17: tests[5]: expected allow, got deny: no rule matched (default: deny)",
        "rules.yaml:18: tests[6]: expected allow, got deny by rules.yaml:5",
        "rules.yaml:19: tests[7]: expected allow, "
        "got deny: cannot resolve nowhere.example: nowhere.example: NXDOMAIN",
        "rules.yaml: 4 of 8 tests failed",
    ]


def test_check_prints_lints_as_warnings(workdir):
    (workdir / "nets.txt").write_text("10.0.0.0/8\n10.20.0.0/16\n", encoding="utf-8")
    (workdir / "rules.yaml").write_text(
        "rules:\n"
        "  - deny: {to: file:nets.txt}\n"
        "  - allow: {port: [80, 443]}\n"
        "  - deny: {port: 443, from: 127.0.0.1}\n"
        "  - allow: all\n"
        "  - deny: {user: mallory}\n",
        encoding="utf-8",
    )
    result = socksflow(workdir, "check", "rules.yaml")
    assert (result.returncode, result.stdout) == (0, "rules.yaml: OK (it has no tests)\n")
    assert result.stderr.splitlines() == [
        "warning: rules.yaml:2: rules[0].deny.to: nets.txt:2: "
        "10.20.0.0/16 overlaps 10.0.0.0/8 (line 1), which holds it",
        "warning: rules.yaml:4: rules[2]: never matches: rules[1] (rules.yaml:3) comes first "
        "and matches everything this rule matches",
        "warning: rules.yaml:6: rules[4]: never matches: rules[3] (rules.yaml:5) comes first "
        "and matches everything this rule matches",
    ]


def test_explain_an_allowed_destination(workdir):
    result = socksflow(workdir, "explain", "-c", "rules.yaml", "www.example.com:443")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        "rules.yaml: connect www.example.com:443 from 127.0.0.1",
        "  DNS: www.example.com -> 93.184.215.14, 10.1.2.3 (needed by rules.yaml:5)",
        "  rules.yaml:5 deny (blocklist): no match: none of 93.184.215.14, 10.1.2.3 is in "
        "[*.doubleclick.net, file:blocklist.txt]",
        "  rules.yaml:7 deny (internal networks): removes 10.1.2.3 in special:private",
        "    still to decide: 93.184.215.14",
        "  rules.yaml:9 allow: matches: client 127.0.0.1 in 127.0.0.0/8, port 443",
        "verdict: allow by rules.yaml:9",
        "addresses used: 93.184.215.14 (only these are dialled)",
        "reply: 0x00 SUCCEEDED once the connection is made",
    ]


def test_explain_a_denied_destination(workdir):
    result = socksflow(workdir, "explain", "-c", "rules.yaml", "--from", "192.0.2.1", "--user", "bob",
                       "outside.example:8080")  # fmt: skip
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        "rules.yaml: connect outside.example:8080 from 192.0.2.1 (user bob)",
        "  DNS: outside.example -> 127.0.0.1 (needed by rules.yaml:5)",
        "  rules.yaml:5 deny (blocklist): no match: "
        "none of 127.0.0.1 is in [*.doubleclick.net, file:blocklist.txt]",
        "  rules.yaml:7 deny (internal networks): removes 127.0.0.1 in special:loopback",
        "verdict: deny by rules.yaml:7 (internal networks)",
        "reply: 0x02 NOT_ALLOWED",
    ]


def test_explain_default_deny_and_blocklist(workdir):
    result = socksflow(workdir, "explain", "-c", "rules.yaml", "--from", "192.0.2.1", "198.51.100.7:443")
    assert result.stdout.splitlines() == [
        "rules.yaml: connect 198.51.100.7:443 from 192.0.2.1",
        "  rules.yaml:5 deny (blocklist): matches 198.51.100.7 in blocklist.txt:4",
        "verdict: deny by rules.yaml:5 (blocklist)",
        "reply: 0x02 NOT_ALLOWED",
    ]
    result = socksflow(workdir, "explain", "-c", "rules.yaml", "--from", "192.0.2.1", "--command", "bind",
                       "192.0.2.80:443")  # fmt: skip
    assert result.stdout.splitlines()[-3:] == [
        "  end of rules: no rule matched 192.0.2.80",
        "verdict: deny: no rule matched (default: deny)",
        "reply: 0x02 NOT_ALLOWED",
    ]


def test_the_plugin_is_an_entry_point(workdir):
    result = socksflow(workdir, "plugins", "--json", autoload=True)
    assert result.returncode == 0, result.stderr
    assert '"name": "acl"' in result.stdout and '"socksflow_udp_datagram"' in result.stdout


def test_explain_takes_the_rule_files_spelling_of_udp(workdir):
    """Issue #13: ``--command`` took only ``udp_associate`` while rules.yaml and explain say ``udp``."""
    results = [
        socksflow(workdir, "explain", "-c", "rules.yaml", "--command", spelling, "192.0.2.7:53")
        for spelling in ("udp", "udp_associate")
    ]
    assert results[0].returncode == 0, results[0].stderr
    assert results[0].stdout.splitlines()[0] == "rules.yaml: a UDP datagram to 192.0.2.7:53 from 127.0.0.1"
    assert results[1].stdout == results[0].stdout


def test_explain_and_tests_with_a_protocol(workdir):
    first = "  - deny: {protocol: [http, socks4], port: 22}\n    reason: no SSH over the legacy doors\n"
    rules = (workdir / "rules.yaml").read_text().replace("rules:\n", "rules:\n" + first, 1)
    rules += '  - {from: 192.0.2.1, user: alice, protocol: http, to: "192.0.2.80:22", expect: deny}\n'
    (workdir / "rules.yaml").write_text(rules)
    result = socksflow(workdir, "check", "rules.yaml")
    assert (result.returncode, result.stdout, result.stderr) == (0, "rules.yaml: OK, 5 tests passed\n", "")
    args = ("explain", "-c", "rules.yaml", "--from", "192.0.2.1", "--user", "alice", "192.0.2.80:22")
    lines = socksflow(workdir, *args, "--protocol", "http").stdout.splitlines()
    assert lines[0] == "rules.yaml: connect 192.0.2.80:22 from 192.0.2.1 (user alice) over http"
    assert lines[-2:] == ["verdict: deny by rules.yaml:5 (no SSH over the legacy doors)", "reply: HTTP 403"]
    lines = socksflow(workdir, *args, "--protocol", "socks4").stdout.splitlines()
    assert lines[-1] == "reply: 0x5b REJECTED"
    lines = socksflow(workdir, *args).stdout.splitlines()
    assert "protocol socks5 is not [http, socks4]" in lines[1]
    assert lines[-1] == "reply: 0x00 SUCCEEDED once the connection is made"
    rules += '  - {protocol: socks4, to: "192.0.2.80:22", expect: allow}\n'
    (workdir / "rules.yaml").write_text(rules)
    result = socksflow(workdir, "check", "rules.yaml")
    assert result.returncode == 1 and "expected allow, got deny" in result.stderr
