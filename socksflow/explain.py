"""``socksflow check`` and ``socksflow explain``: asking plugins about requests no client made."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from socksflow.config import Config
from socksflow.errors import ConfigError
from socksflow.plugins import PluginManager
from socksflow.protocol import Address, Command, IPAddress

Resolver = Callable[[str, int], Awaitable[tuple[IPAddress, ...]]]


@dataclass(frozen=True, slots=True)
class ExplainQuery:
    """A hypothetical request: who asks (``client``, ``user``, through which ``protocol``) for what
    (``command``, ``destination``)."""

    client: Address
    destination: Address
    command: Command = Command.CONNECT
    user: str | None = None
    protocol: str = "socks5"  # the front door: socks5, socks4, http


def _resolver(config: Config, pm: PluginManager) -> Resolver:
    from socksflow.server import Server  # the server's resolution path, without listening

    server = Server(config, pm)

    async def resolve(host: str, port: int) -> tuple[IPAddress, ...]:
        return await server.resolve(None, host, port)

    return resolve


def run_checks(config: Config, pm: PluginManager) -> list[ConfigError]:
    """Every failure the plugins' ``socksflow_check`` hooks report."""

    async def main() -> list[ConfigError]:
        results = await pm.call_all("socksflow_check", None, config=config, resolve=_resolver(config, pm))
        return [error for result in results for error in result]

    return asyncio.run(main())


def explain(config: Config, pm: PluginManager, query: ExplainQuery) -> list[str]:
    """The explanation lines of every plugin that takes part in deciding ``query``."""

    async def main() -> list[str]:
        results = await pm.call_all(
            "socksflow_explain", None, config=config, query=query, resolve=_resolver(config, pm)
        )
        return [line for result in results for line in result]

    return asyncio.run(main())
