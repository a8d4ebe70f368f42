"""Everyday HTTP-proxy clients through socksflow's HTTP door: headless Chromium, git, pip.

Each test serves its own content on loopback, points the client at a ``mixed`` listener and
checks both the client's result and that every request went through the HTTP door.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import require_tool

from socksflow import hookimpl
from socksflow.testing import loop_args

MIXED = "listen: [{address: 127.0.0.1:0, protocols: mixed}]\n"


class Seen:
    """The door and destination of every request the hooks saw."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []

    @hookimpl
    def socksflow_request(self, session, request) -> None:
        self.requests.append((session.protocol, str(request.destination)))


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without proxy settings a CI machine may carry (they would bypass or chain)."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(extra)
    return env


def serve(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def static_handler(directory: Path) -> type[http.server.SimpleHTTPRequestHandler]:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(directory), **kwargs)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


# ---------------------------------------------------------------------------- Chromium

PAGE = """<!doctype html><html><body><p id="out">waiting</p><script>
var request = new XMLHttpRequest();
request.open("GET", "/second.txt", false);
request.send();
document.getElementById("out").textContent = "second said: " + request.responseText;
</script></body></html>"""


def test_chromium_loads_a_page_and_its_script_request_through_the_http_door(socksflow_server, tmp_path):
    chromium = require_tool("chromium")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text(PAGE)
    (tmp_path / "site" / "second.txt").write_text("fetched by the script")
    seen = Seen()
    server = socksflow_server(MIXED, plugins=[seen])
    for port in serve(static_handler(tmp_path / "site")):
        result = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", f"--proxy-server=http://{server.host}:{server.port}",
             "--proxy-bypass-list=<-loopback>", "--dump-dom", f"http://127.0.0.1:{port}/index.html"],
            capture_output=True, text=True, timeout=90, env=clean_env(),
        )  # fmt: skip
    assert "second said: fetched by the script" in result.stdout, result.stderr[-2000:]
    target = f"127.0.0.1:{port}"
    assert seen.requests.count(("http", target)) >= 2, seen.requests  # the page and the script's request
    assert {protocol for protocol, _ in seen.requests} == {"http"}


# ---------------------------------------------------------------------------- git


def git_backend_handler(root: Path) -> type[http.server.BaseHTTPRequestHandler]:
    """Smart HTTP: each request runs ``git http-backend`` as a CGI program."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.backend(b"")

        def do_POST(self) -> None:
            self.backend(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

        def backend(self, body: bytes) -> None:
            path, _, query = self.path.partition("?")
            env = {
                "GIT_PROJECT_ROOT": str(root), "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": path,
                "QUERY_STRING": query, "REQUEST_METHOD": self.command, "REMOTE_ADDR": "127.0.0.1",
                "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
                "PATH": os.environ["PATH"],
            }  # fmt: skip
            if self.headers.get("Git-Protocol"):
                env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
            done = subprocess.run(
                ["git", "http-backend"], input=body, env=env, capture_output=True, timeout=30
            )
            head, _, payload = done.stdout.partition(b"\r\n\r\n")
            status, headers = 200, []
            for line in head.split(b"\r\n"):
                name, _, value = line.decode("latin-1").partition(":")
                if name.lower() == "status":
                    status = int(value.split()[0])
                elif name:
                    headers.append((name, value.strip()))
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


def test_git_clone_over_http_proxy(socksflow_server, tmp_path):
    git = require_tool("git")
    env = clean_env(GIT_CONFIG_NOSYSTEM="1", HOME=str(tmp_path), GIT_TERMINAL_PROMPT="0")
    work = tmp_path / "work"
    run = lambda *args, cwd=tmp_path: subprocess.run(  # noqa: E731
        [git, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=True
    )
    run("init", "-q", "-b", "main", str(work))
    (work / "README").write_text("cloned through socksflow\n" * 1000)
    run(
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.invalid",
        "-C",
        str(work),
        "commit",
        "-qm",
        "one",
        "--allow-empty",
    )
    run("-C", str(work), "add", "README")
    run("-c", "user.name=t", "-c", "user.email=t@example.invalid", "-C", str(work), "commit", "-qm", "two")
    run("clone", "-q", "--bare", str(work), str(tmp_path / "repos" / "demo.git"))
    seen = Seen()
    server = socksflow_server(MIXED, plugins=[seen])
    for port in serve(git_backend_handler(tmp_path / "repos")):
        run("-c", f"http.proxy=http://{server.host}:{server.port}", "clone", "-q",
            f"http://127.0.0.1:{port}/demo.git", str(tmp_path / "clone"))  # fmt: skip
    assert (tmp_path / "clone" / "README").read_text() == "cloned through socksflow\n" * 1000
    log = run("-C", str(tmp_path / "clone"), "log", "--format=%s").stdout.split()
    assert log == ["two", "one"]
    assert len(seen.requests) >= 2 and set(seen.requests) == {("http", f"127.0.0.1:{port}")}


# ---------------------------------------------------------------------------- pip


def build_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel (PEP 427) of the project ``socksflow-door-demo`` 1.0."""
    wheel = folder / "socksflow_door_demo-1.0-py3-none-any.whl"
    info = "socksflow_door_demo-1.0.dist-info"
    files = {
        "socksflow_door_demo.py": "ANSWER = 42\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: socksflow-door-demo\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
        archive.writestr(f"{info}/RECORD", "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"]))
    return wheel


def test_pip_download_through_the_http_proxy(socksflow_server, tmp_path):
    index = tmp_path / "index"
    project = index / "simple" / "socksflow-door-demo"
    project.mkdir(parents=True)
    wheel = build_wheel(index)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (index / "simple" / "index.html").write_text('<a href="socksflow-door-demo/">socksflow-door-demo</a>')
    (project / "index.html").write_text(f'<a href="../../{wheel.name}#sha256={digest}">{wheel.name}</a>')
    seen = Seen()
    server = socksflow_server(MIXED, plugins=[seen])
    for port in serve(static_handler(index)):
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--isolated", "--no-cache-dir", "--no-deps",
             "--disable-pip-version-check", "--retries", "0", "--timeout", "20",
             "--proxy", f"http://{server.host}:{server.port}", "--index-url", f"http://127.0.0.1:{port}/simple/",
             "--trusted-host", "127.0.0.1", "-d", str(tmp_path / "out"), "socksflow-door-demo"],
            capture_output=True, text=True, timeout=120, env=clean_env(PIP_CONFIG_FILE=os.devnull),
        )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    downloaded = tmp_path / "out" / wheel.name
    assert hashlib.sha256(downloaded.read_bytes()).hexdigest() == digest
    assert len(seen.requests) >= 2 and set(seen.requests) == {("http", f"127.0.0.1:{port}")}


@pytest.fixture(autouse=True)
def _no_proxy_variables(monkeypatch) -> None:
    for name in list(os.environ):
        if "proxy" in name.lower():
            monkeypatch.delenv(name)


# ---------------------------------------------------------------------------- torsocks

TORSOCKS_DRIVER = r'''
"""Inside a fresh network namespace: a target on a non-loopback address, socksflow, torsocks curl."""
import http.server, json, subprocess, sys, threading
from pathlib import Path

here = Path(sys.argv[1])
# A non-loopback address of this namespace's own (on lo: the namespace has no other device).
for command in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", "192.0.2.10/32", "dev", "lo"]):
    subprocess.run(command, check=True)

class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def do_GET(self):
        body = b"hello from the namespace\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

web = http.server.ThreadingHTTPServer(("192.0.2.10", 0), Handler)
threading.Thread(target=web.serve_forever, daemon=True).start()
proxy = subprocess.Popen([sys.executable, "-m", "socksflow", "run", "-c", str(here / "rules.yaml"), *sys.argv[2:]],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=here)
try:  # "socksflow: listening on 127.0.0.1:PORT (LOOP, N workers)"
    port = proxy.stdout.readline().split(" (")[0].rpartition(":")[2]
    (here / "torsocks.conf").write_text(f"TorAddress 127.0.0.1\nTorPort {port}\n")
    curl = subprocess.run(["torsocks", "curl", "--silent", "--show-error", "--max-time", "10",
                           f"http://target.test:{web.server_address[1]}/"],
                          env={"PATH": "/usr/bin:/bin", "TORSOCKS_CONF_FILE": str(here / "torsocks.conf")},
                          capture_output=True, text=True, timeout=30)
finally:
    proxy.terminate()
    _, errors = proxy.communicate(timeout=20)
    web.shutdown()
print(json.dumps({"stdout": curl.stdout, "stderr": curl.stderr, "rc": curl.returncode, "port": web.server_address[1],
                  "proxy": errors[-2000:]}))
'''


def test_torsocks_resolves_names_with_tor_resolve(tmp_path):
    """torsocks sends every name look-up as Tor's RESOLVE and refuses loopback destinations, so the
    target lives on a non-loopback address in a network namespace the test creates."""
    require_tool("torsocks")
    require_tool("ip")
    unshare = require_tool("unshare")
    if subprocess.run([unshare, "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here (unshare -n needs CAP_SYS_ADMIN)")
    (tmp_path / "driver.py").write_text(TORSOCKS_DRIVER)
    (tmp_path / "rules.yaml").write_text(
        "listen: [127.0.0.1:0]\n"
        "doors: {tor_resolve: true}\n"
        "dns: {servers: ['127.0.0.1:9'], hosts: {target.test: 192.0.2.10}}\n"
        "log: {access: {format: json, file: access.log}}\n"
        "rules:\n  - allow: {command: resolve, to: target.test}\n  - allow: {to: 192.0.2.10}\n"
    )
    done = subprocess.run(
        # One process: the access log's lines below are in the order its sessions ended (workers
        # each flush their own lines, so two of them may interleave theirs either way).
        [unshare, "-n", sys.executable, str(tmp_path / "driver.py"), str(tmp_path), *loop_args(), "--workers", "1"],
        capture_output=True, text=True, timeout=90, env=clean_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert (result["rc"], result["stdout"]) == (0, "hello from the namespace\n"), result
    lines = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    seen = [(line["protocol"], line["command"], line["destination"], line["verdict"]) for line in lines]
    assert seen == [
        ("socks5", "resolve", "target.test:42", "allow"),  # torsocks sends port 42 with its look-ups
        ("socks5", "connect", f"192.0.2.10:{result['port']}", "allow"),
    ], seen
