"""The metrics plugin: /metrics scraped over HTTP after known traffic, every series checked."""

from __future__ import annotations

import contextlib
import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from socksflow_plugins import metrics

import socksflow
from socksflow.app import configure
from socksflow.config import Config
from socksflow.errors import ConfigErrors
from socksflow.plugins import PluginManager
from socksflow.protocol import Method, Reply, parse_host
from socksflow.testing import Socks5Client

METRICS = "listen: [127.0.0.1:0]\nmetrics: {listen: 127.0.0.1:0}\n"  # both: the fixture adds no listen then
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an environment proxy


class Policy:
    """Port 9 is denied by a rule, port 10 makes the plugin fail; echo.test resolves to 127.0.0.1;
    clients offering username/password get it, and every user but mallory is welcome."""

    __name__ = "policy"

    @socksflow.hookimpl
    def socksflow_select_method(self, offered):
        return Method.USERPASS if Method.USERPASS in offered else None

    @socksflow.hookimpl
    def socksflow_authenticate(self, username):
        return socksflow.Verdict.deny("go away") if username == b"mallory" else socksflow.Identity("someone")

    @socksflow.hookimpl
    def socksflow_request(self, request):
        if request.destination.port == 9:
            return socksflow.Verdict.deny("no", rule="policy.yaml:3")
        if request.destination.port == 10:
            raise RuntimeError("policy bug")
        return None

    @socksflow.hookimpl
    def socksflow_resolve(self, host):
        return [parse_host("127.0.0.1")] if host == "echo.test" else None


def scrape(server, path: str = "/metrics") -> dict[tuple[str, frozenset], float]:
    """Every sample of the server's endpoint, keyed by name and labels."""
    address = server.server.stash[metrics.METRICS].address
    with HTTP.open(f"http://{address}{path}", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def echo_session(server, destination: str, payload: bytes) -> None:
    with Socks5Client(server.address) as client:
        client.greet()
        assert client.connect(destination)[0] == Reply.SUCCEEDED
        client.sock.sendall(payload)
        assert client.recv_exactly(len(payload)) == payload


def test_series_after_known_traffic(socksflow_server, echo, refusing_port):
    server = socksflow_server(
        METRICS + "limits:\n  - {match: {from: 127.0.0.3/32}, max_sessions: 0}\n", plugins=[Policy()]
    )
    limit_rule = f"{server.config.file}:4"  # where the limits entry is
    with Socks5Client(server.address) as held:
        held.greet()
        assert held.connect(echo)[0] == Reply.SUCCEEDED
        assert value(scrape(server), "socksflow_sessions_active") == 1

    echo_session(server, echo, b"hello")
    echo_session(server, "echo.test:{}".format(echo.rpartition(":")[2]), b"bonjour")
    answers = {9: Reply.NOT_ALLOWED, 10: Reply.GENERAL_FAILURE, refusing_port: Reply.CONNECTION_REFUSED}
    for port, reply in answers.items():
        with Socks5Client(server.address) as client:
            client.greet()
            assert client.connect(f"127.0.0.1:{port}")[0] == reply
    with Socks5Client(server.address) as client:
        client.greet([Method.USERPASS])
        assert client.login("mallory", "secret") == 1
    with socket.create_connection((server.host, server.port), source_address=("127.0.0.3", 0)) as refused:
        refused.sendall(bytes((5, 1, Method.NO_AUTH)))
        assert refused.recv(2) == b""

    deadline = time.monotonic() + 5
    while (samples := scrape(server)) and sum(
        v for (name, _), v in samples.items() if name == "socksflow_sessions_total"
    ) < 8:
        assert time.monotonic() < deadline, samples
        time.sleep(0.02)

    sessions = "socksflow_sessions_total"
    socks5 = {"protocol": "socks5"}
    assert value(samples, sessions, command="connect", verdict="allow", **socks5) == 4  # 3 echo, 1 refused
    assert value(samples, sessions, command="connect", verdict="deny", **socks5) == 2  # rule, plugin fault
    assert value(samples, sessions, command="none", verdict="deny", **socks5) == 1  # mallory
    assert value(samples, sessions, command="none", verdict="deny", protocol="none") == 1  # the limit
    assert value(samples, "socksflow_sessions_active") == 0
    assert value(samples, "socksflow_relayed_bytes_total", direction="up") == 5 + 7
    assert value(samples, "socksflow_relayed_bytes_total", direction="down") == 5 + 7
    assert value(samples, "socksflow_handshake_seconds_count") == 6  # every session that sent a request
    assert value(samples, "socksflow_connect_seconds_count") == 3  # every successful dial
    assert value(samples, "socksflow_dns_seconds_count") == 1  # echo.test
    assert 0 < value(samples, "socksflow_dns_seconds_sum") < 1
    assert value(samples, "socksflow_handshake_seconds_bucket", le="+Inf") == 6
    assert value(samples, "socksflow_rule_hits_total", rule="policy.yaml:3", verdict="deny") == 1
    assert value(samples, "socksflow_rule_hits_total", rule=limit_rule, verdict="deny") == 1
    assert value(samples, "socksflow_denials_total", plugin="policy", stage="request") == 2
    assert value(samples, "socksflow_denials_total", plugin="limits", stage="accept") == 1
    assert value(samples, "socksflow_denials_total", plugin="policy", stage="auth") == 1
    assert value(samples, "socksflow_plugin_errors_total", plugin="policy", hook="socksflow_request") == 1


def test_each_server_has_its_own_registry_and_endpoint(socksflow_server, echo):
    one = socksflow_server(METRICS)
    two = socksflow_server(METRICS)
    echo_session(one, echo, b"x")
    deadline = time.monotonic() + 5
    allowed = {"command": "connect", "verdict": "allow", "protocol": "socks5"}
    while value(scrape(one), "socksflow_sessions_total", **allowed) != 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert value(scrape(two), "socksflow_sessions_total", **allowed) == 0


def test_other_paths_are_not_found_and_the_endpoint_stops_with_the_server(socksflow_server):
    server = socksflow_server(METRICS)
    address = server.server.stash[metrics.METRICS].address
    with pytest.raises(urllib.error.HTTPError) as info:
        HTTP.open(f"http://{address}/", timeout=10)
    assert info.value.code == 404
    with socket.create_connection((str(address.host), address.port), timeout=5) as sock:
        sock.sendall(b"\r\n\r\n")  # not HTTP at all
        assert sock.recv(100).startswith(b"HTTP/1.1 404 ")
    with socket.create_connection((str(address.host), address.port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"a" * 10000)  # a head past the 8 KiB cap
        with contextlib.suppress(ConnectionResetError):  # closing with unread input may reset
            assert sock.recv(100) == b""  # closed without an answer
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((str(address.host), address.port), timeout=5)


def configured(text: str) -> Config:
    pm = PluginManager()
    pm.register(metrics, "metrics")
    config = Config.from_text(text, "rules.yaml")
    configure(pm, config)
    return config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("metrics: {listen: 0.0.0.0:9150}", "rules.yaml:1: metrics.listen: 0.0.0.0:9150 is not a loopback"),
        ("metrics:\n  listen: '[2001:db8::1]:9'", "rules.yaml:2: metrics.listen: [2001:db8::1]:9 is not"),
        ("metrics: {listen: localhost:9150}", "metrics.listen: listen on an IP address"),
        ("metrics: {allow_remote: yes}", "rules.yaml:1: metrics.allow_remote: 'yes' is read as a boolean"),
        ("metrics: {port: 9150}", "metrics.port: unknown key"),
    ],
)
def test_config_errors_are_located(text, message):
    with pytest.raises(ConfigErrors) as info:
        configured(text)
    assert message in str(info.value)


def test_defaults_and_remote_opt_in():
    assert str(configured("metrics:\n").stash[metrics.SETTINGS].listen) == "127.0.0.1:9150"
    assert str(configured("metrics: {listen: '[::1]:9'}").stash[metrics.SETTINGS].listen) == "[::1]:9"
    remote = configured("metrics: {listen: 192.0.2.1:9150, allow_remote: true}")  # checked, never bound
    assert str(remote.stash[metrics.SETTINGS].listen) == "192.0.2.1:9150"


def test_logins_refused_by_a_block_are_counted_not_logged(socksflow_server, tmp_path, caplog):
    """Issue #13: a block is logged once; the connections it refuses show in socksflow_denials_total."""
    from helpers import write_htpasswd

    write_htpasswd(tmp_path / "users", {"alice": "alice-secret"})
    server = socksflow_server(
        METRICS + "auth: {methods: [userpass], users: users}\n"
        "limits: [{auth_failures: {max: 2, within: 1m, block: 1m}}]\n"
    )
    early = socket.create_connection((server.host, server.port))
    early.sendall(b"\x05\x01\x02")
    assert early.recv(2) == b"\x05\x02"
    for _ in range(2):
        with Socks5Client(server.address) as client:
            client.greet([Method.USERPASS])
            assert client.login("alice", "guess") == 1
    early.sendall(b"\x01\x05alice\x0calice-secret")
    assert early.recv(2) == b"\x01\x01"  # blocked while it waited
    early.close()
    for _ in range(3):
        with socket.create_connection((server.host, server.port)) as refused:
            refused.sendall(b"\x05\x01\x02")
            assert refused.recv(2) == b""
    deadline = time.monotonic() + 5
    while value(samples := scrape(server), "socksflow_denials_total", plugin="limits", stage="accept") < 3:
        assert time.monotonic() < deadline, samples
        time.sleep(0.02)
    assert value(samples, "socksflow_denials_total", plugin="limits", stage="auth") == 1
    assert value(samples, "socksflow_denials_total", plugin="auth", stage="auth") == 2
    assert sum("failed logins within" in r.getMessage() for r in caplog.records) == 1
    assert not [r for r in caplog.records if r.levelno >= 20 and "refused: limit reached" in r.getMessage()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_with_workers_one_scrape_shows_the_sum_over_every_worker(tmp_path, echo_target):
    import signal
    import subprocess
    import sys

    from socksflow.testing import loop_args, parse_ready_line, socks5_handshake

    port = free_port()
    (tmp_path / "rules.yaml").write_text(
        f"metrics: {{listen: 127.0.0.1:{port}}}\ntimeouts: {{shutdown: 2s}}\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "socksflow", "run", "--listen", "127.0.0.1:0", "--workers", "2", *loop_args()],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        ready = parse_ready_line(process.stdout.readline())
        assert ready is not None and ready.workers == 2
        host, proxy_port = ready.address
        # 40 sessions land on both workers (SO_REUSEPORT hashes each connection): a scrape that
        # showed one worker's count would see fewer than 40 (all on one: a chance of 2^-39).
        for _ in range(40):
            code, client = socks5_handshake((host, int(proxy_port)), f"127.0.0.1:{echo_target[1]}")
            assert code == 0
            client.close()

        def sessions() -> float:
            with HTTP.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                text = response.read().decode()
            return sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "socksflow_sessions_total"
            )

        deadline = time.monotonic() + 10
        while sessions() < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sessions() == 40
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr
    assert "did not answer" not in stderr
