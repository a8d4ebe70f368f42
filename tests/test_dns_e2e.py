"""The DNS plugin end to end: clients ask socksflow for names, socksflow asks DNS servers on loopback.

curl ``--socks5-hostname`` and a raw SOCKS5 client send domain names; the answers come from
dnsmasq or a scripted server the test started, never from the system resolver.
"""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any

import pytest
from helpers import require_tool
from socksflow_plugins import dns as dns_plugin

from socksflow import Command, Reply
from socksflow.protocol import Address, build_request
from socksflow.testing import SessionRecorder, Socks5Client

pytest_plugins = ["dns_servers"]

HOST_UNREACHABLE = b"\x05\x04\x00\x01\x00\x00\x00\x00\x00\x00"  # REP 0x04, BND 0.0.0.0:0


@pytest.fixture
def proxy(socksflow_server) -> Any:
    """``proxy(dns_section) -> (server, session_log)``: socksflow with only the DNS plugin."""

    def start(section: str) -> tuple[Any, SessionRecorder]:
        log = SessionRecorder()
        server = socksflow_server(f"dns:\n{section}", plugins=[dns_plugin, log], autoload=False)
        return server, log

    return start


def curl(server: Any, url: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [require_tool("curl"), "--silent", "--show-error", "--max-time", "20",
         "--socks5-hostname", f"{server.host}:{server.port}", url],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip


def connect_raw(server: Any, host: str, port: int) -> tuple[bytes, float]:
    """CONNECT to ``host:port`` by name; return every byte the proxy sent until it closed, and the time."""
    with Socks5Client(server.address) as client:
        client.greet()
        started = time.monotonic()
        client.sock.sendall(build_request(Command.CONNECT, Address(host, port)))
        data = b""
        while chunk := client.sock.recv(4096):
            data += chunk
        return data, time.monotonic() - started


def connect_code(server: Any, host: str, port: int) -> int:
    with Socks5Client(server.address) as client:
        client.greet()
        code, _ = client.connect(Address(host, port))
        return code


def test_curl_resolves_through_the_configured_server(proxy, dnsmasq, http_target):
    dns = dnsmasq("web.test,127.0.0.1,300")
    server, log = proxy(f"  servers: ['{dns.address}']\n")
    result = curl(server, f"http://web.test:{http_target.port}/")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello from the target\n"
    assert dns.queries("web.test", "A") == 1 and dns.queries("web.test", "AAAA") == 1
    assert log.wait() == [(Reply.SUCCEEDED, "closed")]


def test_installed_entry_point_serves_the_dns_section(socksflow_server, dnsmasq, http_target):
    dns = dnsmasq("web.test,127.0.0.1,300")
    server = socksflow_server(f"dns:\n  servers: ['{dns.address}']\n")  # plugins from entry points
    result = curl(server, f"http://web.test:{http_target.port}/")
    assert result.returncode == 0, result.stderr
    assert dns.queries("web.test", "A") == 1


def test_static_host_overrides_the_server(proxy, dnsmasq, http_target):
    dns = dnsmasq("printer.test,127.0.0.2,300")  # nothing listens on 127.0.0.2
    server, _ = proxy(f"  servers: ['{dns.address}']\n  hosts: {{printer.test: 127.0.0.1}}\n")
    result = curl(server, f"http://printer.test:{http_target.port}/")
    assert result.returncode == 0, result.stderr
    assert dns.queries("printer.test") == 0


def test_nxdomain_is_host_unreachable(proxy, dnsmasq, http_target):
    dns = dnsmasq()
    server, log = proxy(f"  servers: ['{dns.address}']\n")
    result = curl(server, f"http://missing.test:{http_target.port}/")
    assert result.returncode == 97, result  # CURLE_PROXY: the SOCKS5 request failed
    assert result.stderr == b"curl: (97) Can't complete SOCKS5 connection to missing.test. (4)\n"  # REP 4
    data, _ = connect_raw(server, "missing.test", http_target.port)
    assert data == HOST_UNREACHABLE  # the exact reply, then the proxy closes
    reason = "cannot resolve missing.test: missing.test does not exist (NXDOMAIN)"
    assert log.wait(2) == [(Reply.HOST_UNREACHABLE, reason)] * 2
    assert dns.queries("missing.test", "A") == 1  # the second session used the negative cache


def test_silent_server_is_host_unreachable_within_the_timeout(proxy, scripted, http_target):
    dns = scripted("silent")
    server, log = proxy(f"  servers: ['{dns.address}']\n  timeout: 400ms\n  retries: 1\n")
    data, elapsed = connect_raw(server, "slow.test", http_target.port)
    assert data == HOST_UNREACHABLE
    assert 0.75 < elapsed < 1.5, elapsed  # 2 tries of 400ms, a backoff pause (0.1-0.2s), slack
    reason = f"cannot resolve slow.test: no answer from Do53:{dns.address.replace(':', '@')} within 0.8s"
    assert log.wait() == [(Reply.HOST_UNREACHABLE, reason)]


def test_servfail_is_host_unreachable(proxy, scripted, http_target):
    dns = scripted("servfail")
    server, log = proxy(f"  servers: ['{dns.address}']\n")
    data, _ = connect_raw(server, "broken.test", http_target.port)
    assert data == HOST_UNREACHABLE
    reason = f"cannot resolve broken.test: Do53:{dns.address.replace(':', '@')} answered SERVFAIL"
    assert log.wait() == [(Reply.HOST_UNREACHABLE, reason)]


def test_many_sessions_one_query(proxy, dnsmasq, http_target):
    dns = dnsmasq("web.test,127.0.0.1,300")
    server, _ = proxy(f"  servers: ['{dns.address}']\n")
    for _ in range(30):
        assert connect_code(server, "web.test", http_target.port) == Reply.SUCCEEDED
    assert dns.queries("web.test", "A") == 1 and dns.queries("web.test", "AAAA") == 1


def test_concurrent_sessions_share_one_query(proxy, scripted, http_target):
    dns = scripted(delay=0.5)
    dns.records[("burst.test", "A")] = ["127.0.0.1"]
    server, _ = proxy(f"  servers: ['{dns.address}']\n  cache: {{size: 0}}\n")  # only sharing, no cache
    barrier = threading.Barrier(12)
    codes: list[int] = []

    def session() -> None:
        barrier.wait(5)
        codes.append(connect_code(server, "burst.test", http_target.port))

    threads = [threading.Thread(target=session) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert codes == [Reply.SUCCEEDED] * 12
    assert dns.count("burst.test", "A") == 1 and dns.count("burst.test", "AAAA") == 1


def test_policy_sends_a_domain_to_its_own_server(proxy, dnsmasq, http_target):
    main = dnsmasq("web.test,127.0.0.1,300")
    corp = dnsmasq("intranet.corp.test,127.0.0.1,300")
    server, _ = proxy(f"  servers: ['{main.address}']\n  policy: {{'*.corp.test': ['{corp.address}']}}\n")
    result = curl(server, f"http://intranet.corp.test:{http_target.port}/")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello from the target\n"
    assert corp.queries("intranet.corp.test", "A") == 1 and main.queries("intranet.corp.test") == 0
    assert curl(server, f"http://web.test:{http_target.port}/").returncode == 0
    assert main.queries("web.test", "A") == 1 and corp.queries("web.test") == 0
