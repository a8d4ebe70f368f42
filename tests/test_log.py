"""The access log plugin: one parsed line per session, every field checked; reopen by call and by SIGUSR1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import write_htpasswd
from hypothesis import given
from hypothesis import strategies as st
from socksflow_plugins import log as access_log

import socksflow
from socksflow.app import configure
from socksflow.config import Config
from socksflow.errors import ConfigErrors
from socksflow.plugins import PluginManager
from socksflow.protocol import Address, Method, Reply
from socksflow.testing import Socks5Client, loop_args

PASSWORDS = {"alice": "alice-secret"}
AUTH = "auth: {methods: [userpass, none], users: users.htpasswd}\n"
JSON_LOG = "log: {access: {format: json, file: access.log}}\n"
DENIED_PORT = 9


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    """users.htpasswd next to the fixture's rules.yaml."""
    return write_htpasswd(tmp_path / "users.htpasswd", PASSWORDS)


class Denier:
    """A request policy for tests: port 9 is refused, naming a rule."""

    __name__ = "denier"

    @socksflow.hookimpl
    def socksflow_request(self, request):
        if request.destination.port == DENIED_PORT:
            return socksflow.Verdict.deny("not on my watch", rule="policy.yaml:7")
        return None


def lines(path: Path, count: int, timeout: float = 5.0) -> list[str]:
    """The file's lines once it has ``count`` of them (session_end runs just after the close)."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        found = text.splitlines()
        if len(found) >= count:
            assert len(found) == count, found
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} has {len(found)} lines, expected {count}: {found}")
        time.sleep(0.01)


def client_address(client: Socks5Client) -> str:
    return "{}:{}".format(*client.sock.getsockname())


def stable(record: dict) -> dict:
    """The fields a test can predict exactly (not the time, the session id or the duration)."""
    return {k: v for k, v in record.items() if k not in ("time", "session", "duration")}


def echo_once(client: Socks5Client, payload: bytes = b"hello") -> None:
    client.sock.sendall(payload)
    assert client.recv_exactly(len(payload)) == payload
    client.close()


# ---------------------------------------------------------------------------- JSON lines, field by field


def test_json_lines_for_allowed_denied_failed_and_refused_sessions(
    socksflow_server, tmp_path, htpasswd, echo, refusing_port
):
    server = socksflow_server(AUTH + JSON_LOG, plugins=[Denier()])
    path = tmp_path / "access.log"
    began = datetime.now(UTC)

    allowed = Socks5Client(server.address)
    assert allowed.greet([Method.USERPASS]) == Method.USERPASS and allowed.login("alice", "alice-secret") == 0
    assert allowed.connect(echo)[0] == Reply.SUCCEEDED
    allowed_from = client_address(allowed)
    echo_once(allowed)
    first = json.loads(lines(path, 1)[0])
    stamp = datetime.fromisoformat(first.pop("time").replace("Z", "+00:00"))
    assert began - timedelta(milliseconds=1) <= stamp <= datetime.now(UTC)  # accepted after `began`
    assert re.fullmatch(r"[0-9a-f]+", first.pop("session"))
    duration = first.pop("duration")
    assert 0 < duration < 5
    assert first == {
        "client": allowed_from, "protocol": "socks5", "user": "alice", "command": "connect", "destination": echo, "remote": echo,
        "verdict": "allow", "rule": None, "plugin": None, "reply": 0, "bytes_up": 5, "bytes_down": 5,
        "authenticated": True, "reason": "closed",
    }  # fmt: skip

    with Socks5Client(server.address) as denied:
        denied.greet([Method.USERPASS])
        denied.login("alice", "alice-secret")
        assert denied.connect(f"127.0.0.1:{DENIED_PORT}")[0] == Reply.NOT_ALLOWED
        denied_from = client_address(denied)
    second = json.loads(lines(path, 2)[1])
    assert stable(second) == {
        "client": denied_from, "protocol": "socks5", "user": "alice", "command": "connect",
        "destination": f"127.0.0.1:{DENIED_PORT}", "remote": None, "verdict": "deny", "rule": "policy.yaml:7",
        "plugin": "denier", "reply": 2, "bytes_up": 0, "bytes_down": 0, "authenticated": True,
        "reason": "denied: not on my watch",
    }  # fmt: skip

    with Socks5Client(server.address) as failed:
        failed.greet([Method.USERPASS])
        assert failed.login("mallory", "hunter2-secret") == 1
        failed_from = client_address(failed)
    third = json.loads(lines(path, 3)[2])
    assert stable(third) == {
        "client": failed_from, "protocol": "socks5", "user": "mallory", "command": None, "destination": None, "remote": None,
        "verdict": "deny", "rule": None, "plugin": "auth", "reply": None, "bytes_up": 0, "bytes_down": 0,
        "authenticated": False, "reason": "authentication failed for 'mallory': unknown user",
    }  # fmt: skip
    assert "hunter2" not in path.read_text()

    with Socks5Client(server.address) as refused:
        refused.greet()
        assert refused.connect(f"127.0.0.1:{refusing_port}")[0] == Reply.CONNECTION_REFUSED
        refused_from = client_address(refused)
    fourth = json.loads(lines(path, 4)[3])
    assert fourth.pop("reason").startswith(f"connect to 127.0.0.1:{refusing_port} failed")
    assert stable(fourth) == {
        "client": refused_from, "protocol": "socks5", "user": None, "command": "connect",
        "destination": f"127.0.0.1:{refusing_port}",
        "remote": None, "verdict": "allow", "rule": None, "plugin": None, "reply": 5, "bytes_up": 0,
        "bytes_down": 0, "authenticated": None,
    }  # fmt: skip
    assert len({json.loads(line)["session"] for line in lines(path, 4)}) == 4


# ---------------------------------------------------------------------------- the text format


TEXT_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse_text(line: str) -> dict[str, str]:
    stamp, _, rest = line.partition(" ")
    fields = {"time": stamp}
    for key, value in TEXT_FIELD.findall(rest):
        fields[key] = json.loads(value) if value.startswith('"') else value
    assert " ".join(f"{k}={v}" for k, v in TEXT_FIELD.findall(rest)) == rest  # nothing unparsed
    return fields


def test_text_lines_are_one_per_session_whatever_the_user_name(socksflow_server, tmp_path, htpasswd, echo):
    server = socksflow_server(AUTH + "log: {access: {format: text, file: access.log}}\n")
    path = tmp_path / "access.log"
    with Socks5Client(server.address) as client:
        client.greet()
        assert client.connect(echo)[0] == Reply.SUCCEEDED
        echo_once(client, b"0123456789")
    evil = 'eve" reason=forged\nsession=0 user=root'
    with Socks5Client(server.address) as client:
        client.greet([Method.USERPASS])
        assert client.login(evil, "x") == 1
    allowed, failed = (parse_text(line) for line in lines(path, 2))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", allowed["time"])
    keys = ("protocol", "user", "command", "destination", "verdict", "reply", "bytes_up", "bytes_down")
    assert {k: allowed[k] for k in keys} == {
        "protocol": "socks5", "user": "-", "command": "connect", "destination": echo, "verdict": "allow",
        "reply": "0x00",
        "bytes_up": "10", "bytes_down": "10",
    }  # fmt: skip
    assert allowed["reason"] == "closed" and allowed["authenticated"] == "-"
    assert failed["user"] == evil  # quoted and escaped: the forged fields stay inside the value
    assert failed["authenticated"] == "no" and failed["verdict"] == "deny" and failed["plugin"] == "auth"
    assert failed["reason"].startswith("authentication failed for ")


def test_stdout_target(socksflow_server, capsys, echo):
    server = socksflow_server('log: {access: {format: json, file: "-"}}\n')
    with Socks5Client(server.address) as client:
        client.greet()
        assert client.connect(echo)[0] == Reply.SUCCEEDED
        echo_once(client)
    out = ""
    deadline = time.monotonic() + 5
    while '"verdict": "allow"' not in out and time.monotonic() < deadline:
        out += capsys.readouterr().out
        time.sleep(0.01)
    assert json.loads(out.strip().splitlines()[-1])["destination"] == echo


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_timestamps_match_datetimes_iso_format(when):
    expected = datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
    if round(when % 1 * 1_000_000) == 1_000_000:
        return  # within half a microsecond of the next second: datetime carries, the log says .999
    assert access_log.timestamp(when) == expected


# ---------------------------------------------------------------------------- reopening


def test_reopen_after_rotation_on_the_servers_loop(socksflow_server, tmp_path, echo):
    server = socksflow_server(JSON_LOG)
    path = tmp_path / "access.log"
    for expected in (1, 2):
        with Socks5Client(server.address) as client:
            client.greet()
            client.connect(echo)
            echo_once(client)
        lines(path, expected)
    path.rename(tmp_path / "access.log.1")
    server.call(access_log.reopen, server.server)
    with Socks5Client(server.address) as client:
        client.greet()
        client.connect(echo)
        echo_once(client)
    assert len(lines(path, 1)) == 1
    assert len(lines(tmp_path / "access.log.1", 2)) == 2


def test_a_reload_moves_the_log_to_the_new_file_and_format(socksflow_server, tmp_path, echo):
    server = socksflow_server(JSON_LOG)
    files = {"access.log": json.loads, "other.log": parse_text}
    for name, parse in files.items():
        if name == "other.log":
            text_log = "log: {access: {format: text, file: other.log}}\n"
            (tmp_path / "rules.yaml").write_text("listen: [127.0.0.1:0]\n" + text_log)
            assert server.call(server.server.reload)
        with Socks5Client(server.address) as client:
            client.greet()
            client.connect(echo)
            echo_once(client)
        assert parse(lines(tmp_path / name, 1)[0])["verdict"] == "allow"
    assert len(lines(tmp_path / "access.log", 1)) == 1


def test_sessions_cut_by_shutdown_are_logged_before_the_file_closes(socksflow_server, tmp_path, echo):
    server = socksflow_server(JSON_LOG)
    with Socks5Client(server.address) as client:
        client.greet()
        assert client.connect(echo)[0] == Reply.SUCCEEDED
        server.stop()  # the tunnel is still open: aborted after the drain time
    assert json.loads(lines(tmp_path / "access.log", 1)[0])["reason"] == "server shutdown"
    assert server.server.stash.get(access_log.OUTPUT) is None  # closed, not reopened by a late line


def test_sigusr1_reopens_the_file_in_a_running_process(tmp_path, echo):
    (tmp_path / "rules.yaml").write_text("listen: [127.0.0.1:0]\n" + JSON_LOG)
    proc = subprocess.Popen(
        [sys.executable, "-m", "socksflow", "run", "-c", "rules.yaml", *loop_args()],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        ready = proc.stdout.readline()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", ready)
        assert match, ready + proc.stderr.read() if proc.poll() is not None else ready
        proxy = ("127.0.0.1", int(match[1]))
        path = tmp_path / "access.log"
        with Socks5Client(proxy) as client:
            client.greet()
            client.connect(echo)
            echo_once(client)
        lines(path, 1)
        path.rename(tmp_path / "access.log.1")
        os.kill(proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not path.exists():  # reopening creates the file at once
            assert time.monotonic() < deadline, "SIGUSR1 did not reopen the access log"
            time.sleep(0.01)
        with Socks5Client(proxy) as client:
            client.greet()
            client.connect(echo)
            echo_once(client)
        assert json.loads(lines(path, 1)[0])["verdict"] == "allow"
        assert len(lines(tmp_path / "access.log.1", 1)) == 1
        assert proc.poll() is None  # SIGUSR1's default action would have killed it
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0


# ---------------------------------------------------------------------------- configuration


def config_errors(text: str) -> str:
    pm = PluginManager()
    pm.register(access_log, "log")
    with pytest.raises(ConfigErrors) as info:
        configure(pm, Config.from_text(text, "rules.yaml"))
    return str(info.value)


def test_config_errors_are_located(tmp_path):
    assert "rules.yaml:1: log.access.format: 'xml' is not one of: json, text" in config_errors(
        "log: {access: {format: xml}}\n"
    )
    assert "rules.yaml:2: log.access.file: cannot write in" in config_errors(
        "log:\n  access: {file: /nonexistent/dir/access.log}\n"
    )
    assert "rules.yaml:1: log.errors: unknown key" in config_errors("log: {errors: yes-please}\n")


def test_unconfigured_plugin_writes_nothing(socksflow_server, tmp_path, echo):
    server = socksflow_server("")
    with Socks5Client(server.address) as client:
        client.greet()
        client.connect(echo)
        echo_once(client)
    assert server.server.stash.get(access_log.OUTPUT) is None
    assert not list(tmp_path.glob("*.log"))


def fake_session(**fields: object) -> object:
    """What the access log reads of a session, without a server."""
    from types import SimpleNamespace

    from socksflow.decisions import Identity, Verdict
    from socksflow.protocol import Command, Request

    values: dict[str, object] = {
        "id": "1f", "client": Address.parse("127.0.0.1:40000"), "protocol": "socks5",
        "identity": Identity("alice"), "request": Request(Command.CONNECT, Address("example.com", 443)),
        "remote": Address.parse("192.0.2.7:443"), "verdict": Verdict.allow(rule="rules.yaml:3"),
        "decided_by": "acl", "reply": Reply.SUCCEEDED, "bytes_up": 12, "bytes_down": 3400,
        "duration": 0.0123456, "authenticated": True, "close_reason": "client closed",
        "started": 1_780_000_000.25, "stash": {}, "outcome": "allow",
    }  # fmt: skip
    values.update(fields)
    return SimpleNamespace(**values)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"protocol": "", "identity": socksflow.ANONYMOUS, "request": None, "remote": None, "verdict": None},
        {"outcome": None, "reply": None, "authenticated": None, "close_reason": ""},
        {"identity": socksflow.Identity('é"\n\u2028'), "close_reason": "x\ty", "id": "w2-a"},
        {
            "verdict": socksflow.Verdict.deny(),
            "outcome": "deny",
            "decided_by": "",
            "reply": Reply.NOT_ALLOWED,
        },
        {"stash": {socksflow.ROUTE: "pool,pool=b"}, "duration": 12.0, "bytes_up": 0},
        {"bytes_up": True, "id": 7, "duration": float("inf")},  # odd types: the general way
        {"identity": socksflow.Identity(5)},
        {"client": Address.parse("[2001:db8::1]:1080"), "remote": Address.parse("[::1]:443")},
        {"client": Address("client.example", 7)},  # type: ignore[arg-type]
    ],
)
def test_json_text_is_json_line_of_record(fields):
    session = fake_session(**fields)
    assert access_log.json_text(session) == access_log.json_line(access_log.record(session))
