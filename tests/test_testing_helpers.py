"""socksflow.testing as plugin authors use it, and how plugins are loaded, disabled and listed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import socksflow_plugins.auth

from socksflow import Address, hookimpl
from socksflow.errors import ConfigErrors
from socksflow.protocol import InvalidAddress
from socksflow.testing import (
    AsyncServer,
    AsyncSocks5Client,
    Socks5Client,
    loop_args,
    sockaddr,
    unwrap_datagram,
    wrap_datagram,
)

WAIT = 5.0


# ---------------------------------------------------------------------------- the async variant


def test_async_server_runs_on_the_callers_loop(socksflow_async_server, echo_target):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        seen = []

        class Observer:
            @hookimpl
            def socksflow_request(self, request):
                seen.append(asyncio.get_running_loop())

        async with socksflow_async_server(plugins=[Observer()], autoload=False) as server:
            assert server.address.port != 0 and server.host == "127.0.0.1"
            async with await AsyncSocks5Client.open(server.address) as client:
                assert await client.greet() == 0x00
                code, bound = await client.connect(f"127.0.0.1:{echo_target[1]}")
                assert code == 0x00 and str(bound.host) == "127.0.0.1"
                client.writer.write(b"ping")
                assert await client.reader.readexactly(4) == b"ping"
        assert seen == [loop]

    asyncio.run(main())


def test_async_server_reports_a_task_left_running(socksflow_async_server):
    class Leaky:
        @hookimpl
        def socksflow_startup(self, server):
            server.stash_task = asyncio.get_running_loop().create_task(asyncio.sleep(3600))

    async def main() -> None:
        with pytest.raises(AssertionError, match="tasks left running"):
            async with socksflow_async_server(plugins=[Leaky()], autoload=False) as server:
                pass
        server.server.stash_task.cancel()

    asyncio.run(main())


def test_async_server_without_pytest(tmp_path):
    async def main() -> list[str]:
        async with AsyncServer("timeouts: {idle: 0}\n", autoload=False) as server:
            return [str(server.config.file), str(server.config.timeouts.idle)]

    assert asyncio.run(main()) == ["<test config>", "0.0"]


def test_async_client_udp_and_bind(socksflow_async_server):
    async def main() -> None:
        async with socksflow_async_server(autoload=False) as server:
            async with await AsyncSocks5Client.open(server.address) as control:
                await control.greet()
                code, relay = await control.udp_associate()
                assert code == 0x00 and relay.port not in (0, server.port)
            async with await AsyncSocks5Client.open(server.address) as client:
                await client.greet()
                code, listening = await client.bind("127.0.0.1:0")
                assert code == 0x00
                _, writer = await asyncio.open_connection(*sockaddr(listening))
                code, peer = await client.second_reply()
                assert code == 0x00 and sockaddr(peer) == writer.get_extra_info("sockname")
                writer.close()
                await writer.wait_closed()

    asyncio.run(main())


# ---------------------------------------------------------------------------- the blocking client


def test_udp_helpers_through_the_relay_over_ipv6(socksflow_server):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    server = socksflow_server("listen: ['[::1]:0']\n", autoload=False)
    with (
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as target,
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as mine,
        Socks5Client(server.address) as control,
    ):
        target.bind(("::1", 0))
        mine.bind(("::1", 0))
        mine.settimeout(WAIT)
        target.settimeout(WAIT)
        assert control.greet() == 0
        code, relay = control.udp_associate(Address.from_sockaddr(mine.getsockname()))
        assert code == 0 and str(relay.host) == "::1"
        destination = Address.from_sockaddr(target.getsockname())
        mine.sendto(wrap_datagram(destination, b"up"), sockaddr(relay))
        payload, sender = target.recvfrom(100)
        assert payload == b"up"
        target.sendto(b"down", sender)
        assert unwrap_datagram(mine.recv(100)) == (destination, b"down")


def test_wrap_and_unwrap_datagrams():
    datagram = wrap_datagram("example.com:53", b"query")
    assert datagram == b"\x00\x00\x00\x03\x0bexample.com\x00\x35query"
    assert unwrap_datagram(datagram) == (Address("example.com", 53), b"query")
    assert unwrap_datagram(wrap_datagram("[2001:db8::1]:7", b"")) == (Address.parse("[2001:db8::1]:7"), b"")


def test_bind_second_reply_reports_a_timeout(socksflow_server):
    server = socksflow_server("bind: {timeout: 300ms}\n", autoload=False)
    with Socks5Client(server.address, timeout=WAIT) as client:
        client.greet()
        code, listening = client.bind()
        assert code == 0 and listening.port != 0
        assert client.second_reply() == (0x06, Address.parse("0.0.0.0:0"))  # TTL expired


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b"\x05\x04\x00\x03\x04host\x00\x50", (4, Address("host", 80))),
        (b"\x05\x00\x00\x03\x00\x00\x00", InvalidAddress),  # an empty name: the shortest reply
        (b"\x05\x00\x00\x04" + bytes(15) + b"\x01\x01\xbb", (0, Address.parse("[::1]:443"))),
    ],
)
def test_replies_of_every_address_type_are_read_whole(reply, expected):
    with socket.create_server(("127.0.0.1", 0)) as fake:

        def answer() -> None:
            peer, _ = fake.accept()
            with peer:
                peer.recv(100)
                peer.sendall(reply + b"tail")

        thread = threading.Thread(target=answer)
        thread.start()
        with Socks5Client(fake.getsockname(), timeout=WAIT) as client:
            if isinstance(expected, tuple):
                assert client.connect("127.0.0.1:80") == expected
            else:
                with pytest.raises(expected):
                    client.connect("127.0.0.1:80")
            assert client.recv_exactly(4) == b"tail"  # the reply was read whole, and nothing after it
        thread.join(WAIT)


def test_a_closed_connection_is_a_connection_error(socksflow_server):
    class Refuse:
        @hookimpl
        def socksflow_client_connected(self):
            from socksflow import Verdict

            return Verdict.deny("not you")

    server = socksflow_server(plugins=[Refuse()], autoload=False)
    with Socks5Client(server.address, timeout=WAIT) as client, pytest.raises(ConnectionError):
        client.greet()


# ---------------------------------------------------------------------------- the fixture


def test_a_plugin_already_loaded_from_its_entry_point_is_not_registered_twice(socksflow_server):
    server = socksflow_server(plugins=[socksflow_plugins.auth])
    assert server.pm.get_plugin("auth") is socksflow_plugins.auth


def test_config_errors_come_from_the_fixture_call(socksflow_server, tmp_path):
    with pytest.raises(ConfigErrors) as raised:
        socksflow_server("timeouts: {idle: soon}\n")
    assert [str(e) for e in raised.value.errors] == [
        f"{tmp_path / 'rules.yaml'}:2: timeouts.idle: 'soon' is not a duration (like 500ms, 10s, 5m, 1h)"
    ]


# ---------------------------------------------------------------------------- loading plugins


PLUGIN = '__version__ = "2.3"\n\ndef socksflow_request(request):\n    return None\n'
STANDARD = {"acl", "auth", "dns", "limits", "log", "metrics"}


def run_and_stop(directory: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """``socksflow run`` until its ready line, then SIGTERM; its standard error."""
    process = subprocess.Popen(
        [sys.executable, "-m", "socksflow", "run", "--listen", "127.0.0.1:0", *loop_args(), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=directory, env=env,
    )  # fmt: skip
    try:
        line = process.stdout.readline()
        assert line.startswith("socksflow: listening on 127.0.0.1:"), line + process.stderr.read()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode == 0, stderr
    return stderr


def listed(directory: Path, *args: str, env: dict[str, str] | None = None) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-m", "socksflow", "plugins", "--json", *args],
        capture_output=True, text=True, cwd=directory, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return {plugin["name"] for plugin in json.loads(result.stdout)}


def installed_others() -> set[str]:
    """Installed plugins that are not socksflow's own (e.g. the example package)."""
    import importlib.metadata

    return {ep.name for ep in importlib.metadata.entry_points(group="socksflow")} - STANDARD


@pytest.mark.parametrize(
    ("config", "args", "environment", "expected"),
    [
        ("", [], {}, STANDARD | {"mine"}),
        ("  disable: [auth, mine]\n", [], {}, STANDARD - {"auth"}),
        ("", ["--disable-plugin", "acl", "--disable-plugin", "mine"], {}, STANDARD - {"acl"}),
        ("  autoload: false\n", [], {}, {"mine"}),
        ("", [], {"SOCKSFLOW_DISABLE_PLUGIN_AUTOLOAD": "1"}, {"mine"}),
        ("  autoload: false\n", [], {"SOCKSFLOW_PLUGINS": "extra.py"}, {"mine", "extra"}),
    ],
    ids=["all", "config-disable", "cli-disable", "config-no-autoload", "env-no-autoload", "env-extra"],
)
def test_active_plugins_are_logged_at_start_with_version_and_source(
    tmp_path, config, args, environment, expected
):
    (tmp_path / "mine.py").write_text(PLUGIN)
    (tmp_path / "extra.py").write_text(PLUGIN.replace("2.3", "4.5"))
    (tmp_path / "rules.yaml").write_text("plugins:\n  paths: [mine.py]\n" + config)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SOCKSFLOW_PLUGINS", "SOCKSFLOW_DISABLE_PLUGIN_AUTOLOAD")
    }
    env.update(environment)
    autoloads = "autoload" not in config and "SOCKSFLOW_DISABLE_PLUGIN_AUTOLOAD" not in environment
    expected = expected | (installed_others() if autoloads else set())
    stderr = run_and_stop(tmp_path, *args, env=env)
    logged = dict(re.findall(r"INFO socksflow: plugin (\S+) (\S+ from \S+)$", stderr, re.M))
    assert set(logged) == expected
    assert set(logged) == listed(tmp_path, *args, env=env)
    if "mine" in expected:
        assert logged["mine"] == f"2.3 from {Path('mine.py')}"
    if "extra" in expected:
        assert logged["extra"] == "4.5 from extra.py"
    if "auth" in expected:
        assert re.fullmatch(r"0\.1\.0 from \S+/auth\.py", logged["auth"])


def test_a_disabled_plugins_section_is_an_error(tmp_path):
    (tmp_path / "rules.yaml").write_text("plugins: {disable: [auth]}\nauth: {methods: [none]}\n")
    result = subprocess.run(
        [sys.executable, "-m", "socksflow", "check"], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr == "rules.yaml:2: auth: unknown section (no loaded plugin reads it)\n"
