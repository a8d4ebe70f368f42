"""A plugin that raises fails closed for its session only: the exact answer, and the server goes on."""

from __future__ import annotations

import contextlib

import pytest
from helpers import connect_marked, recv_all, write_htpasswd

import socksflow
from socksflow.protocol import Address, Command, build_request
from socksflow.testing import Socks5Client, socks5_handshake


class Faulty:
    """Raises in one hook, for sessions from the client ports in ``victims`` only."""

    def __init__(self) -> None:
        self.victims: set[int] = set()

    def check(self, session) -> None:
        if session.client.port in self.victims:
            raise RuntimeError("boom")

    @socksflow.hookimpl
    def socksflow_client_connected(self, session):
        if self.hook == "client_connected":
            self.check(session)

    @socksflow.hookimpl
    def socksflow_select_method(self, session):
        if self.hook == "select_method":
            self.check(session)

    @socksflow.hookimpl
    async def socksflow_authenticate(self, session):
        if self.hook == "authenticate":
            self.check(session)

    @socksflow.hookimpl
    async def socksflow_request(self, session):
        if self.hook == "request":
            self.check(session)

    @socksflow.hookimpl
    async def socksflow_resolve(self, session):
        if self.hook == "resolve":
            self.check(session)

    @socksflow.hookimpl
    async def socksflow_open_connection(self, session):
        if self.hook == "open_connection":
            self.check(session)

    @socksflow.hookimpl
    def socksflow_relay_start(self, session):
        if self.hook == "relay_start":
            self.check(session)

    @socksflow.hookimpl
    def socksflow_relay_data(self, session):
        if self.hook == "relay_data":
            self.check(session)

    @socksflow.hookimpl
    async def socksflow_session_end(self, session):
        if self.hook == "session_end":
            self.check(session)

    @socksflow.hookimpl
    def socksflow_session_error(self, session):
        self.check(session)  # an observer that raises is ignored as well


REFUSED = b"\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00"  # REP 0x01, general failure
UNREACHABLE = b"\x05\x04\x00\x01\x00\x00\x00\x00\x00\x00"  # REP 0x04, host unreachable

CASES = {
    "client_connected": b"",  # closed before a byte is exchanged
    "select_method": b"\x05\xff",
    "authenticate": b"\x05\x02\x01\x01",
    "request": b"\x05\x00" + REFUSED,
    "resolve": b"\x05\x00" + UNREACHABLE,
    "open_connection": b"\x05\x00" + REFUSED,
    "relay_start": b"\x05\x00" + REFUSED,
}


@pytest.fixture
def users_file(tmp_path):
    return write_htpasswd(tmp_path / "users", {"carol": "pw"})


@pytest.mark.parametrize("hook", sorted(CASES))
def test_decision_hook_raising_fails_closed(socksflow_server, echo_target, users_file, hook):
    faulty = Faulty()
    faulty.hook = hook
    userpass = hook == "authenticate"
    config = f"auth: {{methods: [userpass], users: {users_file}}}\n" if userpass else ""
    server = socksflow_server(config, plugins=[faulty])
    victim = connect_marked((server.host, server.port), faulty.victims)
    greeting = b"\x05\x01\x02\x01\x05carol\x02pw" if userpass else b"\x05\x01\x00"
    destination = Address.parse(f"localhost:{echo_target[1]}")
    with contextlib.suppress(OSError):  # the server may close before reading it all
        victim.sendall(greeting + build_request(Command.CONNECT, destination))
    assert recv_all(victim) == CASES[hook]
    victim.close()
    # Everyone else is served as usual.
    credentials = {"username": "carol", "password": "pw"} if userpass else {}
    code, client = socks5_handshake(server.address, f"127.0.0.1:{echo_target[1]}", **credentials)
    assert code == 0
    client.sock.sendall(b"still serving")
    assert client.recv_exactly(13) == b"still serving"
    client.close()


@pytest.mark.parametrize("hook", ["relay_data", "session_end"])
def test_relay_and_observer_hooks(socksflow_server, echo_target, hook):
    faulty = Faulty()
    faulty.hook = hook
    server = socksflow_server(plugins=[faulty])
    with Socks5Client(server.address) as victim:
        faulty.victims.add(victim.sock.getsockname()[1])
        victim.greet()
        code, _ = victim.connect(f"127.0.0.1:{echo_target[1]}")
        assert code == 0
        victim.sock.sendall(b"data")
        if hook == "relay_data":
            assert recv_all(victim.sock) == b""  # the tunnel is closed, nothing leaks through
        else:
            assert victim.recv_exactly(4) == b"data"  # an observer's failure changes nothing
    code, client = socks5_handshake(server.address, f"127.0.0.1:{echo_target[1]}")
    assert code == 0
    client.sock.sendall(b"ok")
    assert client.recv_exactly(2) == b"ok"
    client.close()
