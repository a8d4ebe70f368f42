"""The documentation works: every example in it runs against a real server, and the reference
pages match the code (hooks from ``socksflow/hookspecs.py``, options from the CLI parser,
sections from the plugins).

Examples are the fenced code blocks whose first line is ``# docs-example: FILENAME``; each
test below writes the ones it needs to ``tmp_path`` and uses them as a reader would.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import bcrypt
import pytest

from socksflow import Identity, hookimpl, hookspecs
from socksflow.config import (
    BindSettings,
    Config,
    DoorSettings,
    PluginSettings,
    StateSettings,
    Timeouts,
    UdpSettings,
)
from socksflow.errors import ConfigErrors
from socksflow.plugins import PluginManager
from socksflow.protocol import Method
from socksflow.testing import Socks5Client, socks5_handshake

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLE = re.compile(r"^```\w*\n(# docs-example: (\S+)\n.*?)^```", re.S | re.M)
WAIT = 5.0


def examples() -> dict[str, str]:
    """Every marked example in the docs, by file name."""
    found: dict[str, str] = {}
    for page in sorted(DOCS.rglob("*.md")):
        for code, name in EXAMPLE.findall(page.read_text(encoding="utf-8")):
            assert name not in found, f"two examples are named {name} ({page.relative_to(DOCS)})"
            found[name] = code
    return found


EXAMPLES = examples()


def write(directory: Path, *names: str) -> None:
    for name in names:
        (directory / name).write_text(EXAMPLES[name], encoding="utf-8")


def with_plugin(name: str, extra: str = "") -> str:
    """The how-to's YAML example, plus loading its plugin file by path."""
    return EXAMPLES[f"{name}.yaml"] + extra + f"plugins: {{paths: [{name}.py]}}\n"


def import_example(directory: Path, name: str) -> ModuleType:
    write(directory, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"docs_example_{name}", directory / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def htpasswd(directory: Path, *users: str) -> None:
    lines = [f"{user}:{bcrypt.hashpw(b'secret', bcrypt.gensalt(4)).decode()}\n" for user in users]
    path = directory / "users.htpasswd"
    path.write_text("".join(lines))
    path.chmod(0o600)


def wait_until(condition: Callable[[], object]) -> object:
    deadline = time.monotonic() + WAIT
    while not (result := condition()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return result


def echo_roundtrip(client: Socks5Client, data: bytes = b"ping") -> bytes:
    client.sock.sendall(data)
    return client.recv_exactly(len(data))


def run_pytest(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(directory)],
        capture_output=True, text=True, cwd=directory, timeout=120,
    )  # fmt: skip


def test_every_example_is_run_by_a_test():
    assert set(EXAMPLES) == {
        "no_ads.py", "test_no_ads.py", "pyproject.toml",
        "hostnames_only.py", "hostnames_only.yaml",
        "sqlite_users.py", "sqlite_users.yaml",
        "static_hosts.py", "static_hosts.yaml",
        "byte_meter.py",
        "redirect.py", "redirect.yaml",
        "front.yaml",
        "kerberos.yaml", "socks_gssapi_check.py",
        "broken.yaml",
        "test_async_example.py", "test_udp_example.py", "test_bind_example.py",
    }  # fmt: skip


# ---------------------------------------------------------------------------- the tutorial


def test_the_tutorial_plugin_and_the_testing_examples_pass_their_own_tests(tmp_path):
    write(tmp_path, "no_ads.py", "test_no_ads.py", "test_async_example.py", "test_udp_example.py")
    write(tmp_path, "test_bind_example.py")
    result = run_pytest(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 passed" in result.stdout


def test_the_tutorial_plugin_loads_from_rules_yaml(tmp_path):
    write(tmp_path, "no_ads.py")
    (tmp_path / "rules.yaml").write_text("plugins:\n  paths: [no_ads.py]\n")
    result = subprocess.run(
        [sys.executable, "-m", "socksflow", "plugins"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "no_ads 0.1.0  (no_ads.py)\n    socksflow_request\n" in result.stdout


def test_the_tutorial_package_installs_and_is_listed(tmp_path):
    package = tmp_path / "no-ads"
    package.mkdir()
    write(package, "pyproject.toml", "no_ads.py")
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(package)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    env = dict(os.environ, PYTHONPATH=str(site))
    result = subprocess.run(
        [sys.executable, "-m", "socksflow", "plugins"], capture_output=True, text=True, cwd=tmp_path, env=env,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"no_ads 0.1.0  ({site / 'no_ads.py'})" in result.stdout


# ---------------------------------------------------------------------------- how-tos


def test_deny_by_a_custom_condition(socksflow_server, tmp_path, echo_target):
    write(tmp_path, "hostnames_only.py")
    htpasswd(tmp_path, "backup-robot", "alice")
    server = socksflow_server(
        with_plugin("hostnames_only", "auth: {methods: [userpass, none], users: users.htpasswd}\n")
    )
    port = echo_target[1]
    code, client = socks5_handshake(server.address, f"127.0.0.1:{port}")
    client.close()
    assert code == 0x02
    code, client = socks5_handshake(server.address, f"localhost:{port}")
    assert code == 0x00 and echo_roundtrip(client) == b"ping"
    client.close()
    code, client = socks5_handshake(server.address, f"127.0.0.1:{port}", username="alice", password="secret")
    client.close()
    assert code == 0x02
    code, client = socks5_handshake(
        server.address, f"127.0.0.1:{port}", username="backup-robot", password="secret"
    )
    client.close()
    assert code == 0x00  # exempt


def test_deny_how_to_errors_are_as_documented(socksflow_server, tmp_path):
    write(tmp_path, "hostnames_only.py")
    with pytest.raises(ConfigErrors) as raised:
        socksflow_server(
            "hostnames_only:\n  exempt_users:\n    - 42\n"
            "plugins: {paths: [hostnames_only.py]}\nlisten: [127.0.0.1:0]\n"
        )
    message = f"{tmp_path / 'rules.yaml'}:3: hostnames_only.exempt_users[0]: expected text, got 42"
    assert [str(error) for error in raised.value.errors] == [message]
    assert (
        "`rules.yaml:3: hostnames_only.exempt_users[0]: expected text, got 42`"
        in (DOCS / "howto/deny.md").read_text()
    )


def test_custom_authentication_backend(socksflow_server, tmp_path, echo_target):
    module = import_example(tmp_path, "sqlite_users")
    module.add_user(str(tmp_path / "users.sqlite3"), "alice", "s3cret", groups=["staff"])
    identities = []

    class Observer:
        @hookimpl
        def socksflow_request(self, session):
            identities.append(session.identity)

    server = socksflow_server(with_plugin("sqlite_users"), plugins=[Observer()])
    with Socks5Client(server.address) as client:
        assert client.greet([Method.NO_AUTH, Method.USERPASS]) == Method.USERPASS
        assert client.login("alice", "s3cret") == 0
        assert client.connect(f"127.0.0.1:{echo_target[1]}")[0] == 0x00
    assert identities == [Identity("alice", frozenset({"staff"}))]
    with Socks5Client(server.address) as client:
        assert client.greet([Method.USERPASS]) == Method.USERPASS
        assert client.login("alice", "wrong") != 0
    with Socks5Client(server.address) as client:
        assert client.greet([Method.USERPASS]) == Method.USERPASS
        assert client.login("mallory", "s3cret") != 0
    with Socks5Client(server.address) as client:
        assert client.greet([Method.NO_AUTH]) == Method.NO_ACCEPTABLE


def test_custom_resolver(socksflow_server, tmp_path, echo_target):
    write(tmp_path, "static_hosts.py")
    server = socksflow_server(with_plugin("static_hosts"))
    code, client = socks5_handshake(server.address, f"ECHO.corp.internal.:{echo_target[1]}")
    assert code == 0x00 and echo_roundtrip(client) == b"ping"
    client.close()
    code, client = socks5_handshake(server.address, "printer.corp.internal:80")
    client.close()
    assert code == 0x04  # not listed under its own domain: never asked of real DNS


def test_per_session_accounting(socksflow_server, tmp_path, echo_target, caplog):
    caplog.set_level("INFO", logger="byte_meter")
    write(tmp_path, "byte_meter.py")
    server = socksflow_server("plugins: {paths: [byte_meter.py]}\n")
    module = server.pm.get_plugin("byte_meter")
    usage = server.call(lambda: server.server.stash[module.USAGE])
    code, client = socks5_handshake(server.address, f"127.0.0.1:{echo_target[1]}")
    assert code == 0x00
    assert echo_roundtrip(client, b"x" * 1000) == b"x" * 1000
    assert server.call(usage.snapshot) == {"anonymous": (1000, 1000)}  # live, while the tunnel runs
    client.close()
    assert wait_until(lambda: server.call(lambda: usage.totals)) == {"anonymous": [1000, 1000]}
    assert server.call(usage.snapshot) == {"anonymous": (1000, 1000)}
    assert re.search(r"anonymous: session \w+ moved 1000 bytes up, 1000 down", caplog.text)


def test_rewrite_a_destination(socksflow_server, tmp_path, echo_target):
    write(tmp_path, "redirect.py")
    assert "127.0.0.1:8080" in EXAMPLES["redirect.yaml"]
    config = with_plugin("redirect").replace("127.0.0.1:8080", f"127.0.0.1:{echo_target[1]}")
    server = socksflow_server(config)
    code, client = socks5_handshake(server.address, "Old-Wiki.example:80")
    assert code == 0x00 and echo_roundtrip(client) == b"ping"
    client.close()


def test_rewrite_how_to_errors_are_as_documented(socksflow_server, tmp_path):
    write(tmp_path, "redirect.py")
    with pytest.raises(ConfigErrors) as raised:
        socksflow_server('redirect:\n  "a.example:80": 127.0.0.1:80\n  old-wiki: 127.0.0.1:80\n'
                         "plugins: {paths: [redirect.py]}\nlisten: [127.0.0.1:0]\n")  # fmt: skip
    message = "redirect.old-wiki: 'old-wiki' is not HOST:PORT"
    assert [str(error) for error in raised.value.errors] == [f"{tmp_path / 'rules.yaml'}:3: {message}"]
    assert f"`rules.yaml:3: {message}`" in " ".join((DOCS / "howto/rewrite.md").read_text().split())


def test_local_front_of_a_tunnel(socksflow_server, tmp_path, echo_target, refusing_port):
    seen = []

    class Upstream:
        @hookimpl
        def socksflow_request(self, request):
            seen.append(str(request.destination))
            if request.destination.port == 25:
                from socksflow import Verdict

                return Verdict.deny("no mail")
            return None

    upstream = socksflow_server(plugins=[Upstream()], autoload=False)
    assert "127.0.0.1:1081" in EXAMPLES["front.yaml"]
    text = EXAMPLES["front.yaml"].replace("127.0.0.1:1081", str(upstream.address))
    front = socksflow_server(text.replace("listen: [127.0.0.1:1080]", "listen: [127.0.0.1:0]"))
    code, client = socks5_handshake(front.address, f"127.0.0.1:{echo_target[1]}")
    assert code == 0x00 and echo_roundtrip(client) == b"ping"
    client.close()
    assert seen == [f"127.0.0.1:{echo_target[1]}"]  # the session went through the upstream proxy
    for destination, expected in [(f"127.0.0.1:{refusing_port}", 0x05), ("127.0.0.1:25", 0x02)]:
        code, client = socks5_handshake(front.address, destination)
        client.close()
        assert code == expected, destination  # the upstream's answer, passed on
    code, client = socks5_handshake(front.address, "ads.doubleclick.net:443")
    client.close()
    assert code == 0x02 and len(seen) == 3  # refused here: it never reached the upstream


def test_local_front_rule_tests_pass(tmp_path):
    write(tmp_path, "front.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "socksflow", "check", "front.yaml"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert (result.returncode, result.stdout, result.stderr) == (0, "front.yaml: OK, 2 tests passed\n", "")


def test_kerberos_logins(socksflow_server, tmp_path, kdc, http_target):
    """The how-to's configuration, with the fixture realm's keytab; its check script as a client."""
    write(tmp_path, "kerberos.yaml", "socks_gssapi_check.py")
    shutil.copy(kdc.keytab, tmp_path / "proxy.keytab")
    server = socksflow_server(EXAMPLES["kerberos.yaml"])

    def check(user: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, KRB5CCNAME=f"FILE:{kdc.ccache(user)}")
        return subprocess.run(
            [sys.executable, "socks_gssapi_check.py", f"localhost:{server.port}", f"127.0.0.1:{http_target.port}"],
            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60,
        )  # fmt: skip

    alice = check("alice")
    assert alice.stdout == "logged in; protection: confidentiality\nHTTP/1.1 200 OK\n", alice.stderr
    bob = check("bob")  # not in staff
    assert bob.returncode != 0 and "the proxy answered the request with reply code 2" in bob.stderr
    page = " ".join((DOCS / "howto/kerberos.md").read_text().split())
    assert "logged in; protection: confidentiality HTTP/1.1 200 OK" in page
    assert "`the proxy answered the request with reply code 2`" in page


def test_kerberos_how_to_errors_are_as_documented(tmp_path, kdc):
    write(tmp_path, "kerberos.yaml")
    page = " ".join((DOCS / "howto/kerberos.md").read_text().split())
    other = tmp_path / "proxy.keytab"  # a keytab without an rcmd key
    for keytab, message in [
        (None, "rules.yaml:5: gssapi.keytab: no keytab file at"),
        (other, "rules.yaml:6: gssapi.service: no key for 'rcmd' in the keytab:"),
    ]:
        if keytab is not None:
            subprocess.run(
                ["kadmin.local", "-q", f"ktadd -norandkey -k {keytab} HTTP/localhost"],
                capture_output=True, check=True, timeout=60,  # the realm's KRB5_* are this process's
            )  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-m", "socksflow", "check", "kerberos.yaml"],
            capture_output=True, text=True, cwd=tmp_path, timeout=60,
        )  # fmt: skip
        assert result.returncode != 0
        assert message.replace("rules.yaml", "kerberos.yaml") in result.stdout + result.stderr
        assert f"`{message}" in page


def test_the_documented_config_errors_are_what_check_prints(tmp_path):
    write(tmp_path, "broken.yaml")
    page = (DOCS / "reference/rules.md").read_text()
    shown = page.split("$ socksflow check broken.yaml\n", 1)[1].split("```", 1)[0]
    result = subprocess.run(
        [sys.executable, "-m", "socksflow", "check", "broken.yaml"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == shown


# ---------------------------------------------------------------------------- the reference pages


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_reference_pages_are_up_to_date():
    assert load_generator().main(["--check"]) == 0, "run: python docs/gen_reference.py"


def test_every_hook_is_in_the_reference_with_the_spec_signature():
    page = (DOCS / "reference/hooks.md").read_text()
    documented = dict(re.findall(r"^### (socksflow_\w+)\n\n```python\n(socksflow_\w+\(.*)\n```", page, re.M))
    assert list(documented) == list(hookspecs.ALL_HOOKS), "hooks missing, extra or out of order"
    for name in hookspecs.ALL_HOOKS:
        spec = inspect.signature(getattr(hookspecs, name))
        expected = name + str(spec).replace("'", "")  # annotations are strings (postponed evaluation)
        assert documented[name] == expected


def test_every_cli_option_is_in_the_reference():
    parser = load_generator().subcommands()
    page = (DOCS / "reference/cli.md").read_text()
    for command, sub in parser.items():
        if command:
            assert f"## socksflow {command}\n" in page
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            for name in action.option_strings or [action.metavar or action.dest]:
                assert f"`{name}" in page, f"socksflow {command} {name}"


def standard_plugins() -> PluginManager:
    """socksflow's own plugins (not whatever else is installed), as entry points name them."""
    pm = PluginManager()
    for entry in importlib.metadata.distribution("socksflow").entry_points.select(group="socksflow"):
        pm.load_module(entry.value)
    return pm


def test_every_section_and_core_key_is_in_the_rules_reference():
    page = (DOCS / "reference/rules.md").read_text()
    documented = set(re.findall(r"^## `(\w+)`", page, re.M))
    config = Config.from_text("", "rules.yaml")
    for impl in standard_plugins().impls("socksflow_configure"):
        impl.function(config)
    assert documented == config._claimed
    for section, settings in [("timeouts", Timeouts), ("udp", UdpSettings), ("bind", BindSettings),
                              ("doors", DoorSettings), ("state", StateSettings), ("plugins", PluginSettings)]:  # fmt: skip
        text = page.split(f"## `{section}`", 1)[1].split("\n## ", 1)[0]
        for field in dataclasses.fields(settings):
            assert f"| `{field.name}` |" in text, f"{section}.{field.name}"
