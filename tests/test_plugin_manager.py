"""The plugin manager: pluggy registers and orders, socksflow awaits; loading, validation, listing."""

from __future__ import annotations

import asyncio
import inspect
import sys
import textwrap
import types
from collections.abc import Callable
from importlib.metadata import entry_points, version
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socksflow import hookimpl
from socksflow.errors import PluginError
from socksflow.plugins import (
    ENTRY_POINT_GROUP,
    ENV_DISABLE_AUTOLOAD,
    ENV_EXTRA_PLUGINS,
    PluginInfo,
    PluginLoadError,
    PluginManager,
)

pytestmark = pytest.mark.smoke

SESSION = object()
REQUEST = object()
REQUEST_ARGS = {"session": SESSION, "request": REQUEST}


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loading environment variables are unset unless a test sets them."""
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD, raising=False)
    monkeypatch.delenv(ENV_EXTRA_PLUGINS, raising=False)


def plugin(**hooks: Callable[..., Any]) -> types.SimpleNamespace:
    """A plugin object with the given hook implementations (marked with @hookimpl)."""
    return types.SimpleNamespace(**{name: hookimpl(function) for name, function in hooks.items()})


def call_first(pm: PluginManager, timeout: float | None = 1.0) -> tuple[Any, str]:
    return asyncio.run(pm.call_first("socksflow_request", timeout, **REQUEST_ARGS))


def write_plugin(folder: Path, name: str, source: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


# ============================================================================ awaiting caller


def test_call_first_awaits_async_implementations() -> None:
    async def socksflow_request(session: object, request: object) -> str:
        await asyncio.sleep(0)
        assert (session, request) == (SESSION, REQUEST)
        return "from async"

    pm = PluginManager()
    pm.register(plugin(socksflow_request=socksflow_request), "slowpoke")
    assert call_first(pm) == ("from async", "slowpoke")
    # What pluggy alone would answer: the coroutine object itself, never awaited.
    unawaited = pm.hook.socksflow_request(**REQUEST_ARGS)
    assert asyncio.iscoroutine(unawaited)
    unawaited.close()


def test_call_first_keeps_first_result_semantics_for_async() -> None:
    called: list[str] = []

    def answer(name: str, value: object, is_async: bool) -> Callable[..., Any]:
        if is_async:

            async def async_impl(request: object) -> object:
                called.append(name)
                return value

            return async_impl

        def sync_impl(request: object) -> object:
            called.append(name)
            return value

        return sync_impl

    pm = PluginManager()
    # pluggy calls the last registered first: "quiet" (async, no opinion), then "winner", never "late".
    pm.register(plugin(socksflow_request=answer("late", "late answer", True)), "late")
    pm.register(plugin(socksflow_request=answer("winner", "the answer", True)), "winner")
    pm.register(plugin(socksflow_request=answer("quiet2", None, False)), "quiet2")
    pm.register(plugin(socksflow_request=answer("quiet", None, True)), "quiet")
    assert call_first(pm) == ("the answer", "winner")
    assert called == ["quiet", "quiet2", "winner"]


def test_call_first_without_an_answer() -> None:
    pm = PluginManager()
    assert call_first(pm) == (None, "")
    pm.register(plugin(socksflow_request=lambda: None), "silent")
    assert call_first(pm) == (None, "")


# Implementations may take fewer arguments than the spec lists: one factory per accepted signature.
SIGNATURES: dict[str, list[Callable[[Callable[[], Any]], Callable[..., Any]]]] = {
    "socksflow_request": [
        lambda body: lambda session, request: body(),
        lambda body: lambda request, session: body(),
        lambda body: lambda request: body(),
        lambda body: lambda session: body(),
        lambda body: lambda: body(),
    ],
    "socksflow_check": [
        lambda body: lambda config, resolve: body(),
        lambda body: lambda resolve: body(),
        lambda body: lambda: body(),
    ],
}
HOOK_ARGS = {"socksflow_request": REQUEST_ARGS, "socksflow_check": {"config": object(), "resolve": object()}}

implementations = st.lists(
    st.tuples(
        st.one_of(st.none(), st.integers(min_value=0, max_value=3)),  # the answer
        st.booleans(),  # tryfirst
        st.booleans(),  # trylast
        st.integers(min_value=0, max_value=4),  # which signature
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(hook=st.sampled_from(list(SIGNATURES)), specs=implementations)
def test_awaiting_caller_answers_as_pluggy_does(hook: str, specs: list[tuple[Any, bool, bool, int]]) -> None:
    """With sync implementations only, socksflow's caller and pluggy's agree on answers and call order."""
    calls: list[int] = []
    pm = PluginManager()
    for index, (value, tryfirst, trylast, signature) in enumerate(specs):

        def body(index: int = index, value: Any = value) -> Any:
            calls.append(index)
            return value

        factories = SIGNATURES[hook]
        function = hookimpl(tryfirst=tryfirst, trylast=trylast)(factories[signature % len(factories)](body))
        pm.register(types.SimpleNamespace(**{hook: function}), f"p{index}")
    kwargs = HOOK_ARGS[hook]

    expected = getattr(pm.hook, hook)(**kwargs)
    pluggy_calls, calls[:] = calls[:], []
    if hook == "socksflow_check":  # every plugin is called: a list of the non-None answers
        assert asyncio.run(pm.call_all(hook, 1.0, **kwargs)) == expected
    else:
        answer, winner = asyncio.run(pm.call_first(hook, 1.0, **kwargs))
        assert answer == expected
        assert winner == (f"p{calls[-1]}" if answer is not None else "")
    assert calls == pluggy_calls


# ============================================================================ failures


@pytest.mark.parametrize("is_async", [False, True])
def test_a_raising_implementation_names_plugin_and_hook(is_async: bool) -> None:
    def sync_boom(request: object) -> None:
        raise ValueError("bad input")

    async def async_boom(request: object) -> None:
        raise ValueError("bad input")

    after: list[str] = []
    pm = PluginManager()
    pm.register(plugin(socksflow_request=lambda: after.append("called")), "after")
    pm.register(plugin(socksflow_request=async_boom if is_async else sync_boom), "boom")
    with pytest.raises(PluginError) as caught:
        call_first(pm)
    error = caught.value
    assert (error.plugin, error.hook) == ("boom", "socksflow_request")
    assert str(error) == "plugin 'boom' failed in socksflow_request: ValueError: bad input"
    assert isinstance(error.__cause__, ValueError)
    assert after == []  # a failure ends the call: the session fails closed


def test_a_slow_implementation_times_out() -> None:
    async def socksflow_request(request: object) -> str:
        await asyncio.sleep(10)
        return "too late"

    pm = PluginManager()
    pm.register(plugin(socksflow_request=lambda: "never asked"), "fallback")
    pm.register(plugin(socksflow_request=socksflow_request), "slow")
    with pytest.raises(PluginError) as caught:
        call_first(pm, timeout=0.05)
    assert str(caught.value) == "plugin 'slow' failed in socksflow_request: no answer within 0.05s"
    assert isinstance(caught.value.__cause__, TimeoutError)


def test_call_all_sync_names_the_plugin() -> None:
    def socksflow_relay_data(data: bytes) -> bytes:
        raise RuntimeError("oops")

    pm = PluginManager()
    pm.register(plugin(socksflow_relay_data=socksflow_relay_data), "inspector")
    with pytest.raises(
        PluginError, match=r"^plugin 'inspector' failed in socksflow_relay_data: RuntimeError: oops$"
    ):
        pm.call_all_sync("socksflow_relay_data", session=None, direction=None, data=b"x")


def test_call_chain_sync_passes_each_result_to_the_next() -> None:
    seen: list[tuple[str, bytes]] = []

    def step(name: str, result: bytes | None) -> Callable[..., bytes | None]:
        def socksflow_relay_data(data: bytes) -> bytes | None:
            seen.append((name, data))
            return result

        return socksflow_relay_data

    pm = PluginManager()
    # pluggy calls the plugin registered last first.
    pm.register(plugin(socksflow_relay_data=step("third", b"3")), "third")
    pm.register(plugin(socksflow_relay_data=step("second", None)), "second")
    pm.register(plugin(socksflow_relay_data=step("first", b"1")), "first")
    result = pm.call_chain_sync("socksflow_relay_data", "data", b"0", session=None, direction=None)
    assert result == b"3"
    assert seen == [("first", b"0"), ("second", b"1"), ("third", b"1")]


# ============================================================================ validation

MARKER = "from socksflow import hookimpl\n\n@hookimpl\n"


@pytest.mark.parametrize(
    ("source", "hook"),
    [
        (
            f"{MARKER}def socksflow_reqeust(request):\n    pass\n",
            "socksflow_reqeust",
        ),
        ("def socksflow_reqeust(request):\n    pass\n", "socksflow_reqeust"),  # no marker: still a hook
        (f"{MARKER}def on_request(request):\n    pass\n", "on_request"),
    ],
)
def test_a_misspelt_hook_fails_loading(tmp_path: Path, source: str, hook: str) -> None:
    path = write_plugin(tmp_path, "typo", source)
    with pytest.raises(PluginLoadError, match=f"^unknown hook '{hook}' in plugin"):
        PluginManager().load_all(paths=[path], autoload=False)
    pm = PluginManager()
    pm.load_path(path)
    with pytest.raises(PluginLoadError, match=f"^unknown hook '{hook}'"):
        pm.check_pending()


def test_a_misspelt_argument_fails_registration() -> None:
    def socksflow_request(session: object, reqest: object) -> None:
        pass

    pm = PluginManager()
    with pytest.raises(PluginLoadError, match=r"Argument\(s\) \{'reqest'\} are declared in the hookimpl"):
        pm.register(plugin(socksflow_request=socksflow_request), "typo")
    assert not pm.has_plugin("typo")


@pytest.mark.parametrize("kind", ["hookwrapper", "wrapper"])
def test_hook_wrappers_are_rejected(kind: str) -> None:
    def socksflow_request(request: object) -> Any:
        return (yield)

    pm = PluginManager()
    wrapper = types.SimpleNamespace(socksflow_request=hookimpl(**{kind: True})(socksflow_request))
    with pytest.raises(PluginLoadError, match=r"^plugin 'wrapping': socksflow_request is a hook wrapper"):
        pm.register(wrapper, "wrapping")
    assert not pm.has_plugin("wrapping")
    assert pm.impls("socksflow_request") == ()


def test_async_implementation_of_a_sync_only_hook_is_rejected() -> None:
    async def socksflow_relay_data(data: bytes) -> bytes:
        return data

    pm = PluginManager()
    with pytest.raises(
        PluginLoadError, match=r"^plugin 'slowrelay': socksflow_relay_data must not be async$"
    ):
        pm.register(plugin(socksflow_relay_data=socksflow_relay_data), "slowrelay")
    assert not pm.has_plugin("slowrelay")
    assert pm.impls("socksflow_relay_data") == ()


def test_impls_cache_follows_register_and_unregister() -> None:
    pm = PluginManager()
    first = plugin(socksflow_request=lambda: 1)
    pm.register(first, "first")
    assert [impl.plugin for impl in pm.impls("socksflow_request")] == ["first"]
    pm.register(plugin(socksflow_request=lambda: 2), "second")
    assert [impl.plugin for impl in pm.impls("socksflow_request")] == ["second", "first"]
    pm.unregister(first)
    assert [impl.plugin for impl in pm.impls("socksflow_request")] == ["second"]
    pm.unregister(name="second")
    assert pm.impls("socksflow_request") == ()


def test_impls_describe_the_call() -> None:
    pm = PluginManager()
    pm.register(plugin(socksflow_request=lambda request, session: None), "p")
    (impl,) = pm.impls("socksflow_request")
    assert (impl.plugin, impl.argnames) == ("p", ("request", "session"))


# ============================================================================ loading and listing

VERSIONED = """
    from __future__ import annotations

    from dataclasses import dataclass

    from socksflow import hookimpl

    __version__ = "1.2.3"


    @dataclass
    class Seen:  # a dataclass with postponed annotations needs its module in sys.modules
        count: int = 0


    @hookimpl
    def socksflow_request(request):
        return None


    def socksflow_configure(config):
        pass
"""


def test_load_path_and_plugin_info(tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "versioned_plugin", VERSIONED)
    pm = PluginManager()
    pm.load_all(paths=[path], autoload=False)
    assert pm.plugin_info() == [
        PluginInfo("versioned_plugin", "1.2.3", str(path), ("socksflow_configure", "socksflow_request"))
    ]


def test_plugin_info_for_objects() -> None:
    pm = PluginManager()
    pm.register(plugin(socksflow_request=lambda: None), "inline")
    assert pm.plugin_info() == [PluginInfo("inline", "-", "types", ("socksflow_request",))]


def test_load_a_folder(tmp_path: Path) -> None:
    write_plugin(tmp_path, "folder_b", "def socksflow_request(request):\n    return 'b'\n")
    write_plugin(tmp_path, "folder_a", "def socksflow_request(request):\n    return 'a'\n")
    (tmp_path / "notes.txt").write_text("not a plugin")
    pm = PluginManager()
    pm.load_path(tmp_path)
    assert sorted(info.name for info in pm.plugin_info()) == ["folder_a", "folder_b"]
    assert call_first(pm) == ("b", "folder_b")  # files load in name order; the last loaded is called first


def test_load_path_errors(tmp_path: Path) -> None:
    pm = PluginManager()
    missing = tmp_path / "missing.py"
    with pytest.raises(PluginLoadError, match=f"^plugin path '{missing}' does not exist$"):
        pm.load_path(missing)
    broken = write_plugin(tmp_path, "broken_plugin", "raise RuntimeError('cannot start')\n")
    with pytest.raises(PluginLoadError, match=f"^{broken}: RuntimeError: cannot start$"):
        pm.load_path(broken)
    assert "socksflow_local_broken_plugin" not in sys.modules
    other = tmp_path / "elsewhere"
    other.mkdir()
    pm.load_path(write_plugin(tmp_path, "twin", ""))
    with pytest.raises(PluginLoadError, match=r"^two plugins are named 'twin'"):
        pm.load_path(write_plugin(other, "twin", ""))


def test_plugins_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    by_path = write_plugin(
        tmp_path, "env_file_plugin", "def socksflow_request(request):\n    return 'file'\n"
    )
    modules = tmp_path / "modules"
    modules.mkdir()
    write_plugin(modules, "env_module_plugin", "def socksflow_configure(config):\n    pass\n")
    monkeypatch.syspath_prepend(str(modules))
    monkeypatch.setenv(ENV_EXTRA_PLUGINS, f"{by_path},env_module_plugin")
    pm = PluginManager()
    pm.load_all(autoload=False)
    assert {(info.name, info.source) for info in pm.plugin_info()} == {
        ("env_file_plugin", str(by_path)),
        ("env_module_plugin", "env_module_plugin"),
    }
    monkeypatch.delitem(sys.modules, "env_module_plugin")


def installed_names() -> list[str]:
    return [ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)]


def test_entry_points_are_loaded() -> None:
    assert "auth" in installed_names()
    pm = PluginManager()
    # Only auth: the other installed plugins are tested by their own suites.
    pm.load_all(disabled=[name for name in installed_names() if name != "auth"])
    (info,) = pm.plugin_info()
    assert (info.name, info.version) == ("auth", version("socksflow"))
    folder, file = Path(info.source).parts[-2:]  # the source tree, or an installed wheel
    assert (folder, file) in {("plugins", "auth.py"), ("socksflow_plugins", "auth.py")}
    assert "socksflow_authenticate" in info.hooks


def test_autoload_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    pm = PluginManager()
    pm.load_all(autoload=False)
    assert pm.plugin_info() == []
    monkeypatch.setenv(ENV_DISABLE_AUTOLOAD, "1")
    pm = PluginManager()
    pm.load_all()
    assert pm.plugin_info() == []


def test_disabled_plugins_are_not_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A disabled plugin's code is not run at all: disabling is how an operator steps around a broken one.
    broken = write_plugin(tmp_path, "disabled_broken", "raise RuntimeError('must not run')\n")
    monkeypatch.setenv(ENV_EXTRA_PLUGINS, "no_such_module_disabled")
    pm = PluginManager()
    pm.load_all(paths=[broken], disabled=[*installed_names(), "disabled_broken", "no_such_module_disabled"])
    assert pm.plugin_info() == []
    assert all(pm.is_blocked(name) for name in ["auth", "disabled_broken", "no_such_module_disabled"])
    assert "socksflow_local_disabled_broken" not in sys.modules


def test_notify_nowait_calls_sync_observers_at_once_and_defers_the_rest() -> None:
    calls: list[str] = []

    def sync_end(session):
        calls.append("sync")

    async def async_end(session):
        calls.append("async")

    def failing_end(session):
        raise RuntimeError("observer bug")

    pm = PluginManager()
    pm.register(plugin(socksflow_session_end=failing_end), "failing")
    pm.register(plugin(socksflow_session_end=sync_end), "sync")
    assert pm.notify_nowait("socksflow_session_end", 1.0, session=SESSION) is None  # no task needed
    assert calls == ["sync"]  # the failing observer was logged and skipped
    pm.register(plugin(socksflow_session_end=async_end), "async")  # registered last: called first
    calls.clear()
    pending = pm.notify_nowait("socksflow_session_end", 1.0, session=SESSION)
    assert pending is not None and calls == []
    asyncio.run(pending)
    assert calls == ["async", "sync"]


# ---------------------------------------------------------------------------- dormant plugins


class Sleepy:
    """Configured by a ``sleepy:`` section; counts the session hooks it is asked."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def socksflow_configure(self, config):
        return False if config.section("sleepy") is None else None

    @hookimpl
    def socksflow_client_connected(self, session):
        self.calls.append("client_connected")

    @hookimpl
    def socksflow_session_end(self, session):
        self.calls.append("session_end")

    @hookimpl
    def socksflow_explain(self, config):
        return ["sleepy: explained"]


def test_a_plugin_with_nothing_configured_is_not_asked_about_sessions(socksflow_server, echo):
    from socksflow.testing import socks5_handshake

    sleepy = Sleepy()
    server = socksflow_server("listen: [127.0.0.1:0]\n", plugins=[sleepy], autoload=False)
    hooks = server.server.config.hooks
    assert [impl.plugin for impl in hooks.impls("socksflow_client_connected")] == []
    assert len(hooks.impls("socksflow_explain")) == 1  # configuration hooks are always asked
    code, client = socks5_handshake(server.address, echo)
    client.close()
    assert code == 0
    server.stop()
    assert sleepy.calls == []  # not a single call for the session

    sleepy = Sleepy()
    server = socksflow_server("listen: [127.0.0.1:0]\nsleepy: {}\n", plugins=[sleepy], autoload=False)
    code, client = socks5_handshake(server.address, echo)
    client.close()
    server.stop()
    assert sleepy.calls == ["client_connected", "session_end"]


def test_a_plugin_may_stay_awake_for_some_session_hooks_only(socksflow_server, echo):
    from socksflow.testing import socks5_handshake

    class Drowsy(Sleepy):
        @hookimpl
        def socksflow_configure(self, config):
            return frozenset({"socksflow_session_end"})  # e.g. a default limit still to count

    drowsy = Drowsy()
    server = socksflow_server("listen: [127.0.0.1:0]\n", plugins=[drowsy], autoload=False)
    code, client = socks5_handshake(server.address, echo)
    client.close()
    assert code == 0
    server.stop()
    assert drowsy.calls == ["session_end"]


def test_a_dormant_view_follows_plugins_registered_later():
    pm = PluginManager()
    view = pm.configured(frozenset({"sleepy"}))
    pm.register(Sleepy(), "sleepy")
    pm.register(Sleepy(), "awake")
    assert [impl.plugin for impl in view.impls("socksflow_session_end")] == ["awake"]
    assert {impl.plugin for impl in view.impls("socksflow_explain")} == {"sleepy", "awake"}
    assert pm.configured(frozenset()) is pm


def test_sync_implementations_answers_are_awaited_exactly_when_inspect_says_so() -> None:
    """Plain answers of a type seen before skip the check; awaitables are still awaited."""

    class Plain:
        pass

    class Later:
        def __await__(self):
            yield from asyncio.sleep(0).__await__()
            return "awaited"

    def generator_coroutine():  # a generator-based coroutine, awaitable by its flag
        yield from ()
        return "from the generator"

    plain = Plain()
    answers: list[Any] = [plain, plain, Later(), types.coroutine(generator_coroutine)(), (x for x in ())]
    pm = PluginManager()
    pm.register(plugin(socksflow_request=lambda session, request: answers.pop(0)), "p")
    assert call_first(pm) == (plain, "p")
    assert call_first(pm) == (plain, "p")  # the type is known now: no check, the same answer
    assert call_first(pm) == ("awaited", "p")
    assert call_first(pm) == ("from the generator", "p")
    answer, _ = call_first(pm)  # a plain generator: not awaitable, although generators can be
    assert inspect.isgenerator(answer)
