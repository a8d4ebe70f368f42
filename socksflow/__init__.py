"""socksflow: a SOCKS5 proxy framework — an asyncio engine that calls pluggy hooks at every phase.

The public API for plugin authors is what this module exports.
"""

from socksflow.config import Config, Node
from socksflow.decisions import ANONYMOUS, Identity, Verdict
from socksflow.errors import ConfigError, PluginError, ResolveError
from socksflow.plugins import hookimpl
from socksflow.protection import Protected, Protection
from socksflow.protocol import Address, AddressType, Command, Method, Reply, Request
from socksflow.relay import Direction, Limiter
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
    "Identity",
    "Limiter",
    "Method",
    "Node",
    "PluginError",
    "Protected",
    "Protection",
    "Reply",
    "Request",
    "ResolveError",
    "Stash",
    "StashKey",
    "Verdict",
    "__version__",
    "hookimpl",
]
