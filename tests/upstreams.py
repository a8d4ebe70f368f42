"""Real upstream proxies for the routing tests: started on loopback, stopped by PID.

Each upstream binds its outgoing side to its own 127.0.0.x where the program can, so a target
that reports its peer's address proves which way a session went.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dns_servers import stop
from helpers import require_tool

from socksflow.testing import wait_until

MICROSOCKS_SOURCE = "127.0.0.2"
TINYPROXY_SOURCE = "127.0.0.3"
DANTED_SOURCE = "127.0.0.4"


@dataclass
class Upstream:
    host: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def kill(self) -> None:
        """Stop it now, by its PID, with the children it forked per connection (sshd's)."""
        children = _children(self.process.pid)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def free_port() -> int:
    """A port free now: for programs that cannot listen on port 0 and say which port they got."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _started(process: subprocess.Popen[bytes], port: int) -> bool:
    """Whether ``process`` listens on ``port`` within 10 s (False: it exited, or never listened)."""
    return wait_until(lambda: process.poll() is not None or _listening(port), 10) and process.poll() is None


ATTEMPTS = 3  # another test may take the free port between our probe and the program's bind


@contextlib.contextmanager
def _running(
    build: Callable[[int], list[str]], port: int = 0, log: Path | None = None, **kwargs: object
) -> Iterator[Upstream]:
    """Run ``build(port)`` until it listens on ``port`` (a free one, tried again if taken meanwhile)."""
    for attempt in range(1 if port else ATTEMPTS):
        chosen = port or free_port()
        command = build(chosen)
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]
        if _started(process, chosen):
            break
        stop(process)
        if port or attempt == ATTEMPTS - 1:
            raise RuntimeError(f"{command[0]} did not listen on {chosen} (exit status {process.returncode})")
    try:
        yield Upstream("127.0.0.1", chosen, process, log)
    finally:
        stop(process)


@contextlib.contextmanager
def microsocks(
    user: str | None = None, password: str | None = None, source: str = MICROSOCKS_SOURCE, port: int = 0
) -> Iterator[Upstream]:
    exe = require_tool("microsocks")
    login = ["-u", user, "-P", password or ""] if user is not None else []

    def build(port: int) -> list[str]:
        return [exe, "-i", "127.0.0.1", "-p", str(port), "-b", source, *login]

    with _running(build, port, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as upstream:
        yield upstream


@contextlib.contextmanager
def tinyproxy(tmp: Path, user: str = "", password: str = "") -> Iterator[Upstream]:
    exe = require_tool("tinyproxy")
    log = tmp / "tinyproxy.log"
    log.touch()
    log.chmod(0o666)
    lines = [
        "Listen 127.0.0.1",
        f"Bind {TINYPROXY_SOURCE}",
        "Timeout 60",
        "MaxClients 50",
        "Allow 127.0.0.0/8",
        f'LogFile "{log}"',
        "LogLevel Connect",
        "DisableViaHeader Yes",
    ]
    if os.geteuid() == 0:
        lines += ["User nobody", "Group nogroup"]
    if user:
        lines.append(f"BasicAuth {user} {password}")
    conf = tmp / "tinyproxy.conf"

    def build(port: int) -> list[str]:
        conf.write_text("\n".join([f"Port {port}", *lines]) + "\n")
        return [exe, "-d", "-c", str(conf)]

    with _running(build, 0, log, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as up:
        yield up


DANTED_CONF = """\
logoutput: {log}
internal: 127.0.0.1 port = {port}
external: {source}
clientmethod: none
socksmethod: none
{users}
client pass {{
    from: 127.0.0.0/8 to: 127.0.0.0/8
}}
socks pass {{
    from: 127.0.0.0/8 to: 127.0.0.0/8
    command: connect udpassociate bind bindreply
    log: connect error
}}
socks pass {{
    from: 127.0.0.0/8 to: 127.0.0.0/8
    command: udpreply
    log: connect
}}
"""


@contextlib.contextmanager
def danted(tmp: Path, source: str = DANTED_SOURCE) -> Iterator[Upstream]:
    exe = require_tool("danted") if not os.path.exists("/usr/sbin/danted") else "/usr/sbin/danted"
    log = tmp / "danted.log"
    users = "user.privileged: root\nuser.unprivileged: nobody" if os.geteuid() == 0 else ""
    conf = tmp / "danted.conf"

    def build(port: int) -> list[str]:
        conf.write_text(DANTED_CONF.format(log=log, port=port, source=source, users=users))
        return [exe, "-f", str(conf), "-N", "1"]

    with _running(build, 0, log, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as upstream:
        yield upstream


SSHD_CONF = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {tmp}/sshd.pid
AuthorizedKeysFile {tmp}/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
AllowTcpForwarding yes
LogLevel DEBUG1
"""


@dataclass
class SshServer:
    upstream: Upstream
    user: str
    key: Path
    known_hosts: Path


@contextlib.contextmanager
def sshd(tmp: Path, port: int = 0) -> Iterator[SshServer]:
    """OpenSSH's sshd on a loopback port with generated host and user keys (ed25519); started
    again in the same directory, it keeps its keys (a restart)."""
    exe = "/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else require_tool("sshd")
    keygen = require_tool("ssh-keygen")
    host_key, user_key = tmp / "host_key", tmp / "user_key"
    for key in (host_key, user_key):
        if not key.exists():
            subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (tmp / "authorized_keys").write_text(user_key.with_suffix(".pub").read_text())
    host_public = host_key.with_suffix(".pub").read_text().split()
    known_hosts = tmp / "known_hosts"
    conf = tmp / "sshd_config"
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation needs it
    log = tmp / "sshd.log"
    user = os.environ.get("USER") or ("root" if os.geteuid() == 0 else os.getlogin())

    def build(port: int) -> list[str]:
        known_hosts.write_text(f"[127.0.0.1]:{port} {host_public[0]} {host_public[1]}\n")
        conf.write_text(SSHD_CONF.format(port=port, host_key=host_key, tmp=tmp))
        return [exe, "-D", "-f", str(conf), "-E", str(log)]

    with _running(build, port, log) as upstream:
        yield SshServer(upstream, user, user_key, known_hosts)


# --------------------------------------------------------------------------- targets


class _PeerHandler(http.server.BaseHTTPRequestHandler):
    """``GET /peer`` answers the client's address; ``GET /blob`` the server's blob."""

    blob = b""

    def do_GET(self) -> None:
        body = self.client_address[0].encode() if self.path == "/peer" else self.blob
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Target:
    host: str
    port: int
    blob_sha256: str

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}/{path}"


@contextlib.contextmanager
def http_target(blob_size: int = 0) -> Iterator[Target]:
    """An HTTP server on 127.0.0.1 that tells each client its address, and serves a blob."""
    blob = os.urandom(blob_size)
    handler = type("Handler", (_PeerHandler,), {"blob": blob})

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

    server = Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Target("127.0.0.1", server.server_address[1], hashlib.sha256(blob).hexdigest())
    finally:
        server.shutdown()
        server.server_close()


def curl(proxy: str, url: str, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """``curl --socks5-hostname proxy url``; the body is stdout."""
    exe = require_tool("curl")
    command = [exe, "-sS", "--max-time", str(int(timeout)), "--socks5-hostname", proxy, *extra, url]
    return subprocess.run(command, capture_output=True, timeout=timeout + 10)


@contextlib.contextmanager
def forwarder(upstream: Upstream, prepare: Callable[[socket.socket], socket.socket]) -> Iterator[Upstream]:
    """A TCP forwarder to ``upstream`` that passes each accepted socket through ``prepare`` first
    (to wrap it in TLS, or to make the upstream slow)."""
    import socketserver

    def pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            try:
                accepted = prepare(self.request)
            except OSError:
                return
            with accepted, socket.create_connection((upstream.host, upstream.port)) as plain:
                back = threading.Thread(target=pump, args=(plain, accepted), daemon=True)
                back.start()
                pump(accepted, plain)
                back.join(30)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Upstream("127.0.0.1", server.server_address[1], upstream.process, upstream.log)
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def tls_front(tmp: Path, upstream: Upstream) -> Iterator[tuple[Upstream, Path]]:
    """A TLS terminator in front of ``upstream`` (an HTTPS proxy, made of tinyproxy): its address
    and the CA that signed its certificate (for 127.0.0.1 and ``proxy.test``)."""
    import ssl

    from dns_servers import make_tls_certificate

    ca, cert, key = make_tls_certificate(tmp, ["proxy.test"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    with forwarder(upstream, lambda sock: context.wrap_socket(sock, server_side=True)) as front:
        yield front, ca


@contextlib.contextmanager
def slowed(upstream: Upstream, delay: float) -> Iterator[Upstream]:
    """``upstream`` behind a forwarder that waits ``delay`` seconds before passing a connection on."""
    import time

    def wait(sock: socket.socket) -> socket.socket:
        time.sleep(delay)
        return sock

    with forwarder(upstream, wait) as slow:
        yield slow
