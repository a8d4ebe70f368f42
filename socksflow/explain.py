"""``socksflow check`` and ``socksflow explain``: asking plugins about requests no client made."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from socksflow.config import Config
from socksflow.errors import ConfigError
from socksflow.hooks import Hooks
from socksflow.plugins import PluginManager
from socksflow.protocol import Address, Command
from socksflow.resolution import Resolver, resolver

__all__ = ["ExplainQuery", "Resolver", "explain", "run_checks"]


@dataclass(frozen=True, slots=True)
class ExplainQuery:
    """A hypothetical request: who asks (``client``, ``user``, through which ``protocol``) for what
    (``command``, ``destination``)."""

    client: Address
    destination: Address
    command: Command = Command.CONNECT
    user: str | None = None
    protocol: str = "socks5"  # the front door: socks5, socks4, http


def run_checks(config: Config, pm: PluginManager) -> list[ConfigError]:
    """Every failure the plugins' ``socksflow_check`` hooks report."""

    async def main() -> list[ConfigError]:
        hooks = Hooks(pm, config.timeouts.hook)
        return await hooks.check(config, resolver(hooks, config))

    return asyncio.run(main())


def explain(config: Config, pm: PluginManager, query: ExplainQuery) -> list[str]:
    """The explanation lines of every plugin that takes part in deciding ``query``."""

    async def main() -> list[str]:
        hooks = Hooks(pm, config.timeouts.hook)
        return await hooks.explain(config, query, resolver(hooks, config))

    return asyncio.run(main())
