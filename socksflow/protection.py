"""A security layer under the client's connection, set up by an authentication method.

Some methods end their sub-negotiation with per-message protection: GSSAPI (RFC 1961 §5)
wraps every byte that follows — the request, the reply and the relayed data, both ways — in
integrity-checked or encrypted frames.  A ``socksflow_subnegotiate`` implementation asks for
that by returning :class:`Protected`: the identity, and a :class:`Protection` that turns
plaintext into frames and frames back into plaintext.

The core puts the layer *under* the client connection's protocol, so the code above it reads
and writes plaintext unchanged: :func:`protect` hands back a transport whose ``write`` wraps,
and whose ``set_protocol`` installs a protocol that unwraps before passing bytes on.  The
handshake and the relay both run on it; bytes are counted in plaintext.

A protected tunnel cannot use the zero-copy relay: every chunk is unwrapped and wrapped in
Python (and in the security library).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from socksflow.decisions import Identity
from socksflow.protocol import ProtocolError

log = logging.getLogger("socksflow.protection")


class Protection(Protocol):
    """Per-message protection of one client connection (one object per session: it keeps state)."""

    def wrap(self, data: bytes) -> bytes:
        """``data`` (any length, never empty) as the bytes to send: one frame or several."""

    def unwrap(self, data: bytes) -> bytes:
        """Take bytes as received; return the plaintext of every frame they complete.

        Returns ``b""`` while a frame is incomplete (the bytes are kept for the next call).
        Raises :class:`~socksflow.protocol.ProtocolError` for a frame that fails its check:
        the connection is then closed, and the session's close reason says why.
        """


@dataclass(frozen=True, slots=True)
class Protected:
    """What a sub-negotiation returns to authenticate the client *and* protect the session."""

    identity: Identity
    protection: Protection


class _Unwrapping(asyncio.Protocol):
    """Stands between the real transport and its protocol: passes on plaintext only."""

    __slots__ = ("error", "inner", "protection", "transport")

    def __init__(
        self, inner: asyncio.BaseProtocol, protection: Protection, transport: asyncio.Transport
    ) -> None:
        self.inner = inner
        self.protection = protection
        self.transport = transport
        self.error: ProtocolError | None = None

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            plain = self.protection.unwrap(data)
        except ProtocolError as exc:
            self.error = exc
            self.transport.close()  # connection_lost follows, carrying the error
            return
        if plain:
            self.inner.data_received(plain)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc or self.error)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class ProtectedTransport:
    """A client transport seen through its security layer: writes are wrapped, reads unwrapped.

    Everything else (flow control, closing, ``get_extra_info``) is the real transport's.
    """

    __slots__ = ("_protocol", "protection", "transport")

    def __init__(self, transport: asyncio.Transport, protection: Protection) -> None:
        self.transport = transport
        self.protection = protection
        self._protocol = _Unwrapping(transport.get_protocol(), protection, transport)
        transport.set_protocol(self._protocol)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self.transport.is_closing():
            return
        try:
            wrapped = self.protection.wrap(bytes(data))
        except Exception as exc:  # an expired context, say: this connection cannot go on
            log.warning("cannot protect data for %s: %s", self.transport.get_extra_info("peername"), exc)
            self.transport.abort()
            return
        self.transport.write(wrapped)

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol.inner = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol.inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def protect(transport: asyncio.Transport, protection: Protection, received: bytes = b"") -> asyncio.Transport:
    """Put ``protection`` under ``transport`` and its current protocol; use the result instead.

    ``received``: bytes that arrived after the sub-negotiation and before this call (already
    framed): they are unwrapped and passed on first.
    """
    protected = ProtectedTransport(transport, protection)
    if received:
        protected._protocol.data_received(received)
    return protected  # type: ignore[return-value]
