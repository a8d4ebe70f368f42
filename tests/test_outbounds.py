"""The outbound layer without upstreams: the sans-I/O clients byte for byte, the ``outbounds:``
section's located errors, routing in rules, rule tests and explain, and 0x07 for commands an
outbound cannot carry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h11
import pytest

from socksflow import Address, Command, Reply
from socksflow.app import prepare
from socksflow.clients import Receive, ReceiveHead, Send, basic_authorization, http_connect, socks4, socks5
from socksflow.errors import ConfigErrors
from socksflow.outbound import OUTBOUNDS, OutboundError
from socksflow.testing import Socks5Client

pytestmark = pytest.mark.smoke


def drive(handshake, answers: bytes) -> tuple[bytes, object]:
    """Run a handshake against the proxy's ``answers``: what it sent, and its result."""
    sent = b""
    answer = None
    step = next(handshake)
    try:
        while True:
            if isinstance(step, Send):
                sent += step.data
                answer = b""
            elif isinstance(step, Receive):
                answer, answers = answers[: step.size], answers[step.size :]
                assert len(answer) == step.size, "the handshake asked for more than the proxy sent"
            else:
                assert isinstance(step, ReceiveHead)
                end = answers.index(b"\r\n\r\n") + 4
                answer, answers = answers[:end], answers[end:]
            step = handshake.send(answer)
    except StopIteration as done:
        assert answers == b"" or answers == b"FIRST BYTES", "read past the proxy's answer"
        return sent, done.value


# --------------------------------------------------------------------------- SOCKS5


def test_socks5_login_and_connect_bytes() -> None:
    handshake = socks5(Command.CONNECT, Address("example.com", 443), b"alice", b"pw")
    answers = b"\x05\x02" + b"\x01\x00" + b"\x05\x00\x00\x01\x7f\x00\x00\x02\x1f\x90" + b"FIRST BYTES"
    sent, bound = drive(handshake, answers)
    assert sent == (b"\x05\x02\x00\x02" + b"\x01\x05alice\x02pw" + b"\x05\x01\x00\x03\x0bexample.com\x01\xbb")
    assert bound == Address.parse("127.0.0.2:8080")


@pytest.mark.parametrize("code", [1, 2, 3, 4, 5, 6, 7, 8])
def test_socks5_refusal_keeps_the_upstreams_code(code: int) -> None:
    handshake = socks5(Command.CONNECT, Address.parse("192.0.2.1:80"))
    with pytest.raises(OutboundError) as raised:
        drive(handshake, b"\x05\x00" + bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0)))
    assert raised.value.reply == code and not raised.value.upstream_down


@pytest.mark.parametrize(
    "answers",
    [b"\x05\x02\x01\x01", b"\x05\xff", b"\x05\x02"],
    ids=["bad-password", "no-method", "no-credentials"],
)
def test_socks5_failed_login_is_0x01_and_the_upstreams_fault(answers: bytes) -> None:
    credentials = (b"u", b"p") if answers != b"\x05\x02" else (None, None)
    with pytest.raises(OutboundError) as raised:
        drive(socks5(Command.CONNECT, Address.parse("192.0.2.1:80"), *credentials), answers)
    assert raised.value.reply == Reply.GENERAL_FAILURE and raised.value.upstream_down
    assert "login failed" in str(raised.value) and "p" not in str(raised.value).split("login failed")[1][:3]


def test_socks5_reply_with_ipv6_and_domain_bound_addresses() -> None:
    ipv6 = b"\x05\x00\x00\x04" + bytes(15) + b"\x01" + b"\x00\x50"
    assert drive(socks5(Command.CONNECT, Address.parse("[::1]:80")), b"\x05\x00" + ipv6)[1] == Address.parse(
        "[::1]:80"
    )
    domain = b"\x05\x00\x00\x03\x04host\x00\x50"
    assert drive(socks5(Command.CONNECT, Address.parse("1.2.3.4:80")), b"\x05\x00" + domain)[1] == Address(
        "host", 80
    )


def test_socks5_from_something_else_is_the_upstreams_fault() -> None:
    with pytest.raises(OutboundError) as raised:
        drive(socks5(Command.CONNECT, Address.parse("192.0.2.1:80")), b"HT")
    assert raised.value.upstream_down and raised.value.reply == Reply.GENERAL_FAILURE


# --------------------------------------------------------------------------- SOCKS4 / 4a


def test_socks4_and_socks4a_bytes() -> None:
    sent, bound = drive(socks4(Address.parse("192.0.2.1:80"), b"me"), b"\x00\x5a\x00\x50\xc0\x00\x02\x01")
    assert sent == b"\x04\x01\x00\x50\xc0\x00\x02\x01me\x00"
    assert bound == Address.parse("192.0.2.1:80")
    sent, _ = drive(socks4(Address("example.com", 443)), b"\x00\x5a" + bytes(6))
    assert sent == b"\x04\x01\x01\xbb\x00\x00\x00\x01\x00example.com\x00"


def test_socks4_refusal_and_ipv6() -> None:
    with pytest.raises(OutboundError) as raised:
        drive(socks4(Address.parse("192.0.2.1:80")), b"\x00\x5b" + bytes(6))
    assert raised.value.reply == Reply.CONNECTION_REFUSED
    with pytest.raises(OutboundError) as raised:
        next(socks4(Address.parse("[::1]:80")))
    assert raised.value.reply == Reply.ADDRESS_TYPE_NOT_SUPPORTED


# --------------------------------------------------------------------------- HTTP CONNECT


def test_http_connect_bytes_with_basic_auth() -> None:
    authorization = basic_authorization("bob", "pa55")
    sent, bound = drive(
        http_connect(Address("example.com", 443), authorization),
        b"HTTP/1.1 200 Connection established\r\nProxy-agent: x\r\n\r\nFIRST BYTES",
    )
    assert sent == (
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n"
        b"Proxy-Authorization: Basic Ym9iOnBhNTU=\r\n\r\n"
    )
    assert bound == Address.parse("0.0.0.0:0")


@pytest.mark.parametrize(
    ("status", "reply", "down"),
    [(407, 1, True), (403, 2, False), (502, 5, False), (503, 5, False), (504, 6, False), (418, 1, False)],
)
def test_http_connect_statuses(status: int, reply: int, down: bool) -> None:
    with pytest.raises(OutboundError) as raised:
        drive(
            http_connect(Address.parse("192.0.2.1:443")),
            f"HTTP/1.1 {status} No\r\nContent-Length: 0\r\n\r\n".encode(),
        )
    assert (raised.value.reply, raised.value.upstream_down) == (reply, down)


def test_http_connect_ipv6_target_and_garbage() -> None:
    sent, _ = drive(http_connect(Address.parse("[2001:db8::1]:443")), b"HTTP/1.0 200 OK\r\n\r\n")
    assert sent.startswith(b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\n")
    with pytest.raises(OutboundError) as raised:
        drive(http_connect(Address.parse("192.0.2.1:443")), b"SSH-2.0-OpenSSH\r\n\r\n")
    assert raised.value.upstream_down
    assert h11  # the parser behind it


# --------------------------------------------------------------------------- the section


def load(tmp_path: Path, text: str):
    (tmp_path / "rules.yaml").write_text(text, encoding="utf-8")
    return prepare(tmp_path / "rules.yaml")


def errors_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigErrors) as raised:
        load(tmp_path, text)
    return [str(error).replace(str(tmp_path) + "/", "") for error in raised.value.errors]


def test_located_errors(tmp_path: Path) -> None:
    text = (
        "outbounds:\n"
        "  a: {socks5: 127.0.0.1:1081}\n"
        "  loop1: {chain: [a, loop2]}\n"
        "  loop2: {chain: [loop1]}\n"
        "  empty: {fallback: []}\n"
        "  lost: {balance: [a, nowhere]}\n"
        "  two: {socks5: 127.0.0.1:1, http: 127.0.0.1:2}\n"
        "  odd: {socks5: 127.0.0.1:1, colour: blue}\n"
        "rules:\n"
        "  - allow: all\n"
        "    via: corp\n"
        "  - deny: all\n"
        "    via: a\n"
    )
    assert errors_of(tmp_path, text) == [
        "rules.yaml:3: outbounds.loop1.chain: outbounds loop: loop1 → loop2 → loop1",
        "rules.yaml:4: outbounds.loop2.chain: outbounds loop: loop2 → loop1 → loop2",
        "rules.yaml:5: outbounds.empty.fallback: a fallback group needs at least one member",
        "rules.yaml:6: outbounds.lost.balance: no outbound named 'nowhere' "
        "(defined: a, direct, empty, loop1, loop2, lost, odd, two)",
        "rules.yaml:7: outbounds.two: an outbound needs exactly one kind: "
        "socks5, socks4, http, ssh, reject, chain, fallback, balance, fastest",
        "rules.yaml:8: outbounds.odd.colour: unknown key 'colour' for a socks5 outbound "
        "(expected: dns, password, password_file, username)",
        "rules.yaml:11: rules[0].via: no outbound named 'corp' "
        "(defined: direct, a, loop1, loop2, empty, lost, two, odd)",
        "rules.yaml:13: rules[1].via: only an allow rule has an outbound",
    ]


def test_a_config_without_outbounds_knows_only_direct(tmp_path: Path) -> None:
    assert errors_of(tmp_path, "rules:\n  - allow: all\n    via: corp\n") == [
        "rules.yaml:3: rules[0].via: no outbound named 'corp' (defined: direct)"
    ]
    config, _ = load(tmp_path, "rules:\n  - allow: all\n    via: direct\n")
    assert config.stash.get(OUTBOUNDS) is None


def check(tmp_path: Path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "rules.yaml").write_text(text, encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "socksflow", *args], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )


ROUTES = """\
outbounds:
  corp: {socks5: 127.0.0.1:1081}
  a: {socks5: 127.0.0.1:1082}
  b: {http: 127.0.0.1:1083}
  pool: {fallback: [a, b]}
rules:
  - allow: {to: ["*.corp.example"], command: connect}
    via: corp
  - allow: {user: carol, command: connect}
    via: pool
  - allow: {command: connect}
tests:
  - {to: "wiki.corp.example:443", answers: [10.1.2.3], expect: allow, via: corp}
  - {user: carol, to: "192.0.2.1:443", expect: allow, via: pool}
  - {to: "192.0.2.1:443", expect: allow, via: direct}
"""


def test_rule_tests_check_the_route(tmp_path: Path) -> None:
    result = check(tmp_path, ROUTES, "check", "rules.yaml")
    assert (result.returncode, result.stdout, result.stderr) == (0, "rules.yaml: OK, 3 tests passed\n", "")
    wrong = ROUTES + '  - {to: "192.0.2.1:443", expect: allow, via: corp}\n'
    result = check(tmp_path, wrong, "check", "rules.yaml")
    assert result.returncode == 1
    assert (
        result.stderr
        == "rules.yaml:16: tests[3]: expected allow via corp, got allow by rules.yaml:11 (via direct)\n"
        "rules.yaml: 1 of 4 tests failed\n"
    )


def test_check_warns_about_commands_an_outbound_cannot_carry(tmp_path: Path) -> None:
    text = ROUTES.replace(
        '  - allow: {to: ["*.corp.example"], command: connect}', '  - allow: {to: ["*.corp.example"]}'
    ).replace("corp: {socks5: 127.0.0.1:1081}", "corp: {http: 127.0.0.1:1081}")
    result = check(tmp_path, text, "check", "rules.yaml")
    assert result.returncode == 0
    assert result.stderr == (
        "warning: rules.yaml:7: rules[0].via: outbound 'corp' cannot carry bind, udp: those requests "
        "get 0x07 (narrow the rule with command: connect)\n"
    )


def test_explain_prints_the_outbound_and_the_group_member(tmp_path: Path) -> None:
    result = check(tmp_path, ROUTES, "explain", "-c", "rules.yaml", "--user", "carol", "192.0.2.1:443")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "verdict: allow by rules.yaml:9 via pool" in lines
    assert "outbound: pool (fallback group of a, b; would use a now (a up, b up))" in lines
    result = check(tmp_path, ROUTES, "explain", "-c", "rules.yaml", "192.0.2.1:443")
    assert "outbound: direct" in result.stdout.splitlines()


def test_udp_and_bind_through_an_upstream_get_0x07(socksflow_server, caplog) -> None:
    server = socksflow_server(
        "outbounds:\n  corp: {http: 127.0.0.1:9}\nrules:\n  - allow: all\n    via: corp\n"
    )
    with caplog.at_level("WARNING"):
        with Socks5Client(server.address) as client:
            client.greet()
            assert client.udp_associate()[0] == 0x07
        with Socks5Client(server.address) as client:
            client.greet()
            assert client.bind()[0] == 0x07
    assert "outbound 'corp' cannot carry udp (rule " in caplog.text  # naming the rule: rules.yaml:5
    assert "outbound 'corp' cannot carry bind (rule " in caplog.text
    assert caplog.text.count("rules.yaml:5): refused with 0x07") == 2


def test_bind_through_a_chain_of_socks5_hops_gets_0x07(socksflow_server, tmp_path: Path, caplog) -> None:
    # each hop could carry BIND alone; a chain does not (documented in docs/howto/outbounds.md)
    text = (
        "outbounds:\n  a: {socks5: 127.0.0.1:1081}\n  b: {socks5: 127.0.0.1:1082}\n  ab: {chain: [a, b]}\n"
        "rules:\n  - allow: {command: bind}\n    via: ab\n"
    )
    result = check(tmp_path, text, "check", "rules.yaml")
    assert "rules[0].via: outbound 'ab' cannot carry bind: those requests get 0x07" in result.stderr
    server = socksflow_server(text)
    with caplog.at_level("WARNING"), Socks5Client(server.address) as client:
        client.greet()
        assert client.bind()[0] == 0x07
    assert "outbound 'ab' cannot carry bind (rule " in caplog.text


def test_a_chain_carries_udp_only_when_every_hop_does(tmp_path: Path) -> None:
    text = (
        "outbounds:\n  a: {socks5: 127.0.0.1:1081}\n  b: {socks5: 127.0.0.1:1082}\n  w: {http: 127.0.0.1:1083}\n"
        "  ab: {chain: [a, b]}\n  aw: {chain: [a, w]}\n"
        "rules:\n  - allow: {user: x, command: udp}\n    via: ab\n  - allow: {command: udp}\n    via: aw\n"
    )
    result = check(tmp_path, text, "check", "rules.yaml")
    assert result.returncode == 0
    assert result.stderr == (
        "warning: rules.yaml:10: rules[1].via: outbound 'aw' cannot carry udp: those requests get 0x07"
        " (narrow the rule with command: connect)\n"
    )


# --------------------------------------------------------------------------- groups, without I/O


def group(kind: str, **kwargs: object):
    from socksflow_plugins.outbounds.groups import Group

    return Group("g", kind, ("a", "b", "c"), lambda name: None, **kwargs)  # type: ignore[arg-type]


def test_fallback_order_puts_down_members_last() -> None:
    pool = group("fallback")
    destination = Address.parse("192.0.2.1:443")
    assert pool.order(destination, "") == ["a", "b", "c"]
    pool.mark_down("a", "refused")
    assert pool.order(destination, "") == ["b", "c", "a"]  # still tried once when all else fails
    pool.record("a", 0.01)
    assert pool.order(destination, "") == ["a", "b", "c"]


def test_failures_before_down() -> None:
    from socksflow_plugins.outbounds.groups import Health

    pool = group("fallback", health=Health(failures=2))
    pool.record("a", None, "timed out")
    assert pool.states["a"].up
    pool.record("a", None, "timed out")
    assert not pool.states["a"].up


def test_balance_round_robin_and_hashes() -> None:
    destination = Address.parse("192.0.2.1:443")
    turns = group("balance")
    assert [turns.order(destination, "")[0] for _ in range(4)] == ["a", "b", "c", "a"]
    by_user = group("balance", hash_on="user")
    firsts = {user: by_user.order(destination, user)[0] for user in ("alice", "bob", "carol", "dave", "erin")}
    assert all(by_user.order(destination, user)[0] == first for user, first in firsts.items())  # sticky
    assert len(set(firsts.values())) > 1  # and spread
    chosen = firsts["alice"]
    by_user.mark_down(chosen, "gone")
    others = {user: by_user.order(destination, user)[0] for user in firsts}
    assert others["alice"] != chosen
    assert all(others[user] == first for user, first in firsts.items() if first != chosen)  # only alice moved


def test_fastest_switches_only_beyond_the_tolerance() -> None:
    destination = Address.parse("192.0.2.1:443")
    quick = group("fastest", tolerance=0.05)
    for name, latency in (("a", 0.30), ("b", 0.10), ("c", 0.20)):
        quick.record(name, latency)
    assert quick.order(destination, "")[0] == "b"
    quick.record("a", 0.08)  # faster than b, but by less than the tolerance: stay
    assert quick.order(destination, "")[0] == "b"
    quick.record("c", 0.01)
    assert quick.order(destination, "")[0] == "c"


def test_a_plugin_registers_a_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from socksflow import outbound
    from socksflow.outbound import Reject

    def fixed(name, node, fields, context):
        return Reject(name, Reply(node.as_int(minimum=1, maximum=8)))

    monkeypatch.setitem(outbound._KINDS, "fixed", fixed)
    config, _ = load(tmp_path, "outbounds:\n  mine: {fixed: 5}\nrules:\n  - allow: all\n    via: mine\n")
    assert config.stash[OUTBOUNDS]["mine"] == Reject("mine", Reply.CONNECTION_REFUSED)


def test_ssh_and_secret_files_are_checked_when_loading(tmp_path: Path) -> None:
    text = (
        "outbounds:\n"
        "  s: {ssh: 127.0.0.1:22, user: me, key: missing.key, known_hosts: none}\n"
        "  t: {ssh: 127.0.0.1:22, user: me, key: missing.key}\n"
        "  p: {socks5: 127.0.0.1:1080, username: u, password_file: nowhere.secret}\n"
        "  q: {socks5: 127.0.0.1:1080, username: u}\n"
    )
    assert errors_of(tmp_path, text) == [
        "rules.yaml:2: outbounds.s.key: cannot read missing.key: No such file or directory",
        "rules.yaml:3: outbounds.t.ssh: an ssh outbound needs 'known_hosts:' (known_hosts: none turns host checks off)",
        "rules.yaml:4: outbounds.p.password_file: cannot read nowhere.secret: No such file or directory",
        "rules.yaml:5: outbounds.q.socks5: give both 'username' and a password, or neither",
    ]
