"""The plugin manager: pluggy registers, validates, orders and lists; socksflow awaits.

pluggy never awaits: an ``async def`` implementation returns a coroutine, which pluggy's
``firstresult`` would take as the answer.  So socksflow walks the implementations itself, in
pluggy's order, awaiting each result with the phase's timeout and turning any exception into a
:class:`~socksflow.errors.PluginError` that names the plugin.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import operator
import os
import sys
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import GeneratorType, ModuleType
from typing import Any

import pluggy

from socksflow import hookspecs
from socksflow.errors import PluginError, SocksflowError

log = logging.getLogger("socksflow.plugins")

ENTRY_POINT_GROUP = "socksflow"
HOOK_PREFIX = "socksflow_"
ENV_DISABLE_AUTOLOAD = "SOCKSFLOW_DISABLE_PLUGIN_AUTOLOAD"
ENV_EXTRA_PLUGINS = "SOCKSFLOW_PLUGINS"

hookimpl = pluggy.HookimplMarker("socksflow")
"""Marks a function as a socksflow hook implementation (``@socksflow.hookimpl``)."""


class PluginLoadError(SocksflowError):
    """A plugin could not be imported or registered."""


@dataclass(frozen=True, slots=True)
class Impl:
    """One hook implementation, ready to call with positional arguments."""

    plugin: str
    function: Callable[..., Any]
    argnames: tuple[str, ...]
    # The arguments out of a call's keyword dict, as a tuple: built once, not per call.
    args: Callable[[dict[str, Any]], tuple[Any, ...]] = field(init=False, repr=False, compare=False)
    # What the dispatch loops use instead, without a Python call of their own: ``one`` is the
    # only argument's name (``function(kwargs[one])``), else ``many`` picks the tuple (C).
    one: str | None = field(init=False, repr=False, compare=False)
    many: Callable[[dict[str, Any]], tuple[Any, ...]] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", _picker(self.argnames))
        names = self.argnames
        object.__setattr__(self, "one", names[0] if len(names) == 1 else None)
        object.__setattr__(self, "many", self.args if len(names) > 1 else None)


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """What ``socksflow plugins`` shows about one plugin."""

    name: str
    version: str
    source: str
    hooks: tuple[str, ...]
    unavailable: str | None = None  # why it can do nothing here: the module's ``unavailable`` string


class HookCaller:
    """Calls hook implementations the socksflow way; :meth:`impls` says which, in what order."""

    # What impls() answered, per hook, while it still holds: the per-session dispatch reads it
    # without a call.  A subclass whose impls() is not cached leaves it empty.
    _impls: dict[str, tuple[Impl, ...]] = {}  # noqa: RUF012 - never filled on the class

    def impls(self, hook: str) -> tuple[Impl, ...]:
        raise NotImplementedError

    async def call_first(self, hook: str, timeout: float | None, /, **kwargs: Any) -> tuple[Any, str]:
        """First non-``None`` answer and the plugin that gave it; ``(None, "")`` if none did.

        Raises :class:`PluginError` (the cause chained) when an implementation raises or
        exceeds ``timeout``.
        """
        answer = self.call_first_nowait(hook, timeout, **kwargs)
        return answer if isinstance(answer, tuple) else await answer

    def call_first_nowait(
        self, hook: str, timeout: float | None, /, **kwargs: Any
    ) -> tuple[Any, str] | Awaitable[tuple[Any, str]]:
        """As :meth:`call_first`, without a coroutine while the implementations answer synchronously.

        For hooks called per datagram: the ``(answer, plugin)`` pair at once when no
        implementation tried returned an awaitable; otherwise an awaitable that finishes the
        call (await it for the pair).  Failures raise :class:`PluginError` as in
        :meth:`call_first`, from this call or from the awaitable.
        """
        impls = self._impls.get(hook)
        if impls is None:
            impls = self.impls(hook)
        for index, impl in enumerate(impls):
            # _invoke(), inline: this runs for every hook call of every session.
            try:
                if impl.one is not None:
                    result = impl.function(kwargs[impl.one])
                elif impl.many is not None:
                    result = impl.function(*impl.many(kwargs))
                else:
                    result = impl.function()
            except Exception as exc:  # never BaseException: cancellation must pass through
                raise PluginError(impl.plugin, hook, f"{type(exc).__name__}: {exc}") from exc
            if result is None:  # no opinion, the usual answer: never awaitable, no isawaitable() to ask
                continue
            if type(result) not in _PLAIN and isawaitable(result):
                return self._finish_first(hook, timeout, impls[index:], result, kwargs)
            return result, impl.plugin
        return None, ""

    async def call_first_after(
        self, hook: str, timeout: float | None, plugin: str, /, **kwargs: Any
    ) -> tuple[Any, str]:
        """As :meth:`call_first`, asking only the implementations that come after ``plugin``'s."""
        impls = self.impls(hook)
        after = next((i + 1 for i, impl in enumerate(impls) if impl.plugin == plugin), len(impls))
        for impl in impls[after:]:
            result = await _call(impl, hook, kwargs, timeout)
            if result is not None:
                return result, impl.plugin
        return None, ""

    async def _finish_first(
        self,
        hook: str,
        timeout: float | None,
        impls: tuple[Impl, ...],
        pending: Awaitable[Any],
        kwargs: dict[str, Any],
    ) -> tuple[Any, str]:
        result = await _settle(impls[0], hook, pending, timeout)
        if result is not None:
            return result, impls[0].plugin
        for impl in impls[1:]:
            result = await _call(impl, hook, kwargs, timeout)
            if result is not None:
                return result, impl.plugin
        return None, ""

    async def call_all(self, hook: str, timeout: float | None, /, **kwargs: Any) -> list[Any]:
        """Every non-``None`` answer, in call order; the first failure raises PluginError."""
        return [result for result, _ in await self.call_all_named(hook, timeout, **kwargs)]

    async def call_all_named(
        self, hook: str, timeout: float | None, /, **kwargs: Any
    ) -> list[tuple[Any, str]]:
        """As :meth:`call_all`, each answer with the plugin that gave it."""
        results = []
        for impl in self.impls(hook):
            result = await _call(impl, hook, kwargs, timeout)
            if result is not None:
                results.append((result, impl.plugin))
        return results

    def call_all_sync(self, hook: str, /, **kwargs: Any) -> list[Any]:
        """As :meth:`call_all` for sync-only hooks (no event loop needed)."""
        results = []
        impls = self._impls.get(hook)
        for impl in self.impls(hook) if impls is None else impls:
            try:  # _invoke(), inline: relay_start runs for every session
                if impl.one is not None:
                    result = impl.function(kwargs[impl.one])
                else:
                    result = impl.function(*impl.args(kwargs))
            except Exception as exc:
                raise PluginError(impl.plugin, hook, f"{type(exc).__name__}: {exc}") from exc
            if result is not None:
                results.append(result)
        return results

    def call_chain_sync(self, hook: str, argname: str, value: Any, /, **kwargs: Any) -> Any:
        """Pass ``value`` through every implementation in call order, each getting the previous result.

        ``value`` goes in as the argument ``argname``; an implementation that answers ``None``
        passes it on unchanged.  Returns the last value.  For sync-only hooks
        (``socksflow_relay_data``); the first failure raises PluginError.
        """
        for impl in self.impls(hook):
            kwargs[argname] = value
            result = _invoke(impl, hook, kwargs)
            if result is not None:
                value = result
        return value

    async def notify(self, hook: str, timeout: float | None, /, **kwargs: Any) -> None:
        """Call every observer; failures are logged, never raised."""
        pending = self.notify_nowait(hook, timeout, **kwargs)
        if pending is not None:
            await pending

    def notify_nowait(self, hook: str, timeout: float | None, /, **kwargs: Any) -> Awaitable[None] | None:
        """As :meth:`notify`, calling sync observers now: an awaitable only if some were async.

        Observers run in call order; the first async one and all after it run in the awaitable.
        """
        impls = self._impls.get(hook)
        if impls is None:
            impls = self.impls(hook)
        for index, impl in enumerate(impls):
            try:  # _invoke(), inline: session_end runs for every session
                result = (
                    impl.function(kwargs[impl.one])
                    if impl.one is not None
                    else impl.function(*impl.args(kwargs))
                )
            except Exception as exc:
                error = PluginError(impl.plugin, hook, f"{type(exc).__name__}: {exc}")
                error.__cause__ = exc
                log.error("%s", error, exc_info=exc)
                continue
            if result is not None and type(result) not in _PLAIN and isawaitable(result):
                return self._notify_rest(hook, timeout, impl, result, impls[index + 1 :], kwargs)
        return None

    async def _notify_rest(
        self, hook: str, timeout: float | None, first: Impl, pending: Awaitable[Any],
        rest: tuple[Impl, ...], kwargs: dict[str, Any],
    ) -> None:  # fmt: skip
        try:
            await _settle(first, hook, pending, timeout)
        except PluginError as exc:
            log.error("%s", exc, exc_info=exc.__cause__)
        for impl in rest:
            try:
                await _call(impl, hook, kwargs, timeout)
            except PluginError as exc:
                log.error("%s", exc, exc_info=exc.__cause__)


class ConfiguredHooks(HookCaller):
    """The hooks of one configuration: without the session hooks of its dormant plugins.

    A plugin is dormant under a configuration when its ``socksflow_configure`` returned
    ``False`` (nothing configured for it): its per-session hooks are then not called at all.
    ``dormant`` maps each such plugin to the session hooks still called (a configure answer
    that is a set of hook names).
    """

    def __init__(self, pm: PluginManager, dormant: dict[str, frozenset[str]]) -> None:
        self._pm = pm
        self.dormant = dormant
        self._impls: dict[str, tuple[Impl, ...]] = {}
        self._generation = pm.generation
        pm._dependents.add(self)  # cleared with the manager's own cache: _impls is read directly

    def impls(self, hook: str) -> tuple[Impl, ...]:
        if self._generation != self._pm.generation:  # a plugin was registered or removed since
            self._impls.clear()
            self._generation = self._pm.generation
        cached = self._impls.get(hook)
        if cached is None:
            cached = self._pm.impls(hook)
            if hook in hookspecs.SESSION_HOOKS:
                cached = tuple(
                    impl
                    for impl in cached
                    if impl.plugin not in self.dormant or hook in self.dormant[impl.plugin]
                )
            self._impls[hook] = cached
        return cached


class PluginManager(HookCaller, pluggy.PluginManager):
    """One per server: the standard plugins, entry points, files named in the config."""

    def __init__(self) -> None:
        super().__init__(ENTRY_POINT_GROUP)
        self.add_hookspecs(hookspecs)
        self._impls: dict[str, tuple[Impl, ...]] = {}
        self._origins: dict[str, str] = {}
        self.offered: set[str] = set()  # every plugin name found, loaded or disabled
        self.generation = 0  # counts changes of the plugin set (for the caches of ConfiguredHooks)
        self._dependents: weakref.WeakSet[ConfiguredHooks] = weakref.WeakSet()

    # ------------------------------------------------------------------ registration

    def parse_hookimpl_opts(self, plugin: object, name: str) -> pluggy.HookimplOpts | None:
        opts = super().parse_hookimpl_opts(plugin, name)
        # As in pytest, a prefixed function is an implementation even without the marker, so
        # a misspelt hook name is always caught by check_pending() instead of ignored.
        if opts is None and name.startswith(HOOK_PREFIX) and callable(getattr(plugin, name, None)):
            opts = {}
        return opts

    def register(self, plugin: object, name: str | None = None) -> str | None:
        try:
            registered = super().register(plugin, name)
        except pluggy.PluginValidationError as exc:  # e.g. a misspelt argument name
            if self.is_registered(plugin):  # pluggy < 1.7 leaves the plugin half-registered
                self.unregister(plugin)
            raise PluginLoadError(str(exc)) from exc
        if registered is not None:
            self.offered.add(registered)
            try:
                self._validate(registered)
            except PluginLoadError:
                self.unregister(name=registered)
                raise
        self._changed()
        return registered

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any:
        result = super().unregister(plugin, name)
        self._changed()
        return result

    def _changed(self) -> None:
        """The plugin set changed: forget every list of implementations made from it."""
        self._impls.clear()
        for dependent in self._dependents:
            dependent._impls.clear()
        self.generation += 1

    def _validate(self, name: str) -> None:
        plugin = self.get_plugin(name)
        for caller in self.get_hookcallers(plugin) or ():
            for impl in caller.get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                if impl.hookwrapper or impl.wrapper:
                    raise PluginLoadError(
                        f"plugin {name!r}: {caller.name} is a hook wrapper; socksflow awaits hooks "
                        "itself and does not support wrappers (observe with *_start/*_end hooks)"
                    )
                if caller.name in hookspecs.SYNC_ONLY_HOOKS and inspect.iscoroutinefunction(impl.function):
                    raise PluginLoadError(f"plugin {name!r}: {caller.name} must not be async")

    def load_entry_points(self, disabled: Iterable[str] = ()) -> None:
        """Register every installed plugin of the ``socksflow`` entry-point group."""
        for name in disabled:
            self.set_blocked(name)
        try:
            self.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as exc:  # an installed plugin that fails to import
            raise PluginLoadError(f"cannot load an installed plugin: {exc!r}") from exc

    def load_path(self, path: Path) -> None:
        """Register a plugin file, or every ``*.py`` file in a folder."""
        files = sorted(path.glob("*.py")) if path.is_dir() else [path]
        if not path.exists():
            raise PluginLoadError(f"plugin path {str(path)!r} does not exist")
        for file in files:
            self.offered.add(file.stem)
            if self.is_blocked(file.stem):  # a disabled plugin's code is not even run
                continue
            module_name = f"socksflow_local_{file.stem}"
            spec = importlib.util.spec_from_file_location(module_name, file)
            if spec is None or spec.loader is None:
                raise PluginLoadError(f"{file}: not a Python file")
            module = importlib.util.module_from_spec(spec)
            # As an import would: dataclasses and typing look the module up in sys.modules.
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[module_name]
                raise PluginLoadError(f"{file}: {type(exc).__name__}: {exc}") from exc
            self._register_named(module, file.stem, str(file))

    def load_module(self, dotted: str) -> None:
        """Register an importable module by its dotted name."""
        name = dotted.rpartition(".")[2]
        self.offered.add(name)
        if self.is_blocked(name):
            return
        try:
            module = importlib.import_module(dotted)
        except Exception as exc:
            raise PluginLoadError(f"cannot import plugin {dotted!r}: {exc!r}") from exc
        self._register_named(module, name, dotted)

    def _register_named(self, plugin: object, name: str, origin: str) -> None:
        if self.has_plugin(name):
            raise PluginLoadError(f"two plugins are named {name!r} ({origin} and {self._source(name)})")
        self.register(plugin, name)
        self._origins[name] = origin

    def load_all(
        self, *, paths: Iterable[Path] = (), disabled: Iterable[str] = (), autoload: bool = True
    ) -> None:
        """Load plugins as a server does: entry points, then files, then ``$SOCKSFLOW_PLUGINS``."""
        disabled = list(disabled)
        for name in disabled:
            self.set_blocked(name)
        self.offered.update(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
        if autoload and not os.environ.get(ENV_DISABLE_AUTOLOAD):
            self.load_entry_points()
        for path in paths:
            self.load_path(path)
        for extra in filter(None, os.environ.get(ENV_EXTRA_PLUGINS, "").split(",")):
            if extra.endswith(".py") or os.sep in extra:
                self.load_path(Path(extra))
            else:
                self.load_module(extra)
        self.check_pending()

    def check_pending(self) -> None:
        """Raise PluginLoadError for an implementation of a hook that does not exist (a misspelt name)."""
        try:
            super().check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginLoadError(str(exc)) from exc

    # ------------------------------------------------------------------ introspection

    def impls(self, hook: str) -> tuple[Impl, ...]:
        """Implementations of ``hook`` in call order (cached until the plugin set changes)."""
        cached = self._impls.get(hook)
        if cached is None:
            caller = getattr(self.hook, hook)
            cached = tuple(
                Impl(self.get_name(impl.plugin) or impl.plugin_name, impl.function, tuple(impl.argnames))
                for impl in reversed(caller.get_hookimpls())
            )
            self._impls[hook] = cached
        return cached

    def configured(self, dormant: Iterable[str] | dict[str, frozenset[str]]) -> HookCaller:
        """The hooks to call under a configuration whose ``dormant`` plugins have nothing to do.

        ``dormant`` names the plugins, or maps each to the session hooks it still needs.
        """
        if not isinstance(dormant, dict):
            dormant = dict.fromkeys(dormant, frozenset())
        return ConfiguredHooks(self, dormant) if dormant else self

    def plugin_info(self) -> list[PluginInfo]:
        infos = []
        distinfo = {id(plugin): dist for plugin, dist in self.list_plugin_distinfo()}
        for name, plugin in self.list_name_plugin():
            if plugin is None:
                continue
            dist = distinfo.get(id(plugin))
            version = dist.version if dist else str(getattr(plugin, "__version__", "-"))
            hooks = tuple(sorted(c.name for c in self.get_hookcallers(plugin) or ()))
            unavailable = getattr(plugin, "unavailable", None)  # e.g. an optional library is missing
            infos.append(PluginInfo(name, version, self._source(name), hooks, unavailable))
        return infos

    def _source(self, name: str) -> str:
        if name in self._origins:
            return self._origins[name]
        plugin = self.get_plugin(name)
        if isinstance(plugin, ModuleType):
            return getattr(plugin, "__file__", None) or plugin.__name__
        return type(plugin).__module__


_PLAIN: set[type] = {bool, int, str, bytes, tuple, list, dict}
"""Types whose instances are never awaitable, as :func:`isawaitable` found: asked once per type."""
MAX_PLAIN = 256


def isawaitable(result: object) -> bool:
    """``inspect.isawaitable(result)``, remembering the types it said no to (not generators:
    whether one is awaitable depends on its code, not its type).

    Hooks may return an awaitable from a sync implementation, so every answer is asked; the
    ABC check costs a few calls, the set lookup none.  (A type registered as ``Awaitable``
    after one of its instances was answered here stays plain.)
    """
    if inspect.isawaitable(result):
        return True
    cls = type(result)
    if cls is not GeneratorType and len(_PLAIN) < MAX_PLAIN:
        _PLAIN.add(cls)
    return False


async def _call(impl: Impl, hook: str, kwargs: dict[str, Any], timeout: float | None) -> Any:
    result = _invoke(impl, hook, kwargs)
    if result is not None and type(result) not in _PLAIN and isawaitable(result):
        result = await _settle(impl, hook, result, timeout)
    return result


def _invoke(impl: Impl, hook: str, kwargs: dict[str, Any]) -> Any:
    try:
        if impl.one is not None:
            return impl.function(kwargs[impl.one])
        return impl.function(*impl.args(kwargs))
    except Exception as exc:  # never BaseException: cancellation must pass through
        raise PluginError(impl.plugin, hook, f"{type(exc).__name__}: {exc}") from exc


def _picker(names: tuple[str, ...]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    if len(names) > 1:
        return operator.itemgetter(*names)  # type: ignore[return-value]
    if names:
        name = names[0]
        return lambda kwargs: (kwargs[name],)
    return lambda kwargs: ()


async def _settle(impl: Impl, hook: str, pending: Awaitable[Any], timeout: float | None) -> Any:
    """Await an implementation's awaitable answer within ``timeout``."""
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            return await pending
    except Exception as exc:
        if deadline.expired():
            raise PluginError(impl.plugin, hook, f"no answer within {timeout:g}s") from exc
        raise PluginError(impl.plugin, hook, f"{type(exc).__name__}: {exc}") from exc
