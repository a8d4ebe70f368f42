"""Several socksflow instances pointing at one real redis-server enforce one set of limits (issue #16)."""

from __future__ import annotations

import contextlib
import itertools
import socket

from helpers import write_htpasswd

from socksflow.protocol import Method
from socksflow.testing import Socks5Client, wait_until


def greeted(server) -> Socks5Client | None:  # type: ignore[no-untyped-def]
    """A client whose greeting was answered (it holds a session), or None if it was refused."""
    client = Socks5Client(server.address)
    try:
        client.greet()
        return client
    except (OSError, ValueError, AssertionError):
        client.close()
        return None


def refused(server, methods: bytes = b"\x05\x01\x00") -> bool:  # type: ignore[no-untyped-def]
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(methods)
        try:
            return sock.recv(2) == b""
        except ConnectionResetError:
            return True


def test_three_instances_admit_max_sessions_between_them(socksflow_server, redis_server):
    redis = redis_server
    config = f"state: {{redis: '{redis.url}'}}\nlimits: [{{max_sessions: 6}}]\n"
    servers = [socksflow_server(config) for _ in range(3)]
    held = [greeted(server) for server in itertools.islice(itertools.cycle(servers), 9)]
    admitted = [client for client in held if client is not None]
    try:
        assert len(admitted) == 6  # not 6 per instance
        assert all(refused(server) for server in servers)
        admitted.pop().close()
        assert wait_until(lambda: not refused(servers[2]), timeout=10)  # its slot is free for any instance
    finally:
        for client in admitted:
            client.close()


def test_a_block_made_by_one_instance_holds_in_the_others(socksflow_server, redis_server, tmp_path):
    write_htpasswd(tmp_path / "users", {"alice": "alice-secret"})
    config = (
        f"state: {{redis: '{redis_server.url}'}}\nauth: {{methods: [userpass], users: {tmp_path / 'users'}}}\n"
        "rules: [{allow: all}]\nlimits: [{auth_failures: {max: 3, within: 1m, block: 1m}}]\n"
    )
    first, second = socksflow_server(config), socksflow_server(config)
    for server in (first, second, first):  # the failures themselves are counted together too
        with Socks5Client(server.address) as client:
            assert client.greet([Method.USERPASS]) == Method.USERPASS
            assert client.login("alice", "guess") == 1
    assert wait_until(lambda: refused(second, b"\x05\x01\x02"), timeout=10)  # pushed over pub/sub
    assert refused(first, b"\x05\x01\x02")


def test_without_redis_an_instance_serves_on_its_own_limits_and_rejoins(socksflow_server, redis_server):
    redis = redis_server
    config = f"state: {{redis: '{redis.url}'}}\nlimits: [{{max_sessions: 2}}]\n"
    first, second = socksflow_server(config), socksflow_server(config)
    redis.stop()
    with contextlib.ExitStack() as stack:
        on_first = [greeted(first) for _ in range(3)]
        for client in filter(None, on_first):
            stack.callback(client.close)
        assert [c is not None for c in on_first] == [True, True, False]  # its own limit still holds
        redis.start()  # on the same port: both instances rejoin and register what they hold
        assert wait_until(lambda: refused(second), timeout=15)  # first's two sessions count again
