"""Name resolution for the core: the plugins' ``socksflow_resolve``, else the system resolver."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from socksflow.errors import PluginError, ResolveError
from socksflow.protocol import IPAddress, parse_host

if TYPE_CHECKING:
    from socksflow.config import Config
    from socksflow.hooks import Hooks
    from socksflow.session import Session

Resolver = Callable[[str, int], Awaitable[tuple[IPAddress, ...]]]
"""``await resolve(host, port)``: what ``socksflow_check`` and ``socksflow_explain`` get to resolve names."""


def resolve_error(error: BaseException) -> ResolveError | None:
    """The :class:`ResolveError` behind ``error``: itself, or what a resolver plugin raised.

    A resolver plugin's ``ResolveError`` is its documented "no such name" answer (NXDOMAIN,
    SERVFAIL), not a fault; ``None`` means ``error`` is a fault.
    """
    if isinstance(error, ResolveError):
        return error
    if isinstance(error, PluginError) and isinstance(error.__cause__, ResolveError):
        return error.__cause__
    return None


async def resolve(
    hooks: Hooks, config: Config, session: Session | None, host: str, port: int
) -> tuple[IPAddress, ...]:
    """Resolve through the plugins' hook, else the system resolver (off the event loop).

    Raises :class:`ResolveError` when the name does not resolve, :class:`PluginError` when a
    resolver plugin fails otherwise.
    """
    try:
        answer, _ = await hooks.resolve(session, host, port, config)
    except PluginError as exc:
        if (cause := resolve_error(exc)) is not None:
            raise cause from None
        raise
    if answer is not None:
        return tuple(answer)
    return await system_resolve(host, port, config.timeouts.hook)


async def system_resolve(host: str, port: int, timeout: float | None) -> tuple[IPAddress, ...]:
    """The system resolver's addresses for ``host``, without duplicates, in its order."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ResolveError(exc.strerror or str(exc)) from None
    except TimeoutError:
        raise ResolveError("the system resolver did not answer in time") from None
    seen: dict[IPAddress, None] = {}
    for info in infos:
        seen.setdefault(parse_host(info[4][0].partition("%")[0]), None)  # type: ignore[arg-type]
    return tuple(seen)


def resolver(hooks: Hooks, config: Config) -> Resolver:
    """Resolution outside any session, for ``socksflow check`` and ``socksflow explain``."""

    async def resolve_name(host: str, port: int) -> tuple[IPAddress, ...]:
        return await resolve(hooks, config, None, host, port)

    return resolve_name
