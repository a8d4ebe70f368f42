"""The core's typed way to call plugins: one method per hook of :mod:`socksflow.hookspecs`.

The core never names a hook by string: it calls ``hooks.request(session, request)`` and gets
a typed answer.  Under the methods a :class:`~socksflow.plugins.HookCaller` walks the
implementations (awaiting, timeouts, fault wrapping); a test checks that every hook spec
has its method here with the same parameters.

``SOCKSFLOW_TRACE_PLUGINS=1`` logs every implementation called (logger
``socksflow.trace``, DEBUG): the plugin, the hook, the time it took and its result.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from socksflow.plugins import HookCaller, Impl

if TYPE_CHECKING:
    import socket

    from socksflow.config import Config
    from socksflow.decisions import Identity, Verdict
    from socksflow.errors import ConfigError
    from socksflow.explain import ExplainQuery, Resolver
    from socksflow.protection import Protected
    from socksflow.protocol import Address, IPAddress, Request
    from socksflow.relay import Direction, Limiter
    from socksflow.server import Server
    from socksflow.session import AuthChannel, Session

ENV_TRACE = "SOCKSFLOW_TRACE_PLUGINS"
trace_log = logging.getLogger("socksflow.trace")
T = TypeVar("T")

Answer = tuple[T | None, str]
"""A first-result hook's answer (``None``: nobody had one) and the plugin that gave it."""


class Hooks:
    """Every hook the core calls, typed, for one configuration (its plugins, its hook timeout).

    The methods of the hooks that may be async return the caller's awaitable as it is (no
    coroutine of their own: they run several times per session).  Those called for every
    session (``client_connected``, ``select_method``, ``request``, ``open_connection``) return
    the answer itself while the plugins answer synchronously, as ``udp_datagram`` does per
    datagram: the ``(answer, plugin)`` tuple at once, else an awaitable of it.
    """

    __slots__ = ("caller", "timeout")

    def __init__(self, caller: HookCaller, timeout: float | None, *, trace: bool | None = None) -> None:
        if trace is None:
            trace = bool(os.environ.get(ENV_TRACE))
        self.caller: HookCaller = TracingCaller(caller) if trace else caller
        self.timeout = timeout

    def implementations(self, hook: str) -> tuple[Impl, ...]:
        """The implementations of ``hook`` (``socksflow_`` prefix optional), in call order."""
        return self.caller.impls(hook if hook.startswith("socksflow_") else f"socksflow_{hook}")

    # ------------------------------------------------------------------ lifecycle

    def configure(
        self, config: Config
    ) -> tuple[dict[str, bool | frozenset[str] | None], dict[str, Exception]]:
        """Each plugin's answer to ``socksflow_configure`` (``False``: dormant), and each one's error.

        Called by plugin, not as a chain: every plugin validates its sections even when another
        one's are wrong, so one run reports every mistake.
        """
        answers: dict[str, bool | frozenset[str] | None] = {}
        errors: dict[str, Exception] = {}
        for impl in self.caller.impls("socksflow_configure"):
            try:
                answers[impl.plugin] = impl.function(*[{"config": config}[arg] for arg in impl.argnames])
            except Exception as exc:
                errors[impl.plugin] = exc
        return answers, errors

    def exposure(self, config: Config) -> list[str]:
        return self.caller.call_all_sync("socksflow_exposure", config=config)

    def startup(self, server: Server) -> Awaitable[None]:
        return self.caller.call_all("socksflow_startup", None, server=server)  # type: ignore[return-value]

    def shutdown(self, server: Server) -> Awaitable[None]:
        return self.caller.notify("socksflow_shutdown", self.timeout, server=server)

    async def check(self, config: Config, resolve: Resolver) -> list[ConfigError]:
        results = await self.caller.call_all("socksflow_check", None, config=config, resolve=resolve)
        return [error for result in results for error in result]

    async def explain(self, config: Config, query: ExplainQuery, resolve: Resolver) -> list[str]:
        results = await self.caller.call_all(
            "socksflow_explain", None, config=config, query=query, resolve=resolve
        )
        return [line for result in results for line in result]

    # ------------------------------------------------------------------ handshake

    def client_connected(self, session: Session) -> Answer[Verdict] | Awaitable[Answer[Verdict]]:
        return self.caller.call_first_nowait("socksflow_client_connected", self.timeout, session=session)

    def select_method(
        self, session: Session, offered: tuple[int, ...]
    ) -> Answer[int] | Awaitable[Answer[int]]:
        return self.caller.call_first_nowait(
            "socksflow_select_method", self.timeout, session=session, offered=offered
        )

    def authenticate(
        self, session: Session, username: bytes, password: bytes
    ) -> Awaitable[Answer[Identity | Verdict]]:
        return self.caller.call_first(
            "socksflow_authenticate", self.timeout, session=session, username=username, password=password
        )

    def subnegotiate(
        self, session: Session, method: int, channel: AuthChannel, *, timeout: float | None
    ) -> Awaitable[Answer[Identity | Protected | Verdict]]:
        """A multi-round exchange: bounded by ``timeout`` (``None``: the caller's deadline), not the hook timeout."""
        return self.caller.call_first(
            "socksflow_subnegotiate", timeout, session=session, method=method, channel=channel
        )

    def auth_result(
        self, session: Session, method: int, user: str | None, accepted: bool
    ) -> Awaitable[list[tuple[Verdict, str]]]:
        """Every plugin's answer to a login's outcome, each with the plugin that gave it."""
        kwargs = {"session": session, "method": method, "user": user, "accepted": accepted}
        return self.caller.call_all_named("socksflow_auth_result", self.timeout, **kwargs)

    # ------------------------------------------------------------------ decisions

    def request(
        self, session: Session, request: Request, *, after: str | None = None
    ) -> Answer[Verdict] | Awaitable[Answer[Verdict]]:
        """The first answer; with ``after``, only from the plugins after that one (a rewrite's judges)."""
        if after is None:
            return self.caller.call_first_nowait(
                "socksflow_request", self.timeout, session=session, request=request
            )
        return self.caller.call_first_after(
            "socksflow_request", self.timeout, after, session=session, request=request
        )

    def udp_datagram(
        self, session: Session, destination: Address, payload: bytes, *, after: str | None = None
    ) -> Answer[Verdict] | Awaitable[Answer[Verdict]]:
        """As :meth:`request`, per datagram: the answer at once while the plugins answer synchronously."""
        if after is None:
            return self.caller.call_first_nowait(
                "socksflow_udp_datagram",
                self.timeout,
                session=session,
                destination=destination,
                payload=payload,
            )
        return self.caller.call_first_after(
            "socksflow_udp_datagram",
            self.timeout,
            after,
            session=session,
            destination=destination,
            payload=payload,
        )

    def bind(self, session: Session) -> Awaitable[Answer[Address | Verdict]]:
        return self.caller.call_first("socksflow_bind", self.timeout, session=session)

    def bind_peer(self, session: Session, peer: Address) -> Awaitable[Answer[Verdict]]:
        return self.caller.call_first("socksflow_bind_peer", self.timeout, session=session, peer=peer)

    def resolve(
        self, session: Session | None, host: str, port: int, config: Config
    ) -> Awaitable[Answer[list[IPAddress]]]:
        return self.caller.call_first(
            "socksflow_resolve", self.timeout, session=session, host=host, port=port, config=config
        )

    def open_connection(
        self, session: Session, addresses: tuple[Address, ...], *, timeout: float | None
    ) -> (
        Answer[socket.socket | tuple[socket.socket, Address]]
        | Awaitable[Answer[socket.socket | tuple[socket.socket, Address]]]
    ):
        """Bounded by ``timeout`` (the connect timeout); an upstream's stream comes with its BND."""
        return self.caller.call_first_nowait(
            "socksflow_open_connection", timeout, session=session, addresses=addresses
        )

    # ------------------------------------------------------------------ relay and end

    def relay_start(self, session: Session) -> list[Limiter]:
        return self.caller.call_all_sync("socksflow_relay_start", session=session)

    def relay_data(self, session: Session, direction: Direction, data: bytes) -> bytes:
        """The chunk after every implementation, each given the previous one's output."""
        return self.caller.call_chain_sync(
            "socksflow_relay_data", "data", data, session=session, direction=direction
        )

    def session_end(self, session: Session) -> Awaitable[None] | None:
        """Notify the observers; an awaitable only if some are async (see ``HookCaller.notify_nowait``)."""
        return self.caller.notify_nowait("socksflow_session_end", self.timeout, session=session)

    def session_error(self, session: Session, error: Exception) -> Awaitable[None]:
        return self.caller.notify("socksflow_session_error", self.timeout, session=session, error=error)


class TracingCaller(HookCaller):
    """A caller whose implementations log their plugin, hook, time and result (``SOCKSFLOW_TRACE_PLUGINS``)."""

    def __init__(self, caller: HookCaller) -> None:
        self._caller = caller
        self._wrapped: dict[tuple[str, Impl], Impl] = {}

    def impls(self, hook: str) -> tuple[Impl, ...]:
        return tuple(self._wrap(hook, impl) for impl in self._caller.impls(hook))

    def _wrap(self, hook: str, impl: Impl) -> Impl:
        wrapped = self._wrapped.get((hook, impl))
        if wrapped is None:
            wrapped = self._wrapped[hook, impl] = Impl(impl.plugin, _traced(hook, impl), impl.argnames)
        return wrapped


def _traced(hook: str, impl: Impl) -> Callable[..., Any]:
    function = impl.function

    def report(began: float, outcome: str) -> None:
        trace_log.debug(
            "%s %s %.3f ms -> %s", impl.plugin, hook, (time.perf_counter() - began) * 1000, outcome
        )

    async def settle(began: float, pending: Awaitable[Any]) -> Any:
        try:
            result = await pending
        except BaseException as exc:
            report(began, f"raised {exc!r}")
            raise
        report(began, repr(result))
        return result

    @functools.wraps(function)
    def call(*args: Any) -> Any:
        began = time.perf_counter()
        try:
            result = function(*args)
        except BaseException as exc:
            report(began, f"raised {exc!r}")
            raise
        if inspect.isawaitable(result):
            return settle(began, result)
        report(began, repr(result))
        return result

    return call
