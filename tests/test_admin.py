"""The admin API end to end: a real server, real sessions (curl through the proxy), a real HTTP client."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import socketserver
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import require_tool, serve_tcp
from socksflow_plugins.admin import LISTENER

from socksflow.testing import socks5_handshake, wait_until

TOKEN = "s3cret-token-for-tests"


def admin_url(running) -> str:
    return "http://" + running.call(lambda: running.server.stash[LISTENER].address)


def api(running, method: str, path: str, token: str | None = None, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, admin_url(running) + path, headers=headers, timeout=10, **kwargs)


def config(target_port: int, extra: str = "") -> str:
    return (
        "listen: [127.0.0.1:0]\n"
        "admin: {listen: 127.0.0.1:0}\n"
        "log: {access: {format: json, file: access.log}}\n"
        "rules:\n"
        "  - deny: {to: [10.0.0.0/8]}\n"  # line 5: never matched
        f"  - deny: {{port: [{target_port + 1 if target_port < 65535 else 1}]}}\n"  # line 6
        "  - allow: {from: [127.0.0.0/8]}\n"  # line 7
        + extra
    )  # fmt: skip


class TrickleHandler(socketserver.BaseRequestHandler):
    """An HTTP response of 100 MB sent 2 KB every 50 ms: a download that stays open, with no buffer filled."""

    def handle(self) -> None:
        self.request.recv(65536)
        self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
        deadline = time.monotonic() + 60
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline:
                self.request.sendall(b"x" * 2048)
                time.sleep(0.05)


@pytest.fixture(scope="module")
def trickle():
    yield from serve_tcp(TrickleHandler)


class Curl:
    """curl through the proxy, downloading from the trickle target, so the session stays open."""

    def __init__(self, proxy: str, target: tuple[str, int]) -> None:
        curl = require_tool("curl")
        self.process = subprocess.Popen(
            [curl, "-sS", "--socks5", proxy, "-o", "/dev/null", "http://{}:{}/".format(*target)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip

    def wait(self) -> int:
        try:
            return self.process.wait(20)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(5)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(5)


@pytest.fixture
def curls():
    started: list[Curl] = []
    yield started
    for curl in started:
        curl.kill()


def connect_code(proxy, destination: str) -> int:
    code, client = socks5_handshake(proxy, destination)
    client.close()
    return code


def sessions(running, **filters) -> list[dict]:
    response = api(running, "GET", "/api/sessions", params=filters)
    assert response.status_code == 200, response.text
    return response.json()["sessions"]


def access_lines(tmp_path: Path) -> list[dict]:
    path = tmp_path / "access.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_live_sessions_are_listed_filtered_and_closed_with_the_reason_logged(
    socksflow_server, trickle, tmp_path, curls
):
    running = socksflow_server(config(trickle[1]))
    proxy = f"{running.host}:{running.port}"
    for _ in range(2):
        curls.append(Curl(proxy, trickle))
    assert wait_until(lambda: len(sessions(running, state="relay")) == 2, 10)
    assert wait_until(lambda: all(s["bytes_down"] > 0 for s in sessions(running)), 10)
    first, second = sorted(sessions(running), key=lambda s: s["id"])
    assert first["protocol"] == "socks5" and first["command"] == "connect"
    assert first["client"].startswith("127.0.0.1:")
    assert first["destination"] == first["address"] == f"127.0.0.1:{trickle[1]}"
    assert first["rule"].endswith("rules.yaml:7")
    assert first["outbound"] is None and first["user"] is None
    assert first["age"] > 0 and first["bytes_up"] > 0
    # Filters: by client (its port is unique), by rule, by destination.
    assert [s["id"] for s in sessions(running, client=first["client"])] == [first["id"]]
    assert len(sessions(running, rule="rules.yaml:7")) == 2
    assert sessions(running, rule="rules.yaml:6") == []
    assert sessions(running, destination="10.9.9.9") == []
    assert wait_until(lambda: all(s["rate_down"] > 10_000 for s in sessions(running)), 5)  # 40 KB/s each

    response = api(running, "POST", f"/api/sessions/{first['id']}/close")
    assert response.json() == {"closed": [first["id"]]}
    assert api(running, "POST", f"/api/sessions/{first['id']}/close").status_code == 404
    assert wait_until(lambda: [s["id"] for s in sessions(running)] == [second["id"]], 5)
    assert api(running, "POST", "/api/sessions/close").status_code == 400  # no filter, no all=1
    response = api(running, "POST", "/api/sessions/close", params={"destination": f":{trickle[1]}"})
    assert response.json() == {"closed": [second["id"]]}
    assert wait_until(lambda: sessions(running) == [], 5)
    for curl in curls:
        assert curl.wait() != 0  # cut off mid-download
    assert wait_until(lambda: len(access_lines(tmp_path)) == 2, 5)
    lines = {line["session"]: line for line in access_lines(tmp_path)}
    assert lines[first["id"]]["reason"] == "closed by admin"
    assert lines[second["id"]]["reason"] == "closed by admin"
    assert lines[first["id"]]["bytes_down"] > 0

    totals = api(running, "GET", "/api/totals").json()
    assert totals["ended"] == 2 and totals["sessions"] == 0 and totals["bytes_down"] > 0
    assert api(running, "GET", "/api/traffic").json()["samples"]


def test_rule_hits_count_every_rule_including_those_never_matched(socksflow_server, echo_target):
    host, port = echo_target
    running = socksflow_server(config(port))
    assert connect_code(running.address, f"{host}:{port}") == 0
    assert connect_code(running.address, f"{host}:{port + 1}") == 2  # denied by line 6
    assert connect_code(running.address, f"{host}:{port}") == 0
    hits = api(running, "GET", "/api/rules").json()["hits"]
    counts = {rule["rule"].rsplit(":", 1)[1]: (rule["action"], rule["hits"]) for rule in hits["rules"]}
    assert counts == {"5": ("deny", 0), "6": ("deny", 1), "7": ("allow", 2)}
    assert hits["unmatched"] == 0


def test_the_api_refuses_requests_without_the_token(socksflow_server):
    running = socksflow_server(f"listen: [127.0.0.1:0]\nadmin: {{listen: 127.0.0.1:0, token: {TOKEN}}}\n")
    assert api(running, "GET", "/api/sessions").status_code == 401
    assert api(running, "GET", "/api/sessions", token="wrong-token-of-some-length").status_code == 401
    assert api(running, "GET", "/api/sessions", token=TOKEN).status_code == 200
    assert api(running, "GET", "/api/health", params={"token": TOKEN}).status_code == 200
    config = api(running, "GET", "/api/config", token=TOKEN).json()["config"]
    assert config["admin"]["token"] == "***"
    assert api(running, "GET", "/").status_code == 200  # the page itself holds no data


def run_cli(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "socksflow", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def test_a_non_loopback_admin_listener_needs_a_token(tmp_path):
    (tmp_path / "rules.yaml").write_text("listen: [127.0.0.1:0]\nadmin:\n  listen: 0.0.0.0:9180\n")
    for command in ("check", "run"):
        result = run_cli(command, cwd=tmp_path)
        assert result.returncode == 1
        assert (
            "rules.yaml:3: admin.listen: 0.0.0.0:9180 is not a loopback address: set a token" in result.stderr
        )
    (tmp_path / "rules.yaml").write_text(
        f"listen: [127.0.0.1:0]\nadmin: {{listen: 0.0.0.0:9180, token: {TOKEN}}}\n"
    )
    assert run_cli("check", cwd=tmp_path).returncode == 0


def test_without_an_admin_section_the_plugin_is_dormant(socksflow_server):
    running = socksflow_server("")
    assert running.call(lambda: running.server.stash.get(LISTENER)) is None
    assert "socksflow_plugins.admin" in sys.modules
    # dormant per session too: its session_end hook is not among the configured hooks
    hooks = running.config.hooks.impls("socksflow_session_end")
    assert "admin" not in {impl.plugin for impl in hooks}


HEAD = "listen: [127.0.0.1:0]\nadmin: {listen: 127.0.0.1:0, recent: 100}\nrules:\n"
OLD_RULES = HEAD + "  - deny: {port: [PORT_B]}\n  - allow: all\n"  # rules at lines 4 and 5
NEW_RULES = HEAD + "  - deny: {port: [PORT_A]}\n  - allow: all\n"
BAD_RULES = HEAD + "  - allow: all\n  - deny: {port: [not-a-port]}\n"


def test_reload_validates_reports_the_flips_and_applies(socksflow_server, echo_target, trickle, tmp_path):
    host, port_a = echo_target
    port_b = trickle[1]
    old = OLD_RULES.replace("PORT_A", str(port_a)).replace("PORT_B", str(port_b))
    running = socksflow_server(old)
    for port, code in ((port_a, 0), (port_a, 0), (port_b, 2)):
        assert connect_code(running.address, f"{host}:{port}") == code
    rules = tmp_path / "rules.yaml"
    before = api(running, "GET", "/api/rules").json()

    rules.write_text(BAD_RULES)
    response = api(running, "POST", "/api/reload")
    assert response.status_code == 422
    body = response.json()
    assert body["applied"] is False
    assert any(e.startswith(f"{rules}:5: rules[1].deny.port") for e in body["errors"]), body["errors"]
    assert api(running, "GET", "/api/rules").json() == before  # nothing changed
    assert connect_code(running.address, f"{host}:{port_b}") == 2  # the old rules still decide

    rules.write_text(NEW_RULES.replace("PORT_A", str(port_a)).replace("PORT_B", str(port_b)))
    dry = api(running, "POST", "/api/reload", params={"dry_run": "1"}).json()
    assert dry["ok"] and dry["applied"] is False and dry["warnings"] == []
    assert dry["diff"]["replayed"] == 4
    flips = sorted(
        (f["destination"], f["before"].split()[0], f["after"].split()[0]) for f in dry["diff"]["flips"]
    )
    assert flips == sorted(
        [(f"{host}:{port_a}", "allow", "deny")] * 2 + [(f"{host}:{port_b}", "deny", "allow")] * 2
    )
    assert connect_code(running.address, f"{host}:{port_b}") == 2  # a dry run applies nothing

    result = run_cli("reload", "--dry-run", "--admin", admin_url(running)[7:], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "replayed the last 5 decisions: 5 would change" in result.stdout
    assert f"{host}:{port_a}: allow by {rules}:5 -> deny by {rules}:4" in result.stdout
    assert "valid, not applied (dry run)" in result.stdout

    result = run_cli("reload", "--admin", admin_url(running)[7:], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{rules}: applied" in result.stdout
    assert connect_code(running.address, f"{host}:{port_a}") == 2
    assert connect_code(running.address, f"{host}:{port_b}") == 0

    rules.write_text(
        NEW_RULES.replace("recent: 100", f"recent: 50, token: {TOKEN}").replace("PORT_A", str(port_a))
    )
    dry = api(running, "POST", "/api/reload", params={"dry_run": "1"}).json()  # the token is not in force yet
    assert dry["warnings"] == [
        f"{rules}: admin: changes to this section (listen, token, recent) apply at the next restart"
    ]
    rules.write_text(BAD_RULES)
    result = run_cli("reload", "--admin", admin_url(running)[7:], cwd=tmp_path)
    assert result.returncode == 1
    assert f"{rules}:5: rules[1].deny.port" in result.stderr
    assert "rejected; the running configuration is unchanged" in result.stderr


def test_shadow_rules_through_the_api_count_only_disagreements(socksflow_server, echo_target, tmp_path):
    host, port_a = echo_target
    port_b = port_a + 1 if port_a < 65535 else port_a - 1
    running = socksflow_server(OLD_RULES.replace("PORT_B", str(port_b)))
    shadow = tmp_path / "shadow.yaml"
    shadow.write_text("rules:\n  - deny: {port: [BAD]}\n")
    response = api(running, "POST", "/api/shadow", json={"file": str(shadow)})
    assert response.status_code == 422 and f"{shadow}:2" in response.json()["errors"][0]
    shadow.write_text(f"rules:\n  - deny: {{port: [{port_a}]}}\n  - allow: all\n")
    assert api(running, "POST", "/api/shadow", json={"file": str(shadow)}).json()["ok"]
    for port, code in ((port_a, 0), (port_b, 2), (port_a, 0)):
        assert connect_code(running.address, f"{host}:{port}") == code  # traffic as the rules in force say
    report = api(running, "GET", "/api/shadow").json()["report"]
    assert (report["compared"], report["disagreed"], report["undecided"]) == (3, 3, 0)
    recent = report["recent"][0]
    assert recent["destination"] == f"{host}:{port_a}"
    assert recent["in_force"].startswith("allow by ") and recent["in_force"].endswith("rules.yaml:5")
    assert recent["shadow"] == f"deny by {shadow}:2"
    assert api(running, "DELETE", "/api/shadow").json() == {"ok": True, "shadow": None}


def test_run_with_shadow_logs_disagreements_and_changes_nothing(tmp_path, echo_target):
    from test_cli import Proxy

    host, port = echo_target
    (tmp_path / "rules.yaml").write_text("rules:\n  - allow: all\n")
    (tmp_path / "new.yaml").write_text(
        f"rules:\n  - allow: {{port: [{port + 1}]}}\n  - deny: {{port: [{port}]}}\n"
    )
    proxy = Proxy("--shadow", "new.yaml", cwd=tmp_path)
    try:
        assert connect_code(proxy.address, f"{host}:{port}") == 0  # allowed: the shadow rules only watch
        code, stderr = proxy.stop()
    finally:
        if proxy.process.poll() is None:
            proxy.process.kill()
            proxy.process.wait(10)
    assert code == 0
    assert "in force: allow by rules.yaml:2; shadow: deny by new.yaml:3" in stderr


def test_sessions_and_top_commands_print_the_tables(socksflow_server, trickle, tmp_path, curls):
    running = socksflow_server(config(trickle[1]))
    curls.append(Curl(f"{running.host}:{running.port}", trickle))
    assert wait_until(lambda: len(sessions(running, state="relay")) == 1, 10)
    address = admin_url(running)[7:]
    result = run_cli("sessions", "--admin", address, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    header, row, summary = result.stdout.strip().splitlines()
    assert header.split() == [
        "ID",
        "CLIENT",
        "USER",
        "CMD",
        "DESTINATION",
        "ADDRESS",
        "RULE",
        "UP",
        "DOWN",
        "AGE",
    ]
    assert f"connect  127.0.0.1:{trickle[1]}" in row
    assert summary == "1 of 1 sessions"
    result = run_cli(
        "sessions", "--admin", address, "--json", "--destination", f":{trickle[1]}", cwd=tmp_path
    )
    assert json.loads(result.stdout)["sessions"][0]["destination"] == f"127.0.0.1:{trickle[1]}"
    assert wait_until(lambda: sessions(running)[0]["rate_down"] > 10_000, 5)
    result = run_cli("top", "--once", "--admin", address, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary, _, header, row = result.stdout.strip().splitlines()
    assert summary.startswith("1 open, 0 ended, 0 denied; up ")
    assert header.split()[-3:] == ["UP/S", "DOWN/S", "AGE"]
    assert f"connect  127.0.0.1:{trickle[1]}" in row and "KiB/s" in row  # 40 KB/s down
    result = run_cli("sessions", "--admin", address, "--close", "--client", "127.0.0.1", cwd=tmp_path)
    assert result.stdout.strip() == "closed 1 sessions"
    assert wait_until(lambda: sessions(running) == [], 5)
    # the address from the rules file's admin: section
    (tmp_path / "other.yaml").write_text(f"admin: {{listen: '{address}'}}\n")
    result = run_cli("sessions", "-c", "other.yaml", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("0 of 0 sessions")


def test_rates_follow_the_bytes_moving_now(socksflow_server, echo_target):
    host, port = echo_target
    running = socksflow_server(config(port))
    code, client = socks5_handshake(running.address, f"{host}:{port}")
    assert code == 0
    with client:

        def sending() -> bool:
            client.sock.sendall(b"x" * 10_000)
            assert client.recv_exactly(10_000) == b"x" * 10_000
            time.sleep(0.1)
            rows = sessions(running)
            return len(rows) == 1 and rows[0]["rate_up"] > 20_000 and rows[0]["rate_down"] > 20_000

        assert wait_until(sending, 10)
        assert api(running, "GET", "/api/totals").json()["rate_up"] > 20_000


def test_the_traffic_stream_sends_samples(socksflow_server):
    running = socksflow_server("listen: [127.0.0.1:0]\nadmin: {listen: 127.0.0.1:0}\n")
    began = time.monotonic()
    with httpx.stream("GET", admin_url(running) + "/api/stream", timeout=10) as response:
        assert response.headers["content-type"] == "text/event-stream"
        for line in response.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                break
    assert time.monotonic() - began < 5
    assert set(event) == {"traffic", "totals"} and event["totals"]["sessions"] == 0


def test_with_workers_the_api_shows_the_whole_server(tmp_path, echo_target):
    from test_cli import Proxy

    host, port = echo_target
    (tmp_path / "rules.yaml").write_text(
        "admin: {listen: 127.0.0.1:0}\nlog: {access: {format: json, file: access.log}}\nrules:\n  - allow: all\n"
    )
    proxy = Proxy("--workers", "2", cwd=tmp_path)
    clients = []
    try:
        for line in proxy.process.stderr:  # worker 0 logs its address before the ready line
            match = re.search(r"admin API and dashboard on (http://\S+)/", line)
            if match:
                base = match[1]
                break
        for _ in range(16):  # SO_REUSEPORT spreads them: all on one worker has odds of 2 in 65536
            code, client = socks5_handshake(proxy.address, f"{host}:{port}")
            assert code == 0
            clients.append(client)

        def get(path: str) -> dict:
            response = httpx.get(base + path, timeout=10)
            assert response.status_code == 200, response.text
            return response.json()

        assert wait_until(lambda: get("/api/sessions")["total"] == 16, 10)
        listed = get("/api/sessions?limit=5&offset=10")
        assert len(listed["sessions"]) == 5 and listed["matched"] == 16
        rows = get("/api/sessions?limit=100")["sessions"]
        assert {row["worker"] for row in rows} == {0, 1}
        assert get("/api/rules")["hits"]["rules"][0]["hits"] == 16
        assert get("/api/totals")["sessions"] == 16
        assert get("/api/ready") == {"ready": True, "workers": [0, 1], "missing_workers": []}
        victim = next(row for row in rows if row["worker"] == 1)
        closed = httpx.post(f"{base}/api/sessions/{victim['id']}/close", timeout=10).json()
        assert closed == {"closed": [victim["id"]]}
        assert wait_until(lambda: get("/api/totals")["sessions"] == 15, 5)
        response = httpx.post(f"{base}/api/sessions/close", params={"all": "1"}, timeout=10).json()
        assert len(response["closed"]) == 15 and response["missing_workers"] == []
        assert wait_until(lambda: get("/api/totals")["ended"] == 16, 5)
        dry = httpx.post(f"{base}/api/reload", params={"dry_run": "1"}, timeout=10).json()
        assert dry["diff"]["replayed"] == 16 and dry["diff"]["flipped"] == 0
    finally:
        for client in clients:
            client.close()
        code, stderr = proxy.stop()
    assert code == 0, stderr
    local_id = victim["id"].split(":")[1]
    assert wait_until(lambda: len(access_lines(tmp_path)) == 16, 5)
    reasons = {line["reason"] for line in access_lines(tmp_path)}
    assert reasons == {"closed by admin"}
    assert any(line["session"] == local_id for line in access_lines(tmp_path))


def test_other_web_sites_cannot_drive_the_api(socksflow_server, trickle, curls):
    running = socksflow_server(config(trickle[1]))
    curls.append(Curl(f"{running.host}:{running.port}", trickle))
    assert wait_until(lambda: len(sessions(running)) == 1, 10)
    url = admin_url(running)
    # A page elsewhere POSTing to the loopback API, and a name rebound to 127.0.0.1:
    response = httpx.post(
        f"{url}/api/sessions/close?all=1", headers={"Origin": "http://evil.example"}, timeout=10
    )
    assert response.status_code == 403
    response = httpx.get(f"{url}/api/sessions", headers={"Host": "rebound.example:80"}, timeout=10)
    assert response.status_code == 403
    assert len(sessions(running)) == 1
    same_site = httpx.post(f"{url}/api/sessions/close?all=1", headers={"Origin": url}, timeout=10)
    assert same_site.status_code == 200 and len(same_site.json()["closed"]) == 1


def test_udp_associations_and_bind_listeners_are_listed(socksflow_server):
    from socksflow.testing import Socks5Client

    running = socksflow_server(
        "listen: [127.0.0.1:0]\nadmin: {listen: 127.0.0.1:0}\nrules:\n  - allow: all\n"
    )
    with Socks5Client(running.address) as udp, Socks5Client(running.address) as bind:
        udp.greet()
        code, relay = udp.udp_associate()
        assert code == 0
        bind.greet()
        code, listening = bind.bind("127.0.0.1:0")
        assert code == 0
        associations = api(running, "GET", "/api/udp").json()["associations"]
        assert [(a["command"], a["state"], a["bound"]) for a in associations] == [
            ("udp_associate", "udp", str(relay))
        ]
        assert associations[0]["datagrams_up"] == 0
        listeners = api(running, "GET", "/api/bind").json()["listeners"]
        assert [(b["command"], b["bound"]) for b in listeners] == [("bind", str(listening))]
        closed = api(running, "POST", "/api/sessions/close", params={"state": "udp"}).json()["closed"]
        assert closed == [associations[0]["id"]]
        assert wait_until(lambda: api(running, "GET", "/api/udp").json()["associations"] == [], 5)


@pytest.mark.smoke
def test_the_config_is_shown_with_secrets_masked():
    from socksflow_plugins.admin.views import masked

    config = {
        "admin": {"listen": "127.0.0.1:9180", "token": "t" * 20},
        "upstreams": ["socks5://bob:hunter2@10.0.0.1:1080", "http://proxy.example/"],
        "dns": {"servers": ["1.1.1.1"], "api_key": "k"},
    }
    assert masked(config) == {
        "admin": {"listen": "127.0.0.1:9180", "token": "***"},
        "upstreams": ["socks5://bob:***@10.0.0.1:1080", "http://proxy.example/"],
        "dns": {"servers": ["1.1.1.1"], "api_key": "***"},
    }


@pytest.mark.smoke
def test_an_admin_section_without_aiohttp_is_refused_naming_the_package(monkeypatch):
    import importlib.util

    from socksflow_plugins.admin.settings import read_settings

    from socksflow import Config, ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "aiohttp" else real(name, *a)
    )
    config = Config.from_text("listen: [127.0.0.1:0]\nadmin: {listen: 127.0.0.1:9180}\n", "rules.yaml")
    with pytest.raises(ConfigError) as error:
        read_settings(config)
    assert (
        str(error.value) == "rules.yaml:2: admin: the admin API needs aiohttp: pip install 'socksflow[admin]'"
    )
    assert (
        read_settings(Config.from_text("listen: [127.0.0.1:0]\n", "rules.yaml")) is None
    )  # dormant, no import


def test_limit_refusals_are_listed(socksflow_server, echo_target):
    host, port = echo_target
    running = socksflow_server(
        "listen: [127.0.0.1:0]\nadmin: {listen: 127.0.0.1:0}\n"
        "limits:\n  - match: {from: 127.0.0.0/8}\n    max_sessions: 1\n"
    )
    code, held = socks5_handshake(running.address, f"{host}:{port}")
    assert code == 0
    with held:
        refused = socket.create_connection((running.host, running.port), timeout=10)
        refused.sendall(b"\x05\x01\x00")
        assert refused.recv(16) == b""  # closed before the greeting: over the limit
        refused.close()
        assert wait_until(lambda: api(running, "GET", "/api/events").json()["refusals"], 5)
        (event,) = api(running, "GET", "/api/events").json()["refusals"]
        assert event["plugin"] == "limits" and event["client"].startswith("127.0.0.1:")
        assert api(running, "GET", "/api/events").json()["auth_failures"] == []
        assert api(running, "GET", "/api/totals").json()["denied"] == 1
