"""Tor's SOCKS5 extensions RESOLVE (0xF0) and RESOLVE_PTR (0xF1), against a real server."""

from __future__ import annotations

import pytest

from socksflow import Command, Reply, hookimpl
from socksflow.protocol import Address
from socksflow.testing import Socks5Client, StaticResolver

ON = "doors: {tor_resolve: true}\n"


class Seen:
    def __init__(self) -> None:
        self.commands: list[Command] = []

    @hookimpl
    def socksflow_request(self, request) -> None:
        self.commands.append(request.command)


def ask(server, command: Command, destination: str) -> tuple[int, Address]:
    with Socks5Client(server.address) as client:
        client.greet()
        return client.request(command, destination)


@pytest.mark.parametrize("command", [Command.RESOLVE, Command.RESOLVE_PTR])
def test_off_by_default_and_no_plugin_is_asked(socksflow_server, command):
    seen = Seen()
    server = socksflow_server(plugins=[seen, StaticResolver({"tor.test": ["192.0.2.7"]})])
    assert ask(server, command, "127.0.0.1:0")[0] == Reply.COMMAND_NOT_SUPPORTED
    assert seen.commands == []


def test_resolve_answers_the_address_through_the_resolver_plugins(socksflow_server):
    resolver = StaticResolver({"tor.test": ["2001:db8::7", "192.0.2.7"], "six.test": ["2001:db8::6"]})
    server = socksflow_server(ON, plugins=[resolver])
    assert ask(server, Command.RESOLVE, "tor.test:0") == (Reply.SUCCEEDED, Address.parse("192.0.2.7:0"))
    assert ask(server, Command.RESOLVE, "six.test:0") == (Reply.SUCCEEDED, Address.parse("[2001:db8::6]:0"))
    assert ask(server, Command.RESOLVE, "missing.test:0")[0] == Reply.HOST_UNREACHABLE
    assert resolver.lookups == ["tor.test", "six.test", "missing.test"]


def test_rules_can_deny_a_resolution(socksflow_server):
    rules = "rules:\n  - deny: {command: resolve, to: '*.blocked.test'}\n  - allow: all\n"
    resolver = StaticResolver({"ads.blocked.test": ["192.0.2.9"], "fine.test": ["192.0.2.8"]})
    server = socksflow_server(ON + rules, plugins=[resolver])
    assert ask(server, Command.RESOLVE, "ads.blocked.test:0")[0] == Reply.NOT_ALLOWED
    assert ask(server, Command.RESOLVE, "fine.test:0") == (Reply.SUCCEEDED, Address.parse("192.0.2.8:0"))
    assert resolver.lookups == ["fine.test"]  # the denied name was never looked up


def test_resolve_ptr_answers_a_name(socksflow_server):
    server = socksflow_server(ON)
    code, bound = ask(server, Command.RESOLVE_PTR, "127.0.0.1:0")  # /etc/hosts: no DNS query
    assert (code, bound) == (Reply.SUCCEEDED, Address("localhost", 0))
    assert ask(server, Command.RESOLVE_PTR, "example.test:0")[0] == Reply.ADDRESS_TYPE_NOT_SUPPORTED
