"""Routing through real upstreams on loopback: microsocks, danted, tinyproxy, OpenSSH's sshd, socksflow.

Each upstream binds its outgoing side to its own 127.0.0.x where it can, and the target
answers the address it saw: the body proves which way the session went.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import time

import pytest
from helpers import require_tool
from test_log import lines
from upstreams import (
    DANTED_SOURCE,
    MICROSOCKS_SOURCE,
    TINYPROXY_SOURCE,
    curl,
    danted,
    free_port,
    http_target,
    microsocks,
    slowed,
    sshd,
    tinyproxy,
    tls_front,
)

from socksflow import Address, hookimpl
from socksflow.testing import Socks5Client, wait_until


def routed(outbounds: str, via: str) -> str:
    return f"outbounds:\n{outbounds}\nrules:\n  - allow: all\n    via: {via}\n"


def home(ssh) -> str:
    """The outbound 'home': the test's sshd, with its user key and known_hosts."""
    return (
        f"  home: {{ssh: {ssh.upstream.address}, user: {ssh.user}, key: {ssh.key},"
        f" known_hosts: {ssh.known_hosts}}}"
    )


def peer_through(server, target, host: str = "localhost") -> str:
    result = curl(_text(server), target.url("peer", host))
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


@pytest.fixture
def target():
    with http_target() as running:
        yield running


def _text(server) -> str:
    return f"{server.host}:{server.port}"


def connect_reply(server, destination: str) -> tuple[int, object]:
    """The reply code and BND address socksflow answers a CONNECT with."""
    with Socks5Client(server.address) as client:
        client.greet()
        return client.connect(destination)


def _connect_code(server, destination: str) -> int:
    return connect_reply(server, destination)[0]


# --------------------------------------------------------------------------- each kind


def test_socks5_upstream_with_login_carries_the_session(socksflow_server, target) -> None:
    with microsocks("alice", "s3cret") as upstream:
        server = socksflow_server(
            routed(f"  up: {{socks5: {upstream.address}, username: alice, password: s3cret}}", "up")
        )
        assert peer_through(server, target) == MICROSOCKS_SOURCE


def test_socks5_upstream_without_login_danted(socksflow_server, target, tmp_path) -> None:
    with danted(tmp_path) as upstream:
        server = socksflow_server(routed(f"  up: {{socks5: {upstream.address}}}", "up"))
        assert peer_through(server, target) == DANTED_SOURCE


def test_socks4_upstream_danted(socksflow_server, target, tmp_path) -> None:
    # Dante speaks SOCKS4 but not 4a: a name is resolved here first (dns: local)
    with danted(tmp_path) as upstream:
        server = socksflow_server(routed(f"  up: {{socks4: {upstream.address}, dns: local}}", "up"))
        assert peer_through(server, target, "127.0.0.1") == DANTED_SOURCE
        assert peer_through(server, target, "localhost") == DANTED_SOURCE


def test_http_connect_upstream_with_basic_auth(socksflow_server, target, tmp_path) -> None:
    with tinyproxy(tmp_path, "bob", "pa55") as upstream:
        server = socksflow_server(routed(f'  web: {{http: "http://bob:pa55@{upstream.address}"}}', "web"))
        assert peer_through(server, target) == TINYPROXY_SOURCE


def test_ssh_upstream_one_connection_for_many_tunnels(socksflow_server, target, tmp_path) -> None:
    with sshd(tmp_path) as ssh:
        server = socksflow_server(routed(home(ssh), "home"))
        for _ in range(3):
            assert peer_through(server, target) == "127.0.0.1"
        log = ssh.upstream.log.read_text()
        assert log.count("server_request_direct_tcpip") == 3  # sshd carried each tunnel
        assert log.count("Accepted publickey") == 1  # over one connection


def test_ssh_session_logs_a_loopback_remote(socksflow_server, target, tmp_path) -> None:
    with sshd(tmp_path) as ssh:
        log = "log: {access: {format: json, file: access.log}}\n"
        server = socksflow_server(log + routed(home(ssh), "home"))
        assert peer_through(server, target) == "127.0.0.1"
        record = json.loads(lines(tmp_path / "access.log", 1)[0])
        # the SSH channel is bridged to the relay through a loopback socket pair: remote is its end
        host, port = record["remote"].rsplit(":", 1)
        assert (record["outbound"], host) == ("home", "127.0.0.1")
        assert int(port) not in (ssh.upstream.port, target.port, server.port)


def test_ssh_upstream_with_an_unknown_host_key_is_refused(socksflow_server, target, tmp_path) -> None:
    with sshd(tmp_path) as ssh:
        ssh.known_hosts.write_text(f"[127.0.0.1]:{ssh.upstream.port} ssh-ed25519 "
                                   "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n")  # fmt: skip
        server = socksflow_server(routed(home(ssh), "home"))
        assert _connect_code(server, f"127.0.0.1:{target.port}") == 0x01


class Recorder:
    """A plugin for an upstream socksflow: every destination it was asked for."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl
    def socksflow_request(self, request) -> None:
        self.seen.append(str(request.destination))


def test_second_socksflow_as_upstream(socksflow_server, target) -> None:
    recorder = Recorder()
    seen = recorder.seen
    upstream = socksflow_server("rules:\n  - allow: all\n", [recorder])
    server = socksflow_server(routed(f"  next: {{socks5: {_text(upstream)}}}", "next"))
    assert peer_through(server, target) == "127.0.0.1"
    assert seen == [f"localhost:{target.port}"]  # the name went to the upstream (remote DNS)


SOCKS4_DOOR = "listen: [{address: 127.0.0.1:0, protocols: [socks4]}]\n"


def socks4_upstream(socksflow_server, tmp_path, rules: str = "  - allow: all\n"):
    """A second socksflow that speaks only SOCKS4/4a, with a JSON access log of its own."""
    log = tmp_path / "upstream-access.log"
    config = SOCKS4_DOOR + f"log: {{access: {{format: json, file: {log}}}}}\nrules:\n{rules}"
    return socksflow_server(config), log


def upstream_saw(log) -> dict:
    return json.loads(lines(log, 1)[0])


@pytest.mark.parametrize(
    ("dns", "sent"),
    [("remote", "localhost"), ("local", "127.0.0.1")],  # SOCKS4a carries the name; SOCKS4 an address
)
def test_second_socksflow_as_socks4_upstream(socksflow_server, target, tmp_path, dns, sent) -> None:
    upstream, log = socks4_upstream(socksflow_server, tmp_path)
    server = socksflow_server(routed(f"  old: {{socks4: {_text(upstream)}, dns: {dns}}}", "old"))
    assert peer_through(server, target) == "127.0.0.1"
    record = upstream_saw(log)
    seen = record["protocol"], record["destination"], record["reply"]
    assert seen == ("socks4", f"{sent}:{target.port}", 0)
    assert record["bytes_down"] > 0  # the HTTP answer came back through the upstream


def test_socks4_upstream_refusing_is_0x05(socksflow_server, target, tmp_path) -> None:
    # SOCKS4 has one failure code (0x5B, "rejected or failed"): it reaches a SOCKS5 client as 0x05
    upstream, log = socks4_upstream(socksflow_server, tmp_path, "  - deny: {to: localhost}\n  - allow: all\n")
    server = socksflow_server(routed(f"  old: {{socks4: {_text(upstream)}}}", "old"))
    assert _connect_code(server, f"localhost:{target.port}") == 0x05
    record = upstream_saw(log)
    assert (record["verdict"], record["rule"].rsplit(":", 1)[1], record["reply"]) == ("deny", "4", 0x02)
    with socket.create_connection((upstream.host, upstream.port)) as raw:  # on the wire: 0x5B
        raw.sendall(b"\x04\x01" + target.port.to_bytes(2, "big") + b"\0\0\0\x01\0localhost\0")
        assert raw.recv(8)[:2] == b"\x00\x5b"
    result = curl(_text(server), target.url("peer", "localhost"))
    assert (result.returncode, result.stderr.rstrip()[-3:]) == (97, b"(5)")  # curl prints the REP it got


def test_socks4_upstream_danted_refusing_is_0x05(socksflow_server, tmp_path) -> None:
    closed = free_port()
    with danted(tmp_path) as upstream:
        server = socksflow_server(routed(f"  up: {{socks4: {upstream.address}, dns: local}}", "up"))
        assert _connect_code(server, f"127.0.0.1:{closed}") == 0x05  # danted's 0x5B
        refused = f"127.0.0.1.{closed} -> 0: remote peer error (Connection refused)"
        assert wait_until(lambda: refused in upstream.log.read_text())  # danted dialled and was refused


def test_socks4_upstream_down_is_0x05(socksflow_server, target) -> None:
    server = socksflow_server(routed(f"  old: {{socks4: 127.0.0.1:{free_port()}}}", "old"))
    assert _connect_code(server, f"127.0.0.1:{target.port}") == 0x05


# --------------------------------------------------------------------------- chains


@pytest.mark.slow
def test_three_hop_chain_carries_50_mb_intact(socksflow_server, tmp_path) -> None:
    with (
        http_target(50 * 1024 * 1024) as blob,
        microsocks("alice", "s3cret") as first,
        tinyproxy(tmp_path, "bob", "pa55") as second,
        danted(tmp_path) as third,
    ):
        server = socksflow_server(
            routed(
                f"  a: {{socks5: {first.address}, username: alice, password: s3cret}}\n"
                f'  b: {{http: "http://bob:pa55@{second.address}"}}\n'
                f"  c: {{socks5: {third.address}}}\n"
                "  far: {chain: [a, b, c]}",
                "far",
            )
        )
        result = curl(_text(server), blob.url("blob", "localhost"), timeout=120)
        assert result.returncode == 0, result.stderr.decode()
        assert hashlib.sha256(result.stdout).hexdigest() == blob.blob_sha256
        result = curl(_text(server), blob.url("peer", "localhost"))
        assert result.stdout.decode() == DANTED_SOURCE  # the last hop dialled the target
        # danted logs its client: tinyproxy's outgoing address, so the middle hop carried it
        assert f"tcp/connect [: {TINYPROXY_SOURCE}." in third.log.read_text()


def test_chain_reply_carries_the_last_hops_bound_address(socksflow_server, target, tmp_path) -> None:
    with microsocks() as first, danted(tmp_path) as last:
        server = socksflow_server(
            routed(
                f"  a: {{socks5: {first.address}}}\n  b: {{socks5: {last.address}}}\n  ab: {{chain: [a, b]}}",
                "ab",
            )
        )
        code, bound = connect_reply(server, f"127.0.0.1:{target.port}")
        assert code == 0
        assert str(bound.host) == DANTED_SOURCE  # danted's BND: its external address


# --------------------------------------------------------------------------- failures


def _connect_code(server, destination: str) -> int:
    with Socks5Client(server.address) as client:
        client.greet()
        code, _ = client.connect(destination)
        return code


def test_upstream_wrong_password_is_0x01_and_logged(socksflow_server, target, caplog) -> None:
    with microsocks("alice", "s3cret") as upstream:
        server = socksflow_server(
            routed(f"  up: {{socks5: {upstream.address}, username: alice, password: wrong-one}}", "up")
        )
        with caplog.at_level("INFO"):
            assert _connect_code(server, f"127.0.0.1:{target.port}") == 0x01
        text = caplog.text
        assert "outbound 'up'" in text and "login failed" in text
        assert "wrong-one" not in text


def test_http_upstream_wrong_password_is_0x01(socksflow_server, target, tmp_path) -> None:
    with tinyproxy(tmp_path, "bob", "pa55") as upstream:
        server = socksflow_server(routed(f'  web: {{http: "http://bob:nope@{upstream.address}"}}', "web"))
        assert _connect_code(server, f"127.0.0.1:{target.port}") == 0x01


def test_upstream_refusal_keeps_its_code(socksflow_server) -> None:
    closed = free_port()
    with microsocks() as upstream:
        server = socksflow_server(routed(f"  up: {{socks5: {upstream.address}}}", "up"))
        # microsocks answers a refused destination with its own 0x05
        assert _connect_code(server, f"127.0.0.1:{closed}") == 0x05


def test_upstream_down_is_refused_0x05(socksflow_server, target) -> None:
    closed = free_port()
    server = socksflow_server(routed(f"  up: {{socks5: 127.0.0.1:{closed}}}", "up"))
    assert _connect_code(server, f"127.0.0.1:{target.port}") == 0x05


def test_reject_outbound_answers_its_code(socksflow_server, target) -> None:
    server = socksflow_server(routed("  nope: {reject: host_unreachable}", "nope"))
    assert _connect_code(server, f"127.0.0.1:{target.port}") == 0x04


# --------------------------------------------------------------------------- groups


def test_fallback_fails_over_when_the_first_member_is_killed(socksflow_server, target) -> None:
    with microsocks(source=MICROSOCKS_SOURCE) as first, microsocks(source="127.0.0.5") as second:
        server = socksflow_server(
            routed(
                f"  a: {{socks5: {first.address}}}\n  b: {{socks5: {second.address}}}\n"
                "  pool: {fallback: [a, b], health: {interval: 1s, timeout: 1s}}",
                "pool",
            )
        )
        assert peer_through(server, target) == MICROSOCKS_SOURCE
        first.kill()
        # every session after the kill succeeds: the first failed dial marks 'a' down and
        # the same session goes on to 'b'
        for _ in range(5):
            assert peer_through(server, target) == "127.0.0.5"


def test_group_with_every_member_down_answers_0x04(socksflow_server, target, caplog) -> None:
    server = socksflow_server(
        routed(
            f"  a: {{socks5: 127.0.0.1:{free_port()}}}\n  b: {{socks5: 127.0.0.1:{free_port()}}}\n"
            "  pool: {fallback: [a, b]}",
            "pool",
        )
    )
    with caplog.at_level("WARNING"):
        assert _connect_code(server, f"127.0.0.1:{target.port}") == 0x04
    assert "every member is down" in caplog.text


def test_balance_round_robin_uses_every_member(socksflow_server, target) -> None:
    with microsocks(source="127.0.0.6") as first, microsocks(source="127.0.0.7") as second:
        server = socksflow_server(
            routed(
                f"  a: {{socks5: {first.address}}}\n  b: {{socks5: {second.address}}}\n  lb: {{balance: [a, b]}}",
                "lb",
            )
        )
        seen = {peer_through(server, target) for _ in range(4)}
        assert seen == {"127.0.0.6", "127.0.0.7"}


def test_balance_hashed_on_destination_sticks(socksflow_server, target) -> None:
    with microsocks(source="127.0.0.6") as first, microsocks(source="127.0.0.7") as second:
        server = socksflow_server(
            routed(
                f"  a: {{socks5: {first.address}}}\n  b: {{socks5: {second.address}}}\n"
                "  lb: {balance: [a, b], hash: destination}",
                "lb",
            )
        )
        assert len({peer_through(server, target) for _ in range(4)}) == 1


def test_health_check_brings_a_member_back(socksflow_server, target) -> None:
    port = free_port()
    with microsocks(source="127.0.0.5") as second:
        server = socksflow_server(
            routed(
                f"  a: {{socks5: 127.0.0.1:{port}}}\n  b: {{socks5: {second.address}}}\n"
                "  pool: {fallback: [a, b], health: {interval: 0.2s, timeout: 1s}}",
                "pool",
            )
        )
        assert peer_through(server, target) == "127.0.0.5"  # 'a' is not there yet
        # 'a' comes up on its port: the background check finds it within an interval or two
        with microsocks(port=port):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and peer_through(server, target) != MICROSOCKS_SOURCE:
                time.sleep(0.1)
            assert peer_through(server, target) == MICROSOCKS_SOURCE


def test_dormant_without_outbounds_section(socksflow_server, target) -> None:
    server = socksflow_server("rules:\n  - allow: all\n")
    assert peer_through(server, target) == "127.0.0.1"


# --------------------------------------------------------------------------- operators see the route


def test_access_log_and_metrics_carry_the_outbound_and_member(socksflow_server, target, tmp_path) -> None:
    from test_metrics import scrape, value

    with microsocks(source="127.0.0.5") as second:
        server = socksflow_server(
            "listen: [127.0.0.1:0]\nmetrics: {listen: 127.0.0.1:0}\n"
            "log: {access: {format: json, file: access.log}}\n"
            + routed(
                f"  a: {{socks5: 127.0.0.1:{free_port()}}}\n  b: {{socks5: {second.address}}}\n"
                "  pool: {fallback: [a, b]}",
                "pool",
            )
        )
        assert peer_through(server, target) == "127.0.0.5"
        record = json.loads(lines(tmp_path / "access.log", 1)[0])
        assert record["outbound"] == "pool,pool=b"
        assert record["remote"] == second.address  # the upstream relayed to, not the destination
        samples = scrape(server)
        labels = {"outbound": "pool", "member": "b", "reply": "0x00"}
        assert value(samples, "socksflow_outbound_sessions_total", **labels) == 1
        assert value(samples, "socksflow_outbound_bytes_total", outbound="pool", direction="down") > 0


def test_password_file_and_ssh_as_the_last_hop_of_a_chain(socksflow_server, target, tmp_path) -> None:
    (tmp_path / "office.secret").write_text("s3cret\n")
    with microsocks("alice", "s3cret") as first, sshd(tmp_path) as ssh:
        server = socksflow_server(
            routed(
                f"  a: {{socks5: {first.address}, username: alice, password_file: office.secret}}\n"
                + home(ssh)
                + "\n  far: {chain: [a, home]}",
                "far",
            )
        )
        assert peer_through(server, target) == "127.0.0.1"
        log = ssh.upstream.log.read_text()
        assert f"Connection from {MICROSOCKS_SOURCE}" in log  # sshd was reached through microsocks
        assert log.count("server_request_direct_tcpip") == 1


def slow_download(server, blob, rate: str) -> subprocess.Popen[bytes]:
    """curl fetching the blob at ``rate`` bytes/s, so that a reload happens while it runs."""
    command = [require_tool("curl"), "-sS", "--max-time", "60", "--limit-rate", rate,
               "--socks5-hostname", _text(server), blob.url("blob", "localhost")]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_reload_changes_the_route_while_a_tunnel_runs(socksflow_server, tmp_path) -> None:
    with (
        http_target(16 * 1024 * 1024) as blob,
        microsocks(source="127.0.0.6") as first,
        microsocks(source="127.0.0.7") as second,
    ):
        outbounds = f"  a: {{socks5: {first.address}}}\n  b: {{socks5: {second.address}}}"
        server = socksflow_server(routed(outbounds, "a"))
        download = slow_download(server, blob, "8M")
        try:
            assert wait_until(lambda: len(server.server.sessions) == 1, 10), "the download did not start"
            (tmp_path / "rules.yaml").write_text("listen: [127.0.0.1:0]\n" + routed(outbounds, "b"))
            assert server.call(server.server.reload) is True
            assert peer_through(server, blob) == "127.0.0.7"  # new sessions take the new route
            assert download.poll() is None, "the download ended before the reload: make it slower"
        finally:
            out, err = download.communicate(timeout=60)
        assert download.returncode == 0, err
        assert hashlib.sha256(out).hexdigest() == blob.blob_sha256  # the running tunnel finished intact


def test_reload_keeps_the_ssh_connection_until_its_tunnels_end(socksflow_server, tmp_path) -> None:
    import gc

    with http_target(8 * 1024 * 1024) as blob, sshd(tmp_path) as ssh, microsocks(source="127.0.0.6") as other:
        outbounds = home(ssh) + f"\n  other: {{socks5: {other.address}}}"
        server = socksflow_server(routed(outbounds, "home"))
        download = slow_download(server, blob, "4M")
        try:
            assert wait_until(lambda: "server_request_direct_tcpip" in ssh.upstream.log.read_text(), 10)
            (tmp_path / "rules.yaml").write_text("listen: [127.0.0.1:0]\n" + routed(outbounds, "other"))
            assert server.call(server.server.reload) is True
            assert peer_through(server, blob) == "127.0.0.6"
            assert download.poll() is None, "the download ended before the reload: make it slower"
            assert "Received disconnect" not in ssh.upstream.log.read_text()  # still carrying the tunnel
        finally:
            out, err = download.communicate(timeout=60)
        assert download.returncode == 0, err
        assert hashlib.sha256(out).hexdigest() == blob.blob_sha256
        # the tunnel ended, its session let go of the old configuration: the retired connection closes
        assert wait_until(lambda: not server.server.sessions, 10)
        server.config = server.server.config  # the test harness held on to the first configuration
        server.call(gc.collect)
        assert wait_until(lambda: "Received disconnect" in ssh.upstream.log.read_text(), 10)


def test_https_proxy_upstream_checks_its_certificate(socksflow_server, target, tmp_path) -> None:
    with tinyproxy(tmp_path, "bob", "pa55") as plain, tls_front(tmp_path, plain) as (proxy, ca):
        server = socksflow_server(
            routed(
                f'  web: {{http: "https://bob:pa55@{proxy.address}", ca: {ca}, server_name: proxy.test}}',
                "web",
            )
        )
        assert peer_through(server, target) == TINYPROXY_SOURCE
        untrusted = socksflow_server(routed(f'  web: {{http: "https://bob:pa55@{proxy.address}"}}', "web"))
        assert _connect_code(untrusted, f"127.0.0.1:{target.port}") == 0x01  # not signed by a system CA


def test_fastest_picks_the_member_with_the_lowest_latency(socksflow_server, target) -> None:
    with (
        microsocks(source="127.0.0.6") as first,
        slowed(first, 0.3) as slow,
        microsocks(source="127.0.0.7") as quick,
    ):
        server = socksflow_server(
            routed(
                f"  slow: {{socks5: {slow.address}}}\n  quick: {{socks5: {quick.address}}}\n"
                f"  best: {{fastest: [slow, quick], health: {{interval: 0.2s, timeout: 2s,"
                f" target: 127.0.0.1:{target.port}}}}}",
                "best",
            )
        )
        # the first session starts the checks; once they measured both, 'quick' is chosen
        assert wait_until(lambda: peer_through(server, target) == "127.0.0.7", 10)
        assert {peer_through(server, target) for _ in range(5)} == {"127.0.0.7"}


def test_ssh_upstream_reconnects_after_sshd_restarts(socksflow_server, target, tmp_path) -> None:
    with sshd(tmp_path) as ssh:
        server = socksflow_server(routed(home(ssh), "home"))
        assert peer_through(server, target) == "127.0.0.1"
        ssh.upstream.kill()
        port = ssh.upstream.port
    assert _connect_code(server, f"127.0.0.1:{target.port}") in (0x01, 0x04, 0x05)  # down: no tunnel
    (tmp_path / "sshd.log").unlink()
    with sshd(tmp_path, port) as again:
        # back-off: 0.5 s, doubling; the next dial after it reconnects
        assert wait_until(lambda: curl(_text(server), target.url("peer")).stdout == b"127.0.0.1", 10)
        assert again.upstream.log.read_text().count("Accepted publickey") == 1


# --------------------------------------------------------------------------- UDP through an upstream


def test_udp_association_through_danted_answers_a_dns_query(tmp_path) -> None:
    import asyncio

    import dns.message
    from dns_servers import Dnsmasq
    from socksflow_plugins.outbounds.upstreams import Socks5Upstream

    from socksflow import Address

    resolver = Dnsmasq(tmp_path, ["upstream.test,192.0.2.44"])
    try:
        with danted(tmp_path) as upstream:
            query = dns.message.make_query("upstream.test", "A")

            async def ask() -> tuple[bytes, Address]:
                answered = asyncio.get_running_loop().create_future()

                def receive(data: bytes, source: Address) -> None:
                    if not answered.done():
                        answered.set_result((data, source))

                outbound = Socks5Upstream("up", Address.parse(upstream.address))
                association = await outbound.open_udp(receive)
                try:
                    association.send(Address.parse(resolver.address), query.to_wire())
                    return await asyncio.wait_for(answered, 5)
                finally:
                    association.close()

            data, source = asyncio.run(ask())
        answer = dns.message.from_wire(data)
        assert answer.id == query.id and "192.0.2.44" in answer.to_text()
        assert source == Address.parse(resolver.address)  # the upstream's header names the sender
        assert f"query[A] upstream.test from {DANTED_SOURCE}" in resolver.log.read_text()
    finally:
        resolver.stop()


def ask_over_udp(server, resolver, name: str) -> str:
    """A DNS query for ``name`` through socksflow's UDP ASSOCIATE; the answer's text.

    The reply's header must name the resolver, and the answer must be the query's.
    """
    import socket

    import dns.message

    from socksflow.protocol import build_udp_header, parse_udp_header

    target = Address.parse(resolver.address)
    query = dns.message.make_query(name, "A")
    with Socks5Client(server.address) as client, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        client.greet()
        udp.bind(("127.0.0.1", 0))
        code, relay = client.udp_associate(f"127.0.0.1:{udp.getsockname()[1]}")
        assert code == 0
        udp.settimeout(5)
        udp.sendto(build_udp_header(target) + query.to_wire(), (str(relay.host), relay.port))
        data = udp.recv(65536)
    header = parse_udp_header(data)
    assert header.destination == target
    answer = dns.message.from_wire(data[header.offset :])
    assert answer.id == query.id
    return answer.to_text()


def test_udp_associate_routed_through_danted(socksflow_server, tmp_path) -> None:
    from dns_servers import Dnsmasq

    resolver = Dnsmasq(tmp_path, ["upstream.test,192.0.2.44"])
    try:
        with danted(tmp_path) as upstream:
            server = socksflow_server(routed(f"  up: {{socks5: {upstream.address}}}", "up"))
            assert "192.0.2.44" in ask_over_udp(server, resolver, "upstream.test")
        assert f"query[A] upstream.test from {DANTED_SOURCE}" in resolver.log.read_text()  # through danted
    finally:
        resolver.stop()


def test_bind_routed_through_danted(socksflow_server, tmp_path) -> None:
    import socket

    with danted(tmp_path) as upstream:
        server = socksflow_server(routed(f"  up: {{socks5: {upstream.address}}}", "up"))
        with Socks5Client(server.address) as client:
            client.greet()
            code, bound = client.bind("127.0.0.1:0")
            assert code == 0
            assert str(bound.host) == DANTED_SOURCE  # danted listens for the peer, not socksflow
            with socket.create_connection((str(bound.host), bound.port), timeout=5) as peer:
                code, peer_address = client.second_reply()
                assert code == 0 and peer_address == Address.from_sockaddr(peer.getsockname())
                peer.sendall(b"from the peer")
                assert client.recv_exactly(13) == b"from the peer"
                client.sock.sendall(b"to the peer")
                peer.settimeout(5)
                assert peer.recv(64) == b"to the peer"


def test_a_name_only_the_upstream_knows(socksflow_server, target) -> None:
    from socksflow.testing import StaticResolver

    here, there = StaticResolver({}), StaticResolver({"far.test": ["127.0.0.1"]})
    upstream = socksflow_server("rules:\n  - allow: all\n", [there])
    server = socksflow_server(routed(f"  next: {{socks5: {_text(upstream)}}}", "next"), [here])
    assert peer_through(server, target, "far.test") == "127.0.0.1"
    assert (here.lookups, there.lookups) == ([], ["far.test"])  # resolved at the far end only


def test_a_name_the_rules_resolved_goes_up_as_the_checked_address(socksflow_server, target) -> None:
    from socksflow.testing import StaticResolver

    recorder = Recorder()
    seen = recorder.seen
    here = StaticResolver({"both.test": ["192.0.2.1", "127.0.0.1"]})
    upstream = socksflow_server("rules:\n  - allow: all\n", [recorder])
    rules = (
        f"outbounds:\n  next: {{socks5: {_text(upstream)}}}\n"
        "rules:\n  - deny: {to: [192.0.2.0/24]}\n  - allow: all\n    via: next\n"
    )
    server = socksflow_server(rules, [here])
    assert peer_through(server, target, "both.test") == "127.0.0.1"
    assert seen == [f"127.0.0.1:{target.port}"]  # not the name: the upstream could pick 192.0.2.1


def test_udp_associate_through_a_chain_of_two_danted(socksflow_server, tmp_path) -> None:
    from dns_servers import Dnsmasq

    resolver = Dnsmasq(tmp_path, ["chain.test,192.0.2.45"])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        with danted(tmp_path / "a", source="127.0.0.8") as first, danted(tmp_path / "b") as last:
            outbounds = (
                f"  a: {{socks5: {first.address}}}\n  b: {{socks5: {last.address}}}\n  ab: {{chain: [a, b]}}"
            )
            server = socksflow_server(routed(outbounds, "ab"))
            assert "192.0.2.45" in ask_over_udp(server, resolver, "chain.test")
            first_log = (tmp_path / "a" / "danted.log").read_text()
        assert f"query[A] chain.test from {DANTED_SOURCE}" in resolver.log.read_text()  # the last hop sent it
        assert "udp" in first_log.lower() and "127.0.0.8" in first_log  # the first hop carried it
    finally:
        resolver.stop()


def test_http_and_ssh_upstreams_refusing_the_destination_answer_0x05(socksflow_server, tmp_path) -> None:
    closed = f"127.0.0.1:{free_port()}"
    with tinyproxy(tmp_path) as web, sshd(tmp_path) as ssh:
        via_ssh = socksflow_server(routed(home(ssh), "home"))
        assert _connect_code(via_ssh, closed) == 0x05  # sshd: "Connection refused" opening the channel
        via_http = socksflow_server(routed(f"  web: {{http: {web.address}}}", "web"))
        assert _connect_code(via_http, closed) == 0x05  # tinyproxy: HTTP 500 "Unable to connect"


def test_fallback_skips_a_member_that_accepts_but_never_answers(socksflow_server, target) -> None:
    import socket

    with socket.socket() as hung, microsocks(source="127.0.0.5") as second:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # the kernel completes the handshakes; nobody ever reads the greeting
        server = socksflow_server(
            routed(
                f"  a: {{socks5: 127.0.0.1:{hung.getsockname()[1]}}}\n  b: {{socks5: {second.address}}}\n"
                "  pool: {fallback: [a, b], health: {interval: 60s, timeout: 0.5s}}",
                "pool",
            )
        )
        began = time.monotonic()
        assert peer_through(server, target) == "127.0.0.5"  # the same session went on to b
        assert time.monotonic() - began < 5  # well within the 10 s connect timeout
        assert peer_through(server, target) == "127.0.0.5"


def test_chain_with_ssh_in_the_middle(socksflow_server, target, tmp_path) -> None:
    with sshd(tmp_path) as ssh, microsocks() as last:
        server = socksflow_server(
            routed(home(ssh) + f"\n  up: {{socks5: {last.address}}}\n  far: {{chain: [home, up]}}", "far")
        )
        assert peer_through(server, target) == MICROSOCKS_SOURCE  # microsocks dialled the target
        assert f"target 127.0.0.1 port {last.port}" in ssh.upstream.log.read_text()  # sshd carried the hop


def test_udp_associate_fails_over_in_a_group(socksflow_server, tmp_path) -> None:
    from dns_servers import Dnsmasq

    resolver = Dnsmasq(tmp_path, ["group.test,192.0.2.46"])
    try:
        with danted(tmp_path) as upstream:
            outbounds = (
                f"  dead: {{socks5: 127.0.0.1:{free_port()}}}\n  up: {{socks5: {upstream.address}}}\n"
                "  pool: {fallback: [dead, up]}"
            )
            server = socksflow_server(routed(outbounds, "pool"))
            assert "192.0.2.46" in ask_over_udp(server, resolver, "group.test")
        assert f"query[A] group.test from {DANTED_SOURCE}" in resolver.log.read_text()
    finally:
        resolver.stop()
