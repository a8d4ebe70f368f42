"""The core's typed hook facade matches the hook specs, and can trace every plugin call."""

from __future__ import annotations

import asyncio
import inspect
import logging
import types

import pytest

from socksflow import Verdict, hookimpl, hookspecs
from socksflow.hooks import ENV_TRACE, Hooks
from socksflow.plugins import PluginManager
from socksflow.protocol import Address, Command, Request

pytestmark = pytest.mark.smoke


def positional(function: object) -> list[str]:
    parameters = inspect.signature(function).parameters.values()  # type: ignore[arg-type]
    return [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"]


@pytest.mark.parametrize("hook", hookspecs.ALL_HOOKS)
def test_every_hook_has_one_facade_method_with_the_specs_parameters(hook: str) -> None:
    method = getattr(Hooks, hook.removeprefix("socksflow_"), None)
    assert method is not None, f"Hooks has no method for {hook}"
    assert positional(method) == positional(getattr(hookspecs, hook))


def test_the_facade_has_no_method_for_a_hook_that_does_not_exist() -> None:
    names = {hook.removeprefix("socksflow_") for hook in hookspecs.ALL_HOOKS}
    helpers = {"implementations"}
    public = {name for name in vars(Hooks) if not name.startswith("_") and callable(getattr(Hooks, name))}
    assert public - helpers == names


def test_trace_logs_plugin_hook_time_and_result(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def socksflow_request(request: Request) -> Verdict:
        await asyncio.sleep(0)
        return Verdict.deny("no", rule="rules.yaml:3")

    pm = PluginManager()
    pm.register(types.SimpleNamespace(socksflow_request=hookimpl(socksflow_request)), "rules")
    pm.register(types.SimpleNamespace(socksflow_request=hookimpl(lambda: None)), "quiet")
    monkeypatch.setenv(ENV_TRACE, "1")
    hooks = Hooks(pm, 1.0)
    request = Request(Command.CONNECT, Address.parse("127.0.0.1:80"))
    with caplog.at_level(logging.DEBUG, logger="socksflow.trace"):
        verdict, plugin = asyncio.run(hooks.request(None, request))  # type: ignore[arg-type]
    assert (verdict.allowed, plugin) == (False, "rules")
    lines = [record.getMessage() for record in caplog.records if record.name == "socksflow.trace"]
    assert len(lines) == 2
    assert lines[0].startswith("quiet socksflow_request ") and lines[0].endswith(" ms -> None")
    assert lines[1].startswith("rules socksflow_request ")
    assert lines[1].endswith(
        "-> Verdict(allowed=False, reply=<Reply.NOT_ALLOWED: 2>, reason='no', rule='rules.yaml:3', destination=None, addresses=None, outbound=None)"
    )


def test_without_the_variable_nothing_is_traced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_TRACE, raising=False)
    pm = PluginManager()
    assert Hooks(pm, 1.0).caller is pm
