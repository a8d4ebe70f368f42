"""socksflow: a SOCKS5 proxy framework — an asyncio engine that calls pluggy hooks at every phase.

The public API for plugin authors is what this module exports.
"""

from socksflow.config import Config, Node
from socksflow.decisions import ANONYMOUS, Identity, Verdict
from socksflow.dial import interleave
from socksflow.errors import ConfigError, PluginError, ResolveError
from socksflow.explain import ExplainQuery
from socksflow.interfaces import Server, Session
from socksflow.plugins import hookimpl
from socksflow.protocol import (
    Address,
    AddressType,
    Command,
    InvalidAddress,
    IPAddress,
    Method,
    Reply,
    Request,
    parse_host,
)
from socksflow.relay import Direction, Limiter
from socksflow.resolution import Resolver, resolve_error
from socksflow.stash import Stash, StashKey

__version__ = "0.1.0"

__all__ = [
    "ANONYMOUS",
    "Address",
    "AddressType",
    "Command",
    "Config",
    "ConfigError",
    "Direction",
    "ExplainQuery",
    "IPAddress",
    "Identity",
    "InvalidAddress",
    "Limiter",
    "Method",
    "Node",
    "PluginError",
    "Reply",
    "Request",
    "ResolveError",
    "Resolver",
    "Server",
    "Session",
    "Stash",
    "StashKey",
    "Verdict",
    "__version__",
    "hookimpl",
    "interleave",
    "parse_host",
    "resolve_error",
]
