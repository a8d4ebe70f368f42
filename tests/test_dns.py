"""The DNS plugin against real DNS servers on loopback: configuration, answers, cache, failures, DoT.

No query leaves the machine: every name is served by a server the test started on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time
from typing import Any

import dns.query
import pytest
from socksflow_plugins import dns as dns_plugin
from socksflow_plugins.dns import settings as dns_settings
from socksflow_plugins.dns.cache import AnswerCache, CacheSettings, Lookup
from socksflow_plugins.dns.resolver import DnsResolver

from socksflow import Config, ResolveError, resolution
from socksflow.errors import ConfigErrors
from socksflow.hooks import Hooks
from socksflow.plugins import PluginManager

ip = ipaddress.ip_address
pytest_plugins = ["dns_servers"]


def load(text: str, file: str = "rules.yaml") -> Config:
    config = Config.from_text(text, file)
    with config.errors.capture():
        dns_plugin.socksflow_configure(config)
    return config


def resolver_for(text: str) -> DnsResolver:
    config = load(text)
    config.raise_errors()
    return config.stash[dns_plugin.RESOLVER]


def resolve(resolver: DnsResolver, host: str) -> list[Any]:
    return asyncio.run(resolver.resolve(host))


def resolve_error(resolver: DnsResolver, host: str) -> str:
    with pytest.raises(ResolveError) as caught:
        resolve(resolver, host)
    return str(caught.value)


# ---------------------------------------------------------------------------- configuration


@pytest.mark.smoke
def test_full_section_is_read(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# comment\n192.0.2.1 filehost.lan alias.lan  # trailing\n2001:db8::1 filehost.lan\n")
    config = load(f"""
dns:
  servers:
    - "127.0.0.1:5353"
    - "[::1]:5300"
    - "::1"
    - tls://127.0.0.1
    - {{address: "tls://127.0.0.1:8853", tls_name: dns.test}}
  hosts: {{printer.lan: 192.0.2.10, Both.LAN.: [192.0.2.11, "2001:db8::11"], alias.lan: 192.0.2.99}}
  hosts_file: {hosts}
  policy: {{"*.corp.example": ["127.0.0.1:5354"], "exact.example": "127.0.0.1:5355"}}
  prefer: ipv6
  timeout: 500ms
  retries: 2
  cache: {{size: 10, min_ttl: 1s, max_ttl: 1h, negative_ttl: 5s}}
""")
    config.raise_errors()
    settings = config.stash[dns_plugin.RESOLVER].settings
    assert [(s.kind(), s.address, s.port) for s in settings.servers] == [
        ("Do53", "127.0.0.1", 5353), ("Do53", "::1", 5300), ("Do53", "::1", 53),
        ("DoT", "127.0.0.1", 853), ("DoT", "127.0.0.1", 8853),
    ]  # fmt: skip
    assert settings.servers[3].hostname == "127.0.0.1"  # no name given: the certificate must name the IP
    assert settings.servers[4].hostname == "dns.test"
    assert settings.hosts == {
        "printer.lan": (ip("192.0.2.10"),),
        "both.lan": (ip("192.0.2.11"), ip("2001:db8::11")),
        "filehost.lan": (ip("192.0.2.1"), ip("2001:db8::1")),
        "alias.lan": (ip("192.0.2.99"),),  # the section's hosts override the file's
    }
    assert settings.prefer == "ipv6" and settings.timeout == 0.5 and settings.retries == 2
    assert settings.lifetime == 1.5
    assert settings.cache == CacheSettings(size=10, min_ttl=1.0, max_ttl=3600.0, negative_ttl=5.0)
    corp = settings.servers_for("a.b.corp.example")
    assert [(s.address, s.port) for s in corp] == [("127.0.0.1", 5354)]
    assert settings.servers_for("corp.example") is settings.servers  # *.x matches below x, not x
    assert settings.servers_for("exact.example")[0].port == 5355
    assert settings.servers_for("sub.exact.example") is settings.servers


@pytest.mark.parametrize(
    ("section", "line", "message"),
    [
        ("dns:\n  hosts: {a.lan: 192.0.2.1}\n", 1, "dns: give the name servers to ask"),
        ("dns:\n  servers: [127.0.0.1]\n  color: red\n", 3, "dns.color: unknown key"),
        ("dns:\n  servers: [dns.google]\n", 2, "'dns.google' is not an IP address"),
        ("dns:\n  servers: ['127.0.0.1:99999']\n", 2, "'99999' is not a port"),
        ("dns:\n  servers: ['quic://127.0.0.1']\n", 2, "unknown scheme 'quic'"),
        ("dns:\n  servers: []\n", 2, "list at least one name server"),
        ("dns:\n  servers: [{address: '127.0.0.1', tls_name: x.test}]\n", 2, "servers[0].tls_name: does not"),
        ("dns:\n  servers: [{address: 'tls://127.0.0.1', ca: /nonexistent/ca.pem}]\n", 2, "no CA file at"),
        ("dns:\n  servers: [127.0.0.1]\n  hosts: {a.lan: 192.0.2.300}\n", 3, "is not an IPv4 or IPv6"),
        ("dns:\n  servers: [127.0.0.1]\n  hosts: {'bad..name': 192.0.2.1}\n", 3, "is not a valid host name"),
        ("dns:\n  servers: [127.0.0.1]\n  policy: {'*.x.test': [nope]}\n", 3, "'nope' is not an IP address"),
        ("dns:\n  servers: [127.0.0.1]\n  prefer: ipv5\n", 3, "dns.prefer: 'ipv5' is not one of"),
        ("dns:\n  servers: [127.0.0.1]\n  timeout: 0s\n", 3, "longer than 0s"),
        ("dns:\n  servers: [127.0.0.1]\n  retries: 11\n", 3, "above the maximum 10"),
        ("dns:\n  servers: [127.0.0.1]\n  cache: {min_ttl: 2h}\n", 3, "min_ttl (7200s) is above max_ttl"),
        ("dns:\n  servers: [127.0.0.1]\n  cache: {ttl: 2s}\n", 3, "dns.cache.ttl: unknown key"),
        ("dns:\n  servers: [127.0.0.1]\n  hosts_file: /nonexistent/hosts\n", 3, "cannot read hosts file"),
    ],
)
def test_config_errors_are_located(section, line, message):
    config = load(section)
    with pytest.raises(ConfigErrors) as caught:
        config.raise_errors()
    assert str(caught.value).startswith(f"rules.yaml:{line}: "), str(caught.value)
    assert message in str(caught.value)


def test_hosts_file_errors_name_the_file_line(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n\n300.1.1.1 broken.lan\n")
    config = load(f"dns:\n  servers: [127.0.0.1]\n  hosts_file: {hosts}\n")
    with pytest.raises(ConfigErrors) as caught:
        config.raise_errors()
    assert str(caught.value) == f"rules.yaml:3: dns.hosts_file: {hosts}:3: '300.1.1.1' is not an IP address"


def test_doh_without_the_extra_is_a_config_error(monkeypatch):
    monkeypatch.setattr(dns.query, "have_doh", False)
    config = load("dns:\n  servers: ['https://127.0.0.1/dns-query']\n")
    with pytest.raises(ConfigErrors, match=r"rules.yaml:2: dns.servers\[0\]: DNS over HTTPS needs .*\[doh\]"):
        config.raise_errors()


def test_system_reads_resolv_conf(tmp_path, monkeypatch):
    conf = tmp_path / "resolv.conf"
    conf.write_text("search example.org\nnameserver 127.0.0.53\nnameserver ::1\n")
    monkeypatch.setattr(dns_settings, "RESOLV_CONF", str(conf))
    settings = resolver_for("dns:\n  servers: [system, 127.0.0.1:5353]\n").settings
    expected = [("127.0.0.53", 53), ("::1", 53), ("127.0.0.1", 5353)]
    assert [(s.address, s.port) for s in settings.servers] == expected


def test_lifetime_beyond_the_hook_timeout_is_warned_about():
    config = load("timeouts: {hook: 3s}\ndns:\n  servers: [127.0.0.1]\n  timeout: 2s\n  retries: 1\n")
    config.raise_errors()
    assert [str(w) for w in config.warnings] == [
        "rules.yaml:2: dns: a look-up may take 4s (timeout × (retries + 1)) but the core gives resolution 3s "
        "(timeouts.hook): the later tries never happen"
    ]


def test_no_section_no_opinion():
    config = load("listen: [127.0.0.1:0]\n")
    assert asyncio.run(dns_plugin.socksflow_resolve(config, "dual.test")) is None


# ---------------------------------------------------------------------------- the cache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.smoke
def test_cache_clamps_ttls_and_bounds_negative_answers():
    clock = Clock()
    cache = AnswerCache(CacheSettings(size=10, min_ttl=10, max_ttl=60, negative_ttl=5), clock)
    answer = Lookup((ip("192.0.2.1"),))
    cache.put("short", answer, 1)  # raised to min_ttl
    cache.put("long", answer, 86400)  # lowered to max_ttl
    cache.put("nx", Lookup((), nxdomain=True), 3600)  # lowered to negative_ttl
    clock.now += 4.9
    assert cache.get("nx") == Lookup((), nxdomain=True)
    clock.now += 0.2
    assert cache.get("nx") is None
    clock.now += 4.8
    assert cache.get("short") is answer
    clock.now += 0.2
    assert cache.get("short") is None and cache.get("long") is answer
    clock.now += 50
    assert cache.get("long") is None and len(cache) == 0


@pytest.mark.smoke
def test_cache_drops_least_recently_used_beyond_its_size():
    cache = AnswerCache(CacheSettings(size=3), Clock())
    for key in "abc":
        cache.put(key, Lookup((ip("192.0.2.1"),)), 300)
    assert cache.get("a") is not None  # "b" is now the least recently used
    cache.put("d", Lookup((ip("192.0.2.4"),)), 300)
    assert len(cache) == 3 and cache.get("b") is None
    assert all(cache.get(key) is not None for key in "acd")


def test_cache_of_size_zero_and_ttl_zero_keep_nothing():
    cache = AnswerCache(CacheSettings(size=0), Clock())
    cache.put("a", Lookup((ip("192.0.2.1"),)), 300)
    assert len(cache) == 0
    cache = AnswerCache(CacheSettings(), Clock())
    cache.put("a", Lookup((ip("192.0.2.1"),)), 0)  # TTL 0: use once, never cache (RFC 1035 §3.2.1)
    assert len(cache) == 0


# ---------------------------------------------------------------------------- answers from dnsmasq


@pytest.mark.parametrize(
    ("prefer", "expected"),
    [("ipv4", ["127.0.0.1", "::1"]), ("ipv6", ["::1", "127.0.0.1"]), ("both", ["::1", "127.0.0.1"])],
)
def test_a_and_aaaa_in_preference_order(dnsmasq, prefer, expected):
    server = dnsmasq()
    resolver = resolver_for(f"dns:\n  servers: ['{server.address}']\n  prefer: {prefer}\n")
    assert resolve(resolver, "dual.test") == [ip(a) for a in expected]
    assert server.queries("dual.test", "A") == 1 and server.queries("dual.test", "AAAA") == 1


def test_both_alternates_families(scripted):
    server = scripted()
    server.records[("many.test", "A")] = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
    server.records[("many.test", "AAAA")] = ["2001:db8::1"]
    resolver = resolver_for(f"dns:\n  servers: ['{server.address}']\n  prefer: both\n")
    answer = resolve(resolver, "many.test")
    assert [a.version for a in answer] == [6, 4, 4, 4]  # one IPv6 address to alternate with
    assert set(answer) == {ip(a) for a in ("2001:db8::1", "192.0.2.1", "192.0.2.2", "192.0.2.3")}
    server.records[("many.test", "AAAA")] = ["2001:db8::1", "2001:db8::2"]
    resolver = resolver_for(f"dns:\n  servers: ['{server.address}']\n  prefer: both\n")
    assert [a.version for a in resolve(resolver, "many.test")] == [6, 4, 6, 4, 4]


def test_static_hosts_override_the_server(dnsmasq, tmp_path):
    server = dnsmasq()
    hosts = tmp_path / "hosts"
    hosts.write_text("192.0.2.20 v4only.test\n")
    resolver = resolver_for(
        f"dns:\n  servers: ['{server.address}']\n  hosts: {{dual.test: [192.0.2.10, '2001:db8::10']}}\n"
        f"  hosts_file: {hosts}\n  prefer: ipv6\n"
    )
    assert resolve(resolver, "dual.test") == [ip("2001:db8::10"), ip("192.0.2.10")]
    assert resolve(resolver, "v4only.test") == [ip("192.0.2.20")]
    assert server.queries("dual.test") == 0 and server.queries("v4only.test") == 0


def test_cache_hits_send_one_query(dnsmasq):
    server = dnsmasq()
    resolver = resolver_for(f"dns:\n  servers: ['{server.address}']\n")
    for _ in range(50):
        assert resolve(resolver, "dual.test") == [ip("127.0.0.1"), ip("::1")]
    assert server.queries("dual.test", "A") == 1 and server.queries("dual.test", "AAAA") == 1


def test_ttl_expiry_asks_again(dnsmasq):
    server = dnsmasq()
    resolver = resolver_for(f"dns:\n  servers: ['{server.address}']\n")
    resolve(resolver, "short.test")  # TTL 1s
    resolve(resolver, "short.test")
    assert server.queries("short.test", "A") == 1
    time.sleep(1.1)
    resolve(resolver, "short.test")
    assert server.queries("short.test", "A") == 2


def test_min_ttl_keeps_and_max_ttl_drops(dnsmasq):
    server = dnsmasq()
    keep = resolver_for(f"dns:\n  servers: ['{server.address}']\n  cache: {{min_ttl: 10s}}\n")
    drop = resolver_for(f"dns:\n  servers: ['{server.address}']\n  cache: {{max_ttl: 1s}}\n")
    resolve(keep, "short.test")  # TTL 1s, kept 10s
    resolve(drop, "dual.test")  # TTL 300s, kept 1s
    time.sleep(1.1)
    resolve(keep, "short.test")
    resolve(drop, "dual.test")
    assert server.queries("short.test", "A") == 1
    assert server.queries("dual.test", "A") == 2


def test_nxdomain_is_an_error_and_cached_negatively(dnsmasq):
    server = dnsmasq()
    resolver = resolver_for(f"dns:\n  servers: ['{server.address}']\n  cache: {{negative_ttl: 1s}}\n")
    for _ in range(5):
        assert resolve_error(resolver, "missing.test") == "missing.test does not exist (NXDOMAIN)"
    assert server.queries("missing.test", "A") == 1 and server.queries("missing.test", "AAAA") == 1
    time.sleep(1.1)
    resolve_error(resolver, "missing.test")
    assert server.queries("missing.test", "A") == 2


def test_no_data_for_one_family_is_cached_too(dnsmasq):
    server = dnsmasq()
    resolver = resolver_for(f"dns:\n  servers: ['{server.address}']\n")
    for _ in range(5):
        assert resolve(resolver, "v4only.test") == [ip("127.0.0.1")]
    assert server.queries("v4only.test", "AAAA") == 1


def test_name_with_no_address_at_all(scripted):
    server = scripted()
    server.records[("mx-only.test", "MX")] = ["10 mail.test."]
    resolver = resolver_for(f"dns:\n  servers: ['{server.address}']\n")
    assert resolve_error(resolver, "mx-only.test") == "mx-only.test has no A or AAAA record"


def test_policy_routes_a_domain_to_its_server(dnsmasq):
    main = dnsmasq()
    corp = dnsmasq("host.corp.test,127.0.0.5,300", "corp.test,127.0.0.6,300")
    resolver = resolver_for(
        f"dns:\n  servers: ['{main.address}']\n  policy: {{'*.corp.test': ['{corp.address}']}}\n"
    )
    assert resolve(resolver, "host.corp.test") == [ip("127.0.0.5")]
    assert resolve(resolver, "dual.test") == [ip("127.0.0.1"), ip("::1")]
    assert corp.queries("host.corp.test") == 2 and main.queries("host.corp.test") == 0
    assert main.queries("dual.test") == 2 and corp.queries("dual.test") == 0
    # the apex is not below itself: the main server answers for it
    assert resolve_error(resolver, "corp.test") == "corp.test does not exist (NXDOMAIN)"
    assert main.queries("corp.test") == 2


def test_overlong_names_are_refused_without_a_query(scripted):
    server = scripted()
    resolver = resolver_for(f"dns:\n  servers: ['{server.address}']\n")
    for name in ("a" * 64 + ".test", ".".join(["a" * 63] * 4) + ".test", "a..test"):
        assert "is not a valid DNS name" in resolve_error(resolver, name)
    assert not server.queries


# ---------------------------------------------------------------------------- failures and transports


def test_servfail_is_an_error(scripted):
    server = scripted("servfail")
    resolver = resolver_for(f"dns:\n  servers: ['{server.address}']\n")
    where = server.address.replace(":", "@")
    assert resolve_error(resolver, "broken.test") == f"Do53:{where} answered SERVFAIL"


def test_silent_server_times_out_within_the_configured_time(scripted):
    server = scripted("silent")
    resolver = resolver_for(f"dns:\n  servers: ['{server.address}']\n  timeout: 300ms\n  retries: 1\n")
    started = time.monotonic()
    reason = resolve_error(resolver, "slow.test")
    elapsed = time.monotonic() - started
    assert reason == f"no answer from Do53:{server.address.replace(':', '@')} within 0.6s"
    assert 0.55 < elapsed < 1.3, elapsed
    assert server.count("slow.test", "A", "udp") == 2  # the first try and one retry
    assert len(resolver.cache) == 0  # failures are not cached


def test_truncated_answer_is_asked_again_over_tcp(scripted):
    server = scripted("truncate")
    server.records[("big.test", "A")] = [f"192.0.2.{i}" for i in range(1, 40)]
    resolver = resolver_for(f"dns:\n  servers: ['{server.address}']\n")
    answer = resolve(resolver, "big.test")
    assert sorted(answer) == [ip(f"192.0.2.{i}") for i in range(1, 40)]
    assert server.count("big.test", "A", "udp") == 1 and server.count("big.test", "A", "tcp") == 1


def test_concurrent_lookups_share_one_query(scripted):
    server = scripted(delay=0.3)
    server.records[("shared.test", "A")] = ["192.0.2.7"]
    server.records[("shared.test", "AAAA")] = ["2001:db8::7"]
    resolver = resolver_for(f"dns:\n  servers: ['{server.address}']\n  cache: {{size: 0}}\n")

    async def many() -> list[list[Any]]:
        return await asyncio.gather(*(resolver.resolve("shared.test") for _ in range(20)))

    results = asyncio.run(many())
    assert results == [[ip("192.0.2.7"), ip("2001:db8::7")]] * 20
    assert server.count("shared.test", "A") == 1 and server.count("shared.test", "AAAA") == 1
    asyncio.run(many())  # nothing cached (size 0): the next burst asks again, once
    assert server.count("shared.test", "A") == 2


def test_a_slow_second_family_does_not_hold_the_answer(scripted):
    server = scripted(delay=1.0, delayed=("AAAA",))
    server.records[("split.test", "A")] = ["192.0.2.8"]
    server.records[("split.test", "AAAA")] = ["2001:db8::8"]
    resolver = resolver_for(f"dns:\n  servers: ['{server.address}']\n")

    async def scenario() -> tuple[list[Any], float, list[Any]]:
        started = time.monotonic()
        first = await resolver.resolve("split.test")
        elapsed = time.monotonic() - started
        await asyncio.sleep(1.2)  # the AAAA query went on and filled the cache
        return first, elapsed, await resolver.resolve("split.test")

    first, elapsed, later = asyncio.run(scenario())
    assert first == [ip("192.0.2.8")] and elapsed < 0.5
    assert later == [ip("192.0.2.8"), ip("2001:db8::8")]
    assert server.count("split.test", "AAAA") == 1


# ---------------------------------------------------------------------------- DNS over TLS


def test_dns_over_tls_with_a_verified_certificate(unbound_dot):
    server, ca = unbound_dot
    url = f"tls://127.0.0.1:{server.tls_port}"
    by_ip = resolver_for(f"dns:\n  servers: [{{address: '{url}', ca: '{ca}'}}]\n")
    assert resolve(by_ip, "www.dot.test") == [ip("127.0.0.9")]
    by_name = resolver_for(f"dns:\n  servers: [{{address: '{url}', tls_name: dns.test, ca: '{ca}'}}]\n")
    assert resolve(by_name, "www.dot.test") == [ip("127.0.0.9")]


def test_dns_over_tls_refuses_a_certificate_for_another_name(unbound_dot):
    server, ca = unbound_dot
    url = f"tls://127.0.0.1:{server.tls_port}"
    wrong = resolver_for(f"dns:\n  servers: [{{address: '{url}', tls_name: other.test, ca: '{ca}'}}]\n")
    assert "certificate verify failed" in resolve_error(wrong, "www.dot.test").lower()
    untrusted = resolver_for(f"dns:\n  servers: ['{url}']\n")  # the system's CAs only
    assert "certificate verify failed" in resolve_error(untrusted, "www.dot.test").lower()


def test_dns_over_https(unbound_dot):
    if not dns.query.have_doh:
        missing = "dnspython's 'doh' extra is not installed (pip install 'dnspython[doh]')"
        pytest.fail(f"{missing}, and CI must install it") if os.environ.get("CI") else pytest.skip(missing)
    server, ca = unbound_dot
    url = f"https://127.0.0.1:{server.https_port}/dns-query"
    resolver = resolver_for(f"dns:\n  servers: [{{address: '{url}', ca: '{ca}'}}]\n")
    assert resolve(resolver, "www.dot.test") == [ip("127.0.0.9")]
    assert resolve_error(resolver, "nothing.dot.test") == "nothing.dot.test does not exist (NXDOMAIN)"
    untrusted = resolver_for(f"dns:\n  servers: ['{url}']\n  timeout: 500ms\n")  # the system's CAs only
    assert "certificate verify failed" in resolve_error(untrusted, "www.dot.test").lower()


# ---------------------------------------------------------------------------- through the core


def test_core_resolves_through_the_plugin_outside_sessions(dnsmasq):
    """``socksflow explain``/``check`` resolve with session=None: the plugin still finds its config."""
    server = dnsmasq()
    config = load(f"dns:\n  servers: ['{server.address}']\n")
    pm = PluginManager()
    pm.register(dns_plugin, "dns")
    resolve = resolution.resolver(Hooks(pm, config.timeouts.hook), config)
    assert asyncio.run(resolve("dual.test", 80)) == (ip("127.0.0.1"), ip("::1"))
    assert server.queries("dual.test", "A") == 1
