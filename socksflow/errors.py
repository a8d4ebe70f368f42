"""Exceptions shared by the core and plugins."""

from __future__ import annotations

from socksflow.protocol import ProtocolError, Reply

__all__ = ["ConfigError", "PluginError", "ProtocolError", "ResolveError", "SocksflowError"]


class SocksflowError(Exception):
    """Base of socksflow's own errors (protocol errors excepted: they belong to the wire)."""


class ConfigError(SocksflowError):
    """A configuration mistake, located: renders as ``file:line: key.path: message``."""

    def __init__(self, message: str, file: str = "", line: int = 0, key: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.key = key

    def __str__(self) -> str:
        where = ":".join(part for part in (self.file, str(self.line) if self.line else "") if part)
        parts = [p for p in (where, self.key, self.message) if p]
        return ": ".join(parts)


class ConfigErrors(SocksflowError):
    """Every error found in one configuration, sorted by line."""

    def __init__(self, errors: list[ConfigError]) -> None:
        unique: dict[tuple[str, int, str], ConfigError] = {}
        for error in errors:  # a value that failed to parse is not reported again by validators
            unique.setdefault((error.file, error.line, error.key), error)
        self.errors = sorted(unique.values(), key=lambda e: (e.file, e.line))
        super().__init__("\n".join(str(e) for e in self.errors))


class PluginError(SocksflowError):
    """A plugin's hook implementation raised or timed out; the cause is chained."""

    def __init__(self, plugin: str, hook: str, message: str = "") -> None:
        self.plugin = plugin
        self.hook = hook
        super().__init__(f"plugin {plugin!r} failed in {hook}" + (f": {message}" if message else ""))


class ResolveError(SocksflowError):
    """A name could not be resolved (NXDOMAIN, SERVFAIL, timeout): the client gets ``reply``."""

    def __init__(self, message: str, reply: Reply = Reply.HOST_UNREACHABLE) -> None:
        super().__init__(message)
        self.reply = reply
