"""The ACL plugin through the real server: curl, raw clients, resolver plugins, users, UDP, reload."""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import socksflow_plugins.acl as acl
import socksflow_plugins.auth as auth
from helpers import write_htpasswd

from socksflow import Verdict, hookimpl
from socksflow.protocol import Address, Command, Reply, build_udp_header
from socksflow.testing import Socks5Client, StaticResolver, socks5_handshake

DENIED_REPLY = b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00"  # REP 0x02, BND 0.0.0.0:0
BODY = b"socksflow acl test\n"


def need_curl() -> str:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed (apt-get install curl)")
    return curl


class Target:
    """An HTTP server on one loopback address: ``/`` answers BODY, ``/slow`` streams ``SLOW_SIZE`` bytes."""

    SLOW_CHUNK = 64 * 1024
    SLOW_CHUNKS = 24

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.requests: list[str] = []
        self.streaming = threading.Event()
        self.release = threading.Event()
        target = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                target.requests.append(self.path)
                slow = self.path == "/slow"
                self.send_response(200)
                self.send_header("Content-Length", str(target.slow_size if slow else len(BODY)))
                self.end_headers()
                if not slow:
                    self.wfile.write(BODY)
                    return
                for index in range(target.SLOW_CHUNKS):
                    self.wfile.write(b"x" * target.SLOW_CHUNK)
                    self.wfile.flush()
                    if index == 0:
                        target.streaming.set()
                        target.release.wait(10)  # the test reloads while the download is half done

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def slow_size(self) -> int:
        return self.SLOW_CHUNK * self.SLOW_CHUNKS

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target("127.0.0.1")
    yield server
    server.stop()


@pytest.fixture
def second() -> Iterator[Target]:
    """A target on 127.0.0.2, the address the rules deny."""
    server = Target("127.0.0.2")
    yield server
    server.stop()


class Dialled:
    """Records the addresses the core is asked to dial (and lets it dial them)."""

    def __init__(self) -> None:
        self.addresses: list[tuple[Address, ...]] = []

    @hookimpl
    def socksflow_open_connection(self, addresses):
        self.addresses.append(addresses)


def curl(server, url: str, *extra: str, hostname: bool = False) -> subprocess.CompletedProcess[bytes]:
    option = "--socks5-hostname" if hostname else "--socks5"
    return subprocess.run(
        [need_curl(), "-sS", "--max-time", "20", option, f"{server.host}:{server.port}", *extra, url],
        capture_output=True, timeout=30,
    )  # fmt: skip


def raw_connect(server, destination: bytes) -> tuple[bytes, bytes]:
    """Send a CONNECT for ``destination`` (ATYP, address, port) as is; return the reply and what follows."""
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00" + destination)
        reply = b""
        while len(reply) < 10:
            chunk = sock.recv(10 - len(reply))
            if not chunk:
                break
            reply += chunk
        return reply, sock.recv(100)


def domain(name: str, port: int) -> bytes:
    raw = name.encode()
    return bytes((3, len(raw))) + raw + struct.pack("!H", port)


# ---------------------------------------------------------------------------- denial


DENY_SECOND = """
rules:
  - deny: {to: 127.0.0.2}
    reason: the second loopback address is off limits
  - allow: all
"""


def test_curl_gets_rep_02_for_a_denied_destination(socksflow_server, target, second):
    server = socksflow_server(DENY_SECOND, [acl], autoload=False)
    denied = curl(server, second.url + "/")
    assert denied.returncode == 97, denied
    assert denied.stderr == b"curl: (97) Can't complete SOCKS5 connection to 127.0.0.2. (2)\n"
    allowed = curl(server, target.url + "/")
    assert (allowed.returncode, allowed.stdout) == (0, BODY)
    assert second.requests == [] and target.requests == ["/"]


class Redirect:
    """A plugin that sends every request for ``source`` to ``target``."""

    def __init__(self, source: str, target: str) -> None:
        self.source = Address.parse(source)
        self.target = Address.parse(target)

    @hookimpl
    def socksflow_request(self, request):
        return Verdict.rewrite(self.target, "moved") if request.destination == self.source else None


def test_a_rewrite_is_judged_by_the_rules_where_it_now_goes(socksflow_server, target, second):
    # The redirecting plugin is asked first (registered last); the rules still decide.
    to_denied = Redirect("old.test:80", f"127.0.0.2:{second.port}")
    server = socksflow_server(DENY_SECOND, [acl, to_denied], autoload=False)
    code, client = socks5_handshake(server.address, "old.test:80")
    client.close()
    assert code == Reply.NOT_ALLOWED and second.requests == []
    to_allowed = Redirect("new.test:80", f"127.0.0.1:{target.port}")
    server = socksflow_server(DENY_SECOND, [acl, to_allowed], autoload=False)
    fetched = curl(server, "http://new.test:80/", hostname=True)
    assert (fetched.returncode, fetched.stdout) == (0, BODY)
    assert target.requests == ["/"]


def test_raw_client_gets_the_exact_reply_and_a_close(socksflow_server, second):
    server = socksflow_server(DENY_SECOND, [acl], autoload=False)
    ipv4 = b"\x01" + socket.inet_aton("127.0.0.2") + struct.pack("!H", second.port)
    reply, after = raw_connect(server, ipv4)
    assert (reply, after) == (DENIED_REPLY, b"")
    code, client = socks5_handshake(server.address, f"127.0.0.2:{second.port}")
    client.close()
    assert code == Reply.NOT_ALLOWED and second.requests == []


def test_reply_code_of_a_rule(socksflow_server, second):
    rules = "rules:\n  - deny: {to: 127.0.0.2}\n    reply: host_unreachable\n  - allow: all\n"
    server = socksflow_server(rules, [acl], autoload=False)
    code, client = socks5_handshake(server.address, f"127.0.0.2:{second.port}")
    client.close()
    assert code == Reply.HOST_UNREACHABLE


# ---------------------------------------------------------------------------- names and addresses


REBINDING = """
rules:
  - deny: {to: [special:loopback, special:private, special:link-local]}
    reason: internal networks
  - allow: all
"""


@pytest.mark.parametrize("name", ["outside.example", "lan.example", "meta.example", "localhost"])
def test_curl_names_that_resolve_inside_are_denied(socksflow_server, target, name):
    table = {
        "outside.example": ["127.0.0.1"],
        "lan.example": ["10.255.255.1"],
        "meta.example": ["169.254.169.254"],
    }
    names = StaticResolver(table, pass_unknown=True)  # localhost: through /etc/hosts
    server = socksflow_server(REBINDING, [acl, names], autoload=False)
    result = curl(server, f"http://{name}:{target.port}/", hostname=True)
    assert result.returncode == 97, result
    assert result.stderr.endswith(b". (2)\n")
    assert target.requests == []
    assert names.lookups == ([] if name == "localhost" else [name])  # once: the answers were cached


@pytest.mark.parametrize(
    "name", ["LOCALHOST.", "127.0.0.1", "127.0.0.1.", "outside.example", "Outside.Example."]
)
def test_raw_domain_requests_for_local_addresses_are_denied(socksflow_server, target, name):
    names = StaticResolver({"outside.example": ["127.0.0.1"]}, pass_unknown=True)
    server = socksflow_server(REBINDING, [acl, names], autoload=False)
    assert raw_connect(server, domain(name, target.port)) == (DENIED_REPLY, b"")
    assert target.requests == []


@pytest.mark.parametrize("address", ["::ffff:127.0.0.1", "::127.0.0.1", "::1", "::"])
def test_raw_ipv6_forms_of_local_addresses_are_denied(socksflow_server, target, address):
    server = socksflow_server(REBINDING, [acl], autoload=False)
    ipv6 = b"\x04" + ipaddress.IPv6Address(address).packed + struct.pack("!H", target.port)
    assert raw_connect(server, ipv6) == (DENIED_REPLY, b"")
    assert target.requests == []


def test_only_the_checked_addresses_are_dialled(socksflow_server, target):
    names = StaticResolver(
        {"mixed.example": ["10.255.255.1", "127.0.0.1", "192.168.255.1"]}, pass_unknown=True
    )
    dialled = Dialled()
    rules = "rules:\n  - deny: {to: special:private}\n  - allow: all\n"
    server = socksflow_server(rules, [acl, names, dialled], autoload=False)
    result = curl(server, f"http://mixed.example:{target.port}/", hostname=True)
    assert (result.returncode, result.stdout) == (0, BODY)
    assert dialled.addresses == [(Address.parse(f"127.0.0.1:{target.port}"),)]
    assert names.lookups == ["mixed.example"]  # one look-up per session: checked and dialled alike


# ---------------------------------------------------------------------------- users


USERS = """
auth:
  methods: [userpass]
  users: users.htpasswd
groups:
  staff: [alice, carol]
rules:
  - deny: {user: carol, port: 1-1023}
    reason: carol may not use well-known ports
  - deny: {user: bob}
    reason: bob is suspended
  - allow: {group: staff}
"""


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    return write_htpasswd(
        tmp_path / "users.htpasswd", {u: f"secret-{u}" for u in ("alice", "bob", "carol", "dave")}
    )


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("alice", Reply.SUCCEEDED),
        ("bob", Reply.NOT_ALLOWED),
        ("carol", Reply.SUCCEEDED),
        ("dave", Reply.NOT_ALLOWED),
    ],
)
def test_allow_and_deny_by_user_and_group(socksflow_server, target, htpasswd, user, expected):
    server = socksflow_server(USERS, [acl, auth], autoload=False)
    code, client = socks5_handshake(server.address, f"127.0.0.1:{target.port}", username=user,
                                    password=f"secret-{user}")  # fmt: skip
    client.close()
    assert code == expected


def test_curl_with_credentials(socksflow_server, target, htpasswd):
    server = socksflow_server(USERS, [acl, auth], autoload=False)
    proxy = f"socks5://{{}}:secret-{{}}@{server.host}:{server.port}"
    allowed = subprocess.run([need_curl(), "-sS", "--max-time", "20", "-x", proxy.format("alice", "alice"),
                              target.url + "/"], capture_output=True, timeout=30)  # fmt: skip
    assert (allowed.returncode, allowed.stdout) == (0, BODY)
    denied = subprocess.run([need_curl(), "-sS", "--max-time", "20", "-x", proxy.format("bob", "bob"),
                             target.url + "/"], capture_output=True, timeout=30)  # fmt: skip
    assert denied.returncode == 97 and denied.stderr.endswith(b". (2)\n")
    assert target.requests == ["/"]


# ---------------------------------------------------------------------------- UDP


class Echo:
    def __init__(self, host: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.1)
        self.address = Address.from_sockaddr(self.sock.getsockname())
        self.received: list[bytes] = []
        self._running = True
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self._running:
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            self.received.append(data)
            self.sock.sendto(data, peer)

    def stop(self) -> None:
        self._running = False
        self._thread.join(5)
        self.sock.close()


@contextlib.contextmanager
def association(server) -> Iterator[tuple[socket.socket, tuple[str, int]]]:
    """A UDP association declared as 0.0.0.0:0: a client socket and the relay's address."""
    with Socks5Client(server.address) as control, socket.socket(type=socket.SOCK_DGRAM) as sock:
        assert control.greet() == 0
        code, bound = control.request(Command.UDP_ASSOCIATE, "0.0.0.0:0")
        assert code == Reply.SUCCEEDED
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.5)
        yield sock, (str(bound.host), bound.port)


def test_udp_association_and_each_datagram(socksflow_server):
    echo, hidden = Echo("127.0.0.1"), Echo("127.0.0.2")
    names = StaticResolver(
        {"hidden.example": ["127.0.0.2"], "echo.example": ["127.0.0.1"]}, pass_unknown=True
    )
    rules = "rules:\n  - deny: {to: [special:unspecified, 127.0.0.2]}\n  - allow: all\n"
    server = socksflow_server(rules, [acl, names], autoload=False)
    try:
        # 0.0.0.0:0 is where the client sends from, not a destination: the deny rule does not apply
        with association(server) as (sock, relay):
            for destination in (hidden.address, Address("hidden.example", hidden.address.port)):
                sock.sendto(build_udp_header(destination) + b"secret", relay)
            for destination in (echo.address, Address("echo.example", echo.address.port)):
                sock.sendto(build_udp_header(destination) + b"hello", relay)
                data, _ = sock.recvfrom(65535)
                assert data == build_udp_header(echo.address) + b"hello"
            with pytest.raises(TimeoutError):
                sock.recvfrom(65535)
        assert hidden.received == [] and echo.received == [b"hello", b"hello"]
    finally:
        echo.stop()
        hidden.stop()


class DatagramRedirect:
    """A plugin that sends datagrams for port 1 to ``hidden`` and for port 2 to ``echo``."""

    def __init__(self, hidden: Address, echo: Address) -> None:
        self.targets = {1: hidden, 2: echo}

    @hookimpl
    def socksflow_udp_datagram(self, destination):
        target = self.targets.get(destination.port)
        return Verdict.rewrite(target) if target is not None else None


def test_a_datagram_rewrite_is_judged_by_the_rules_where_it_now_goes(socksflow_server):
    echo, hidden = Echo("127.0.0.1"), Echo("127.0.0.2")
    rules = "rules:\n  - deny: {to: 127.0.0.2}\n  - allow: all\n"
    server = socksflow_server(rules, [acl, DatagramRedirect(hidden.address, echo.address)], autoload=False)
    try:
        with association(server) as (sock, relay):
            sock.sendto(
                build_udp_header(Address.parse("192.0.2.1:1")) + b"secret", relay
            )  # to hidden: denied
            sock.sendto(build_udp_header(Address.parse("192.0.2.1:2")) + b"hello", relay)  # to echo: allowed
            data, _ = sock.recvfrom(65535)
            assert data == build_udp_header(echo.address) + b"hello"
            with pytest.raises(TimeoutError):
                sock.recvfrom(65535)
        assert hidden.received == [] and echo.received == [b"hello"]
    finally:
        echo.stop()
        hidden.stop()


# ---------------------------------------------------------------------------- reload


def test_reload_while_a_download_is_in_flight(socksflow_server, target, second, tmp_path):
    open_rules = "rules:\n  - allow: all\n"
    server = socksflow_server(open_rules, [acl], autoload=False)
    rules_file = tmp_path / "rules.yaml"
    assert rules_file.read_text(encoding="utf-8").endswith(open_rules)
    download = subprocess.Popen(
        [need_curl(), "-sS", "--max-time", "30", "--socks5", f"{server.host}:{server.port}",
         target.url + "/slow"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert target.streaming.wait(10), "the download did not start"
        # The target's address and port: the second target may have been given the same port.
        new_rules = f"listen: [127.0.0.1:0]\nrules:\n  - deny: {{to: 127.0.0.1, port: {target.port}}}\n  - allow: all\n"
        rules_file.write_text(new_rules, encoding="utf-8")
        assert server.call(server.server.reload) is True
        code, client = socks5_handshake(server.address, f"127.0.0.1:{target.port}")
        client.close()
        assert code == Reply.NOT_ALLOWED  # new sessions see the new rules
        bad_rules = "listen: [127.0.0.1:0]\nrules:\n  - allow: {to: 10.0.0.0/33}\n"
        rules_file.write_text(bad_rules, encoding="utf-8")
        assert server.call(server.server.reload) is False  # a bad file keeps the rules in force
        code, client = socks5_handshake(server.address, f"127.0.0.1:{target.port}")
        client.close()
        assert code == Reply.NOT_ALLOWED
        code, client = socks5_handshake(server.address, f"127.0.0.2:{second.port}")
        client.close()
        assert code == Reply.SUCCEEDED  # the rules in force allow other destinations
    finally:
        target.release.set()
        out, err = download.communicate(timeout=30)
    assert download.returncode == 0, err
    assert len(out) == target.slow_size  # the established session was not dropped
