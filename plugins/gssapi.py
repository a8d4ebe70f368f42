"""GSSAPI authentication (RFC 1961): the ``gssapi`` section — Kerberos tickets instead of passwords.

```yaml
auth:
  methods: [gssapi, userpass]        # the auth plugin offers 0x01 in this order of preference
gssapi:
  keytab: /etc/socksflow/proxy.keytab   # default: $KRB5_KTNAME, else the system's keytab
  service: rcmd                      # a service name (any host of it in the keytab), or a
                                     #   principal: rcmd/proxy.example.com[@REALM]
  protection: [integrity, confidentiality]   # levels granted; add none for clients that ask none
  nec: false                         # also accept NEC's variant (the level octet not wrapped)
  strip_realm: true                  # alice@REALM is user alice (only in the service's own realm)
  max_token_size: 48000              # larger context tokens are refused (the protocol allows 65535)
```

The exchange, on the ``socksflow_subnegotiate`` channel: context tokens framed ``01 01 LEN
TOKEN`` both ways (at most :data:`MAX_ROUNDS` from the client), then the protection level
(``01 02 LEN`` and the level octet, wrapped without confidentiality), then — for integrity or
confidentiality — every byte of the session in ``01 03 LEN TOKEN`` frames.  Whatever goes
wrong, the client gets the abort message ``01 FF`` and the connection closes.

Levels: 1 integrity, 2 confidentiality (RFC 1961 §4.3); 3 (per-message choice) is answered
with the best level at or below it that ``protection`` lists; 0 ("none", not in the RFC, and
what curl before 8.11 asks for) only when listed.  A client asking for less than every listed
level is refused.  UDP ASSOCIATE is refused (0x07) on a protected session: its datagrams
would need RFC 1961 §5 encapsulation, which this plugin does not do.

Without a ``gssapi`` section this plugin is dormant; without the ``gssapi`` library
(``pip install 'socksflow[gssapi]'``) it is dormant too, says why in ``socksflow plugins``, and
a ``gssapi`` section is a configuration error.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
from dataclasses import dataclass
from typing import Any

from socksflow import (
    Command,
    Config,
    Identity,
    Node,
    Protected,
    ProtocolError,
    Reply,
    Request,
    Session,
    StashKey,
    Verdict,
    hookimpl,
)

try:
    import gssapi
    from gssapi.exceptions import GSSError
except ImportError as exc:  # an optional dependency
    gssapi = None
    unavailable: str | None = (
        f"the gssapi library cannot be imported ({exc}): pip install 'socksflow[gssapi]'"
    )
else:
    unavailable = None

log = logging.getLogger("socksflow.gssapi")

VERSION = 0x01
MTYP_AUTH, MTYP_PROTECTION, MTYP_DATA, MTYP_ABORT = 0x01, 0x02, 0x03, 0xFF
ABORT = bytes((VERSION, MTYP_ABORT))
LEVELS = {"none": 0, "integrity": 1, "confidentiality": 2}
SELECTIVE = 3  # RFC 1961 §4.3: protection chosen per message
MAX_ROUNDS = 8  # Kerberos needs one token from the client, SPNEGO a few
MAX_TOKEN_SIZE = 48000  # Windows' default MaxTokenSize: tickets with big PACs stay under it
MAX_FRAME = 0xFFFF
_SERVICE = re.compile(r"[A-Za-z0-9._-]+")
_PRINCIPAL = re.compile(r"[A-Za-z0-9._-]+/[A-Za-z0-9._-]+(@[A-Za-z0-9._-]+)?")


@dataclass(frozen=True)
class GssSettings:
    credentials: Any  # gssapi.Credentials to accept with
    levels: frozenset[int]
    nec: bool
    strip_realm: bool
    max_token_size: int


SETTINGS = StashKey[GssSettings]("gssapi")
PROTECTED = StashKey[int]("gssapi.level")  # per session: the level agreed


class Refused(Exception):
    """The sub-negotiation ends: answer ``01 FF`` and close.  The message is for the log."""


@hookimpl
def socksflow_configure(config: Config) -> bool | None:
    node = config.section("gssapi")
    if node is None:
        return False
    if gssapi is None:
        raise node.error(str(unavailable))
    items = (
        node.as_map({"keytab", "service", "protection", "nec", "strip_realm", "max_token_size"})
        if node.value
        else {}
    )
    levels = frozenset((1, 2))
    if "protection" in items:
        levels = frozenset(LEVELS[n.as_choice(tuple(LEVELS))] for n in items["protection"].as_list())
        if not levels:
            raise items["protection"].error("list at least one level: none, integrity, confidentiality")
    max_token = (
        items["max_token_size"].as_int(1024, MAX_FRAME) if "max_token_size" in items else MAX_TOKEN_SIZE
    )
    if not _offered(config):
        config.warnings.append(node.error("no client can use it: auth.methods does not list gssapi"))
    config.stash[SETTINGS] = GssSettings(
        credentials=_credentials(node, items.get("keytab"), items.get("service")),
        levels=levels,
        nec=items["nec"].as_bool() if "nec" in items else False,
        strip_realm=items["strip_realm"].as_bool() if "strip_realm" in items else True,
        max_token_size=max_token,
    )
    return None


def _offered(config: Config) -> bool:
    """Whether the auth section (the auth plugin's) offers GSSAPI: read, not claimed."""
    auth = config.root.get("auth")
    methods = auth.get("methods") if auth is not None and auth.is_map else None
    if methods is None:
        return False
    return any(item.value == "gssapi" for item in methods.as_list())


def _credentials(section: Node, keytab: Node | None, service: Node | None) -> Any:
    """The acceptor's credentials: checked now, so a missing key is a configuration error."""
    text = service.as_str() if service is not None else "rcmd"
    if _PRINCIPAL.fullmatch(text):
        name = gssapi.Name(text, gssapi.NameType.kerberos_principal)
    elif _SERVICE.fullmatch(text):
        name = gssapi.Name(f"{text}@", gssapi.NameType.hostbased_service)  # any host of the service
    else:
        raise (service or section).error(
            f"{text!r} is neither a service name (rcmd) nor a principal (rcmd/host)"
        )
    store = None
    if keytab is not None:
        path = keytab.as_path()
        if not path.is_file():
            raise keytab.error(f"no keytab file at {str(path)!r}")
        store = {"keytab": str(path)}
    try:
        return gssapi.Credentials(name=name, usage="accept", store=store)
    except GSSError as exc:
        where = service or keytab or section
        raise where.error(f"no key for {text!r} in the keytab: {_describe(exc)}") from None


@hookimpl
async def socksflow_subnegotiate(
    session: Session, method: int, channel
) -> Identity | Protected | Verdict | None:
    settings = session.config.stash.get(SETTINGS)
    if settings is None or method != 0x01:
        return None
    try:
        context = await _establish(channel, settings)
        level = await _agree_level(channel, context, settings)
    except Refused as exc:
        channel.write(ABORT)
        return Verdict.deny(f"GSSAPI: {exc}")
    except asyncio.IncompleteReadError:
        return Verdict.deny("GSSAPI: the client closed the connection")
    identity = Identity(_user(context, settings.strip_realm))
    session.stash[PROTECTED] = level
    if level == 0:
        return identity
    return Protected(identity, GssProtection(context, encrypt=level == 2))


async def _establish(channel, settings: GssSettings) -> Any:
    context = gssapi.SecurityContext(creds=settings.credentials, usage="accept")
    for _ in range(MAX_ROUNDS):
        token = await _read_message(channel, MTYP_AUTH, settings.max_token_size)
        try:  # reads the keytab and writes the replay cache: off the event loop
            reply, complete = await asyncio.to_thread(_step, context, token)
        except GSSError as exc:
            raise Refused(f"context not accepted: {_describe(exc)}") from None
        if reply:
            channel.write(_frame(MTYP_AUTH, reply))
        if complete:
            return context
    raise Refused(f"no context after {MAX_ROUNDS} tokens")


def _step(context: Any, token: bytes) -> tuple[bytes | None, bool]:
    reply = context.step(token)
    # On failure, step() returns the mechanism's error token and raises on the next access
    # (here): RFC 1961 answers a failure with 01 FF, never with that token.
    return reply, context.complete


async def _agree_level(channel, context: Any, settings: GssSettings) -> int:
    token = await _read_message(channel, MTYP_PROTECTION, settings.max_token_size)
    nec = len(token) == 1  # a wrapped octet is never one byte long
    if nec and not settings.nec:
        raise Refused("the protection level came unwrapped (NEC's variant; set gssapi.nec to accept it)")
    try:
        octet = token if nec else context.unwrap(token).message
    except GSSError as exc:
        raise Refused(f"protection level message: {_describe(exc)}") from None
    if len(octet) != 1:
        raise Refused(f"protection level message of {len(octet)} bytes, not 1")
    asked = octet[0]
    available = {level for level in settings.levels if level <= min(asked, 2)}
    if asked in (1, 2, SELECTIVE) and gssapi.RequirementFlag.confidentiality not in context.actual_flags:
        available.discard(2)
    if asked > SELECTIVE or not available:
        raise Refused(f"protection level {asked} asked; this server grants {sorted(settings.levels)}")
    level = max(available)
    answer = bytes((level,)) if nec else context.wrap(bytes((level,)), False).message
    channel.write(_frame(MTYP_PROTECTION, answer))
    return level


async def _read_message(channel, mtyp: int, max_size: int) -> bytes:
    header = await channel.readexactly(2)
    if header == ABORT:
        raise Refused("the client aborted")
    if header != bytes((VERSION, mtyp)):
        raise Refused(f"expected message 01 {mtyp:02x}, got {header.hex(' ')}")
    (length,) = struct.unpack("!H", await channel.readexactly(2))
    if length > max_size:
        raise Refused(f"a token of {length} bytes (gssapi.max_token_size is {max_size})")
    return await channel.readexactly(length)


def _frame(mtyp: int, token: bytes) -> bytes:
    return struct.pack("!BBH", VERSION, mtyp, len(token)) + token


def _user(context: Any, strip_realm: bool) -> str:
    principal = str(context.initiator_name)
    user, at, realm = principal.rpartition("@")
    if not at:
        return principal
    own_realm = str(context.target_name).rpartition("@")[2]
    return user if strip_realm and realm == own_realm else principal


def _describe(error: Exception) -> str:
    """The library's messages without status numbers and the "see the minor code" preamble."""
    text = re.sub(r"(Major|Minor) \(\d+\): ", "", str(error))
    text = re.sub(r"Unspecified GSS failure\.\s+Minor code may provide more information,?\s*", "", text)
    return re.sub(r"\s+", " ", text).strip(" ,") or type(error).__name__


class GssProtection:
    """RFC 1961 §5: every byte in ``01 03 LEN TOKEN`` frames made by gss_wrap, read by gss_unwrap."""

    __slots__ = ("_buffer", "_context", "_encrypt", "_limit")

    def __init__(self, context: Any, *, encrypt: bool) -> None:
        self._context = context
        self._encrypt = encrypt
        self._buffer = bytearray()
        self._limit = context.get_wrap_size_limit(MAX_FRAME, encrypt)  # plaintext per frame

    def wrap(self, data: bytes) -> bytes:
        wrap, encrypt, limit = self._context.wrap, self._encrypt, self._limit
        frames = []
        for start in range(0, len(data), limit):
            token = wrap(data[start : start + limit], encrypt).message
            frames.append(struct.pack("!BBH", VERSION, MTYP_DATA, len(token)))
            frames.append(token)
        return b"".join(frames)

    def unwrap(self, data: bytes) -> bytes:
        buffer = self._buffer
        buffer += data
        plain = []
        start, end = 0, len(buffer)
        while end - start >= 4:
            version, mtyp, length = struct.unpack_from("!BBH", buffer, start)
            if version != VERSION or mtyp != MTYP_DATA:
                raise ProtocolError(f"GSSAPI: expected a data frame 01 03, got {version:02x} {mtyp:02x}")
            if end - start - 4 < length:
                break
            token = bytes(buffer[start + 4 : start + 4 + length])
            try:
                result = self._context.unwrap(token)
            except GSSError as exc:
                raise ProtocolError(f"GSSAPI: a frame failed gss_unwrap: {_describe(exc)}") from None
            if self._encrypt and not result.encrypted:
                raise ProtocolError("GSSAPI: an unencrypted frame under confidentiality")
            plain.append(result.message)
            start += 4 + length
        del buffer[:start]
        return b"".join(plain)


@hookimpl(tryfirst=True)
def socksflow_request(session: Session, request: Request) -> Verdict | None:
    level = session.stash.get(PROTECTED)
    if level and request.command == Command.UDP_ASSOCIATE:
        return Verdict.deny(
            "UDP ASSOCIATE under GSSAPI protection is not supported", reply=Reply.COMMAND_NOT_SUPPORTED
        )
    return None
