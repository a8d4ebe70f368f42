"""An RFC 1961 client on the ``gssapi`` library, over a blocking socket: for the tests and bench/gssapi_bulk.py.

It speaks each message as the RFC writes it, and lets a test send anything else instead:
:meth:`GssClient.level_message` and :func:`frame` build messages without sending them.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from kdc import SERVICE, Kdc

from socksflow import protocol
from socksflow.protocol import Address, Command, Method
from socksflow.testing import Socks5Client

try:
    import gssapi
except ImportError:  # the kdc fixture skips the tests that would use it (in CI: fails them)
    gssapi = None

PLAIN_READ = 1 << 20
DATA_CHUNK = 60000  # plaintext per wrapped frame (a frame's token may not exceed 65535 bytes)


def frame(mtyp: int, token: bytes) -> bytes:
    return struct.pack("!BBH", 1, mtyp, len(token)) + token


class GssClient:
    """A SOCKS5 client that authenticates with GSSAPI as RFC 1961 says, over a blocking socket."""

    def __init__(self, proxy: Any, kdc: Kdc, user: str = "alice", service: str = SERVICE) -> None:
        """``proxy``: a running server (with ``.address``) or an Address."""
        self.socks = Socks5Client(getattr(proxy, "address", proxy))
        self.sock = self.socks.sock
        self.kdc = kdc
        self.user = user
        self.service = service
        self.context: Any = None
        self.encrypt: bool | None = None  # None: no per-message protection
        self._plain = b""

    def close(self) -> None:
        self.socks.close()

    def __enter__(self) -> GssClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def new_context(self) -> Any:
        credentials = gssapi.Credentials(
            usage="initiate", store={"ccache": f"FILE:{self.kdc.ccache(self.user)}"}
        )
        flags = gssapi.RequirementFlag
        wanted = (
            flags.mutual_authentication | flags.integrity | flags.confidentiality
            | flags.replay_detection | flags.out_of_sequence_detection
        )  # fmt: skip
        target = gssapi.Name(self.service.replace("/", "@", 1), gssapi.NameType.hostbased_service)
        return gssapi.SecurityContext(name=target, creds=credentials, usage="initiate", flags=wanted)

    def read_message(self) -> tuple[int, bytes]:
        """(mtyp, token) of the server's next message; (0xFF, b"") for an abort."""
        head = self.socks.recv_exactly(2)
        assert head[0] == 1, f"not an RFC 1961 message: {head!r}"
        if head[1] == 0xFF:
            return 0xFF, b""
        (length,) = struct.unpack("!H", self.socks.recv_exactly(2))
        return head[1], self.socks.recv_exactly(length)

    def establish(self) -> None:
        assert self.socks.greet([Method.GSSAPI]) == Method.GSSAPI
        self.context = self.new_context()
        token = self.context.step()
        while True:
            if token:
                self.sock.sendall(frame(1, token))
            if self.context.complete:
                return
            mtyp, answer = self.read_message()
            assert mtyp == 1, f"context establishment failed: message type {mtyp:02x}"
            token = self.context.step(answer)

    def level_message(self, level: int, nec: bool = False) -> bytes:
        octet = bytes((level,))
        return frame(2, octet if nec else self.context.wrap(octet, False).message)

    def agree(self, level: int, nec: bool = False) -> int:
        """Ask for ``level``; the level the server granted (0xFF: it aborted)."""
        self.sock.sendall(self.level_message(level, nec))
        return self.read_level(nec)

    def read_level(self, nec: bool = False) -> int:
        mtyp, token = self.read_message()
        if mtyp == 0xFF:
            return 0xFF
        assert mtyp == 2
        octet = token if nec else self.context.unwrap(token).message
        granted = octet[0]
        self.encrypt = {0: None, 1: False, 2: True}[granted]
        return granted

    def login(self, level: int = 2) -> None:
        self.establish()
        assert self.agree(level) == level

    def wrap(self, data: bytes) -> bytes:
        if self.encrypt is None:
            return data
        out = b""
        for start in range(0, len(data), DATA_CHUNK):
            out += frame(3, self.context.wrap(data[start : start + DATA_CHUNK], self.encrypt).message)
        return out

    def send(self, data: bytes) -> None:
        self.sock.sendall(self.wrap(data))

    def recv(self) -> bytes:
        """The next plaintext chunk (one frame's worth); b"" when the server closed."""
        if self.encrypt is None:
            return self.sock.recv(PLAIN_READ)
        head = self.sock.recv(4, socket.MSG_WAITALL)
        if not head:
            return b""
        assert len(head) == 4 and head[:2] == b"\x01\x03", f"not a data frame: {head!r}"
        token = self.socks.recv_exactly(struct.unpack("!H", head[2:])[0])
        result = self.context.unwrap(token)
        assert result.encrypted == self.encrypt
        return result.message

    def recv_exactly(self, n: int) -> bytes:
        while len(self._plain) < n:
            chunk = self.recv()
            if not chunk:
                raise ConnectionError(f"closed after {len(self._plain)} of {n} bytes")
            self._plain += chunk
        data, self._plain = self._plain[:n], self._plain[n:]
        return data

    def connect(self, destination: Address | str) -> tuple[int, Address]:
        if isinstance(destination, str):
            destination = Address.parse(destination)
        return self.request(Command.CONNECT, destination)

    def request(self, command: Command, destination: Address) -> tuple[int, Address]:
        self.send(protocol.build_request(command, destination))
        head = self.recv_exactly(5)
        size = {protocol.AddressType.IPV4: 10, protocol.AddressType.IPV6: 22}.get(head[3], 7 + head[4])
        parsed = protocol.parse_reply(head + self.recv_exactly(size - 5))
        assert parsed is not None
        return int(parsed[0]), parsed[1]
