"""The command line as an operator uses it: real processes, signals, exit codes, messages."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import socksflow
from socksflow.testing import loop_args, parse_ready_line, socks5_handshake

README = Path(__file__).resolve().parent.parent / "README.md"


def socksflow_cmd(*args: str, cwd: Path | None = None, timeout: float = 30, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", "socksflow", *args],
        capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env,
    )  # fmt: skip


class Proxy:
    """``socksflow run`` as a subprocess; stopped (by PID) when the test ends.

    It runs on the tests' event loop (:func:`~socksflow.testing.loop_args`) unless
    ``default_loop``, and with the command's default ``--workers`` (one per usable CPU) unless
    ``args`` say otherwise.  ``ready`` is its ready line, parsed.
    """

    def __init__(self, *args: str, cwd: Path, env: dict | None = None, default_loop: bool = False) -> None:
        loop = [] if default_loop else loop_args()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "socksflow", "run", "--listen", "127.0.0.1:0", *loop, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
        )  # fmt: skip
        line = self.process.stdout.readline()
        ready = parse_ready_line(line)
        if ready is None:
            self.process.kill()
            raise AssertionError(f"no ready line: {line!r}\n{self.process.stderr.read()}")
        self.ready = ready
        self.address = ready.address

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, str]:
        self.process.send_signal(signum)
        _, stderr = self.process.communicate(timeout=20)
        return self.process.returncode, stderr


@pytest.fixture
def proxies() -> Iterator[list[Proxy]]:
    started: list[Proxy] = []
    yield started
    for proxy in started:
        if proxy.process.poll() is None:
            proxy.process.kill()
            proxy.process.wait(10)


@pytest.mark.smoke
def test_version():
    result = socksflow_cmd("--version")
    assert result.stdout.strip() == f"socksflow {socksflow.__version__}"


def test_run_serves_and_stops_on_sigterm(tmp_path, proxies, http_target):
    (tmp_path / "rules.yaml").write_text("auth: {methods: [none]}\n")
    proxy = Proxy(cwd=tmp_path)
    proxies.append(proxy)
    code, client = socks5_handshake(proxy.address, f"127.0.0.1:{http_target.port}")
    assert code == 0
    client.sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
    response = b""
    while chunk := client.sock.recv(4096):
        response += chunk
    assert response.endswith(b"hello from the target\n")
    client.close()
    returncode, stderr = proxy.stop()
    assert returncode == 0
    assert "SIGTERM received: stopping" in stderr
    assert "plugin auth" in stderr  # the start-up log lists every plugin


def test_sigterm_lets_running_sessions_finish(tmp_path, proxies, echo_target):
    (tmp_path / "rules.yaml").write_text("timeouts: {shutdown: 1s}\n")
    proxy = Proxy(cwd=tmp_path)
    proxies.append(proxy)
    code, client = socks5_handshake(proxy.address, f"127.0.0.1:{echo_target[1]}")
    assert code == 0
    proxy.process.send_signal(signal.SIGTERM)
    client.sock.sendall(b"still here")  # the session keeps working during the drain
    assert client.recv_exactly(10) == b"still here"
    assert client.sock.recv(1) == b""  # closed at the 1 s deadline
    client.close()
    proxy.process.wait(20)
    assert proxy.process.returncode == 0
    assert "closing 1 sessions still open after 1s" in proxy.process.stderr.read()


def read_until(stream, text: str, timeout: float = 15) -> list[str]:
    """Lines from ``stream`` up to and including the first that contains ``text``."""
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []

    def pump() -> None:
        for line in iter(stream.readline, ""):
            lines.put(line)
            if text in line:
                return
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if not line:
            raise AssertionError(f"the process ended before {text!r}: {seen}")
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"no {text!r} within {timeout}s: {seen}")


def test_sighup_reloads_and_keeps_the_old_config_on_errors(tmp_path, proxies):
    rules = tmp_path / "rules.yaml"
    rules.write_text("timeouts: {connect: 5s}\n")
    proxy = Proxy("--workers", "1", cwd=tmp_path)  # one process's log, line after line
    proxies.append(proxy)
    rules.write_text("timeouts: {connect: five seconds}\n")
    proxy.process.send_signal(signal.SIGHUP)
    assert (
        "reload rejected, keeping the running configuration" in read_until(proxy.process.stderr, "reload")[-1]
    )
    assert (
        "rules.yaml:1: timeouts.connect: 'five seconds' is not a duration" in proxy.process.stderr.readline()
    )
    rules.write_text("timeouts: {connect: 3s}\n")
    proxy.process.send_signal(signal.SIGHUP)
    assert "configuration reloaded from rules.yaml" in read_until(proxy.process.stderr, "reload")[-1]
    assert proxy.stop()[0] == 0


def test_port_in_use_is_one_clear_line(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = socksflow_cmd("run", "--listen", f"127.0.0.1:{port}", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().endswith(
        f"socksflow: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


@pytest.mark.smoke
def test_bad_config_lists_every_error_with_file_line_and_key(tmp_path):
    (tmp_path / "rules.yaml").write_text(
        textwrap.dedent("""\
            listen: [127.0.0.1:99999]
            timeouts:
              connect: 8:30
            auth: {methods: [none]}
            auth: {methods: [userpass]}
            nonsense: 1
        """)
    )
    result = socksflow_cmd("check", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "rules.yaml:1: listen[0]: '127.0.0.1:99999': port must be a number from 0 to 65535",
        "rules.yaml:3: timeouts.connect: '8:30' is an ambiguous number in YAML (octal, sexagesimal…); quote it",
        "rules.yaml:5: auth: duplicate key (first given on line 4)",
        "rules.yaml:6: nonsense: unknown section (no loaded plugin reads it)",
    ]


@pytest.mark.smoke
def test_missing_users_file(tmp_path):
    (tmp_path / "rules.yaml").write_text("auth: {methods: [userpass], users: nobody.htpasswd}\n")
    result = socksflow_cmd("run", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "rules.yaml:1: auth.users: cannot read users file 'nobody.htpasswd': No such file or directory"
    )


@pytest.mark.smoke
def test_plaintext_users_file_is_refused(tmp_path):
    (tmp_path / "users").write_text("alice:secret\n")
    (tmp_path / "rules.yaml").write_text("auth: {methods: [userpass], users: users}\n")
    result = socksflow_cmd("check", cwd=tmp_path)
    assert result.returncode == 1
    assert "user 'alice' has no bcrypt hash; only htpasswd -B files are accepted" in result.stderr


@pytest.mark.smoke
def test_plugins_lists_the_standard_plugins(tmp_path):
    result = socksflow_cmd("plugins", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^auth \S+  \(.*auth\.py\)$", result.stdout, re.M)
    assert "    socksflow_authenticate" in result.stdout
    disabled = socksflow_cmd("plugins", "--disable-plugin", "auth", cwd=tmp_path)
    assert not re.search(r"^auth ", disabled.stdout, re.M)
    env = dict(os.environ, SOCKSFLOW_DISABLE_PLUGIN_AUTOLOAD="1")
    assert socksflow_cmd("plugins", cwd=tmp_path, env=env).stdout == ""


@pytest.mark.smoke
def test_plugins_hook_lists_the_implementations_in_call_order(tmp_path):
    (tmp_path / "first.py").write_text("def socksflow_request(request):\n    return None\n")
    (tmp_path / "second.py").write_text("def socksflow_request(request):\n    return None\n")
    (tmp_path / "rules.yaml").write_text("listen: [127.0.0.1:0]\nplugins: {paths: [first.py, second.py]}\n")
    env = dict(os.environ, SOCKSFLOW_DISABLE_PLUGIN_AUTOLOAD="1")
    result = socksflow_cmd("plugins", "--hook", "request", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "second\nfirst\n"  # pluggy calls the plugin registered last first
    result = socksflow_cmd("plugins", "--hook", "socksflow_request", "--json", cwd=tmp_path, env=env)
    assert json.loads(result.stdout) == ["second", "first"]
    result = socksflow_cmd("plugins", "--hook", "requests", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert "no hook named 'requests'" in result.stderr


@pytest.mark.smoke
def test_disabling_a_plugin_that_does_not_exist_is_an_error(tmp_path):
    # A misspelt name would otherwise leave the plugin it meant running, unnoticed.
    (tmp_path / "rules.yaml").write_text("listen: [127.0.0.1:0]\nplugins:\n  disable: [log, acll]\n")
    result = socksflow_cmd("check", cwd=tmp_path)
    assert result.returncode == 1
    assert (
        "rules.yaml:3: plugins.disable[1]: no plugin named 'acll' to disable (found: acl, admin, auth, "
        in result.stderr
    )
    (tmp_path / "rules.yaml").write_text("listen: [127.0.0.1:0]\nplugins:\n  disable: [log]\n")
    assert socksflow_cmd("check", cwd=tmp_path).returncode == 0
    result = socksflow_cmd("run", "--disable-plugin", "metrix", cwd=tmp_path)
    assert result.returncode == 1
    assert "--disable-plugin: no plugin named 'metrix' (found: acl, admin, auth, " in result.stderr


@pytest.mark.smoke
def test_explain_names_the_deciding_plugins_that_cannot_explain(tmp_path):
    (tmp_path / "quiet.py").write_text(
        "import socksflow\n\n@socksflow.hookimpl\ndef socksflow_request(request):\n    return None\n"
    )
    (tmp_path / "rules.yaml").write_text("listen: [127.0.0.1:0]\n")
    result = socksflow_cmd("explain", "192.0.2.1:80", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "no plugin has rules for this request: it is allowed\n")
    (tmp_path / "rules.yaml").write_text("listen: [127.0.0.1:0]\nplugins: {paths: [quiet.py]}\n")
    result = socksflow_cmd("explain", "192.0.2.1:80", cwd=tmp_path)
    assert result.stdout == "not explained: quiet decides on clients or requests without socksflow_explain\n"


@pytest.mark.smoke
def test_misspelt_hook_fails_at_start(tmp_path):
    (tmp_path / "typo.py").write_text("def socksflow_reqeust(session, request):\n    return None\n")
    (tmp_path / "rules.yaml").write_text("plugins: {paths: [typo.py]}\n")
    result = socksflow_cmd("check", cwd=tmp_path)
    assert result.returncode == 1
    assert "socksflow_reqeust" in result.stderr and "unknown hook" in result.stderr


def readme_plugin() -> str:
    text = README.read_text()
    block = text.split("<!-- readme-plugin-example -->", 1)[1]
    return block.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_plugin_example_works(tmp_path, proxies, echo_target):
    (tmp_path / "deny_smtp.py").write_text(readme_plugin())
    (tmp_path / "rules.yaml").write_text("plugins: {paths: [deny_smtp.py]}\n")
    proxy = Proxy(cwd=tmp_path)
    proxies.append(proxy)
    code, client = socks5_handshake(proxy.address, "127.0.0.1:25")
    assert code == 0x02  # denied by the plugin, before any connection attempt
    client.close()
    code, client = socks5_handshake(proxy.address, f"127.0.0.1:{echo_target[1]}")
    assert code == 0
    client.close()
    _, stderr = proxy.stop()
    assert re.search(
        r"WARNING deny_smtp: session [\w-]+: 127\.0\.0\.1:\d+ asked for 127\.0\.0\.1:25: refused", stderr
    )
    assert len(readme_plugin().strip().splitlines()) <= 20


def worker_pids(parent: int) -> set[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return set(map(int, children))


def test_workers_share_the_port_restart_and_stop_together(tmp_path, proxies, echo_target):
    (tmp_path / "rules.yaml").write_text("timeouts: {shutdown: 2s}\n")
    proxy = Proxy("--workers", "2", cwd=tmp_path)
    proxies.append(proxy)
    first = worker_pids(proxy.process.pid)
    assert len(first) == 2
    for _ in range(20):
        code, client = socks5_handshake(proxy.address, f"127.0.0.1:{echo_target[1]}")
        assert code == 0
        client.close()
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    for _ in range(100):  # the supervisor restarts it after a one-second back-off
        now = worker_pids(proxy.process.pid)
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.1)
    assert len(now) == 2 and victim not in now
    code, client = socks5_handshake(proxy.address, f"127.0.0.1:{echo_target[1]}")
    assert code == 0
    client.close()
    returncode, stderr = proxy.stop()
    assert returncode == 0
    assert re.search(rf"worker \d \(pid {victim}\) exited with -9: restarting it", stderr)
    assert stderr.count("SIGTERM received: stopping") == 2
    assert all(not Path(f"/proc/{pid}").exists() for pid in now)


# ---------------------------------------------------------------------------- the defaults: uvloop, a worker per CPU

# ``socksflow run`` on one CPU: the affinity set in the child itself (no preexec_fn in a threaded pytest).
ON_ONE_CPU = (
    "import os, runpy, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
    "sys.argv[0] = 'socksflow'; runpy.run_module('socksflow', run_name='__main__')"
)


def test_by_default_one_worker_per_usable_cpu_on_uvloop(tmp_path, proxies, echo_target):
    """Issue #17: the default is the fast one, and the ready line says what it started."""
    (tmp_path / "rules.yaml").write_text("timeouts: {shutdown: 1s}\n")
    proxy = Proxy(cwd=tmp_path, default_loop=True)
    proxies.append(proxy)
    cpus = len(os.sched_getaffinity(0))
    assert (proxy.ready.loop, proxy.ready.workers) == ("uvloop", cpus)
    assert len(worker_pids(proxy.process.pid)) == (cpus if cpus > 1 else 0)  # one CPU: no supervisor
    for _ in range(10):
        code, client = socks5_handshake(proxy.address, f"127.0.0.1:{echo_target[1]}")
        assert code == 0
        client.close()
    returncode, stderr = proxy.stop()
    assert returncode == 0
    assert stderr.count("SIGTERM received: stopping") == cpus


def test_on_one_cpu_the_default_is_one_process_without_a_supervisor(tmp_path, echo_target):
    """A one-CPU container (here: the affinity mask, as taskset and cpusets set it) runs one process."""
    (tmp_path / "rules.yaml").write_text("listen: [127.0.0.1:0]\n")
    process = subprocess.Popen(
        [sys.executable, "-c", ON_ONE_CPU, "run", *loop_args()],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        ready = parse_ready_line(process.stdout.readline())
        assert ready is not None, process.stderr.read() if process.poll() is not None else ""
        assert ready.workers == 1
        assert worker_pids(process.pid) == set()
        assert len(os.sched_getaffinity(process.pid)) == 1
        code, client = socks5_handshake(ready.address, f"127.0.0.1:{echo_target[1]}")
        assert code == 0
        client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr
    assert "workers running" not in stderr


@pytest.mark.parametrize(
    ("args", "loop", "workers"),
    [
        (("--loop", "asyncio", "--workers", "1"), "asyncio", 1),
        (("--loop", "uvloop", "--workers", "1"), "uvloop", 1),
        (("--loop", "asyncio", "--workers", "2"), "asyncio", 2),
        (("--loop", "uvloop", "--workers", "3"), "uvloop", 3),
    ],
)
def test_the_ready_line_names_the_loop_and_the_workers(tmp_path, proxies, args, loop, workers):
    (tmp_path / "rules.yaml").write_text("")
    proxy = Proxy(*args, cwd=tmp_path)
    proxies.append(proxy)
    noun = "worker" if workers == 1 else "workers"
    host, port = proxy.address
    assert str(proxy.ready.addresses[0]) == f"{host}:{port}"
    assert (proxy.ready.loop, proxy.ready.workers) == (loop, workers)
    assert proxy.ready == parse_ready_line(
        f"socksflow: listening on {host}:{port} ({loop}, {workers} {noun})"
    )
    assert len(worker_pids(proxy.process.pid)) == (workers if workers > 1 else 0)


@pytest.mark.smoke
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "argument --workers: 0 processes would serve nothing: give 1 or more, or 'auto'"),
        ("x", "argument --workers: 'x' is not a number of processes or 'auto' (one per usable CPU)"),
        ("-2", "argument --workers: '-2' is not a number of processes or 'auto' (one per usable CPU)"),
    ],
)
def test_a_worker_count_that_is_not_one_is_a_clear_error(tmp_path, value, message):
    result = socksflow_cmd("run", "--listen", "127.0.0.1:0", f"--workers={value}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == f"socksflow run: error: {message}"


@pytest.mark.smoke
def test_auto_counts_the_cpus_this_process_may_use(monkeypatch):
    from socksflow import cli

    assert cli._parser().parse_args(["run"]).workers == len(os.sched_getaffinity(0))
    assert cli._parser().parse_args(["run", "--workers", "auto"]).workers == len(os.sched_getaffinity(0))
    assert cli._parser().parse_args(["run", "--workers", "3"]).workers == 3
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS has none: every CPU
    monkeypatch.setattr(os, "cpu_count", lambda: 5)
    assert cli._parser().parse_args(["run"]).workers == 5


@pytest.mark.smoke
def test_the_ready_line_reads_back_with_every_address():
    from socksflow.protocol import Address
    from socksflow.workers import ready_line

    addresses = (Address.parse("127.0.0.1:1080"), Address.parse("[::1]:1081"))
    line = ready_line(addresses, "uvloop", 2)
    assert line == "socksflow: listening on 127.0.0.1:1080, [::1]:1081 (uvloop, 2 workers)"
    ready = parse_ready_line(line + "\n")
    assert ready is not None and (ready.addresses, ready.loop, ready.workers) == (addresses, "uvloop", 2)
    assert ready.address == ("127.0.0.1", 1080)
    assert (
        ready_line(addresses[:1], "asyncio", 1)
        == "socksflow: listening on 127.0.0.1:1080 (asyncio, 1 worker)"
    )
    # What scripts written for the line without its tail read from it: the first port.
    assert re.match(r"^socksflow: listening on (\S+):(\d+)", line).groups() == ("127.0.0.1", "1080")
    assert parse_ready_line("socksflow: listening on 127.0.0.1:1080") is None


def shipped_rules(tmp_path: Path, test_server_port: int = 8000) -> Path:
    """The repository's rules.yaml and blocklist in ``tmp_path``, with no way to reach a real DNS
    server (any query would fail the test instead of leaving the machine)."""
    root = README.parent
    text = (root / "rules.yaml").read_text()
    assert "servers: [system]" in text and "port: 8000" in text
    text = text.replace("servers: [system]", "servers: [127.0.0.1:9]").replace(
        "port: 8000", f"port: {test_server_port}"
    )
    (tmp_path / "rules.yaml").write_text(text)
    (tmp_path / "blocklist.txt").write_text((root / "blocklist.txt").read_text())
    return tmp_path / "rules.yaml"


@pytest.mark.smoke
def test_shipped_rules_pass_their_own_tests(tmp_path):
    shipped_rules(tmp_path)
    result = socksflow_cmd("check", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "rules.yaml: OK, 17 tests passed"  # issue #13: say the tests ran
    explained = socksflow_cmd("explain", "--from", "127.0.0.1", "169.254.169.254:80", cwd=tmp_path)
    assert "deny" in explained.stdout and "internal networks" in explained.stdout, explained.stdout


def test_readme_quick_start_with_the_shipped_rules(tmp_path, proxies, http_target):
    # README: `socksflow run`, then curl through it to a local test server.  No --loop and no
    # --workers: the defaults, uvloop and one worker per usable CPU (two on CI's machines).
    shipped_rules(tmp_path, http_target.port)
    proxy = Proxy("--protocols", "mixed", cwd=tmp_path, default_loop=True)
    proxies.append(proxy)
    assert (proxy.ready.loop, proxy.ready.workers) == ("uvloop", len(os.sched_getaffinity(0)))
    where = f"{proxy.address[0]}:{proxy.address[1]}"
    for door in (["--socks5-hostname", where], ["-x", f"http://{where}"], ["--socks4a", where]):
        ok = subprocess.run(
            ["curl", "--silent", "--max-time", "10", *door, f"http://localhost:{http_target.port}/"],
            capture_output=True, timeout=20,
        )  # fmt: skip
        assert ok.returncode == 0, (door, ok.stderr)
        assert ok.stdout == b"hello from the target\n"
    metadata = subprocess.run(
        ["curl", "--silent", "--max-time", "10", "--socks5", f"{proxy.address[0]}:{proxy.address[1]}", "http://169.254.169.254/"],
        capture_output=True, timeout=20,
    )  # fmt: skip
    assert metadata.returncode == 97  # REP 0x02 before any packet left for the metadata address
    returncode, stderr = proxy.stop()
    assert returncode == 0
    assert "verdict=deny" in stderr and "internal networks" in stderr  # the access log, on stderr


def test_sighup_with_listen_does_not_claim_the_listen_addresses_changed(tmp_path, proxies):
    """Issue #13: with --listen every reload warned "listen addresses changed", though nothing had."""
    (tmp_path / "rules.yaml").write_text("listen: [127.0.0.1:1080]\ntimeouts: {connect: 5s}\n")
    proxy = Proxy(cwd=tmp_path)
    proxies.append(proxy)
    proxy.process.send_signal(signal.SIGHUP)
    lines = read_until(proxy.process.stderr, "reload")
    assert "configuration reloaded from rules.yaml" in lines[-1]
    assert not [line for line in lines if "listen addresses changed" in line]
    code, rest = proxy.stop()
    assert code == 0 and "listen addresses changed" not in rest


def test_a_reload_that_changes_the_files_listen_addresses_says_so(socksflow_server, tmp_path, caplog):
    server = socksflow_server("")
    assert server.call(server.server.reload)
    assert "listen addresses changed" not in caplog.text
    (tmp_path / "rules.yaml").write_text("listen: [127.0.0.1:0, '[::1]:0']\n")
    assert server.call(server.server.reload)
    assert "listen addresses changed in" in caplog.text


def test_loop_help_and_error_say_what_auto_picks_and_how_to_install_uvloop(tmp_path):
    """Issue #13: the error said ``pip install socksflow[fast]`` where the README says ``.[fast]``.

    Issue #17: uvloop is a dependency where it builds, and the help says so."""
    shown = socksflow_cmd("run", "--help", cwd=tmp_path)
    assert (
        "auto picks uvloop (installed with socksflow where it builds: CPython, not Windows), else asyncio"
        in " ".join(shown.stdout.split())
    )
    without_uvloop = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['uvloop'] = None; from socksflow.cli import main; "
         "sys.exit(main(['run', '--loop', 'uvloop', '--listen', '127.0.0.1:0']))"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert without_uvloop.returncode == 1
    assert without_uvloop.stderr.strip().endswith(
        "socksflow: --loop uvloop needs the uvloop package (pip install .[fast] in socksflow's folder)"
    )
    assert "pip install .[fast]" in (Path(__file__).parent.parent / "README.md").read_text()
