"""socksflow: a SOCKS5 proxy framework — an asyncio engine that calls pluggy hooks at every phase.

The public API for plugin authors is what this module exports.
"""

from socksflow import app, clients, detect
from socksflow.config import Config, Node
from socksflow.decisions import ANONYMOUS, Identity, Verdict
from socksflow.dial import interleave, reply_for_error
from socksflow.errors import ConfigError, ConfigErrors, PluginError, ResolveError
from socksflow.explain import ExplainQuery
from socksflow.httpproxy import status_for as http_status_for
from socksflow.interfaces import Server, Session
from socksflow.logs import timestamp
from socksflow.outbound import (
    OUTBOUNDS,
    ROUTE,
    UNSPECIFIED,
    BuildContext,
    Connector,
    Direct,
    Outbound,
    OutboundError,
    Receiver,
    Registry,
    Reject,
    Stream,
    carries,
    direct_connect,
)
from socksflow.outbound import kinds as outbound_kinds
from socksflow.outbound import register_kind as register_outbound_kind
from socksflow.plugins import hookimpl
from socksflow.protection import Protected, Protection
from socksflow.protocol import (
    Address,
    AddressType,
    Command,
    InvalidAddress,
    IPAddress,
    Method,
    ProtocolError,
    Reply,
    Request,
    build_udp_header,
    parse_host,
    parse_ip,
    parse_network,
    parse_udp_header,
)
from socksflow.relay import Direction, Limiter
from socksflow.resolution import Resolver, resolve_error
from socksflow.sharedstate import SharedTable
from socksflow.socks4 import reply_code as socks4_reply_code
from socksflow.stash import Stash, StashKey

__version__ = "0.1.0"

__all__ = [
    "ANONYMOUS",
    "OUTBOUNDS",
    "ROUTE",
    "UNSPECIFIED",
    "Address",
    "AddressType",
    "BuildContext",
    "Command",
    "Config",
    "ConfigError",
    "ConfigErrors",
    "Connector",
    "Direct",
    "Direction",
    "ExplainQuery",
    "IPAddress",
    "Identity",
    "InvalidAddress",
    "Limiter",
    "Method",
    "Node",
    "Outbound",
    "OutboundError",
    "PluginError",
    "Protected",
    "Protection",
    "ProtocolError",
    "Receiver",
    "Registry",
    "Reject",
    "Reply",
    "Request",
    "ResolveError",
    "Resolver",
    "Server",
    "Session",
    "SharedTable",
    "Stash",
    "StashKey",
    "Stream",
    "Verdict",
    "__version__",
    "app",
    "build_udp_header",
    "carries",
    "clients",
    "detect",
    "direct_connect",
    "hookimpl",
    "http_status_for",
    "interleave",
    "outbound_kinds",
    "parse_host",
    "parse_ip",
    "parse_network",
    "parse_udp_header",
    "register_outbound_kind",
    "reply_for_error",
    "resolve_error",
    "socks4_reply_code",
    "timestamp",
]
