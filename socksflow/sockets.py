"""Small socket helpers the core shares: the family of an address, sockets closed on failure."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

from socksflow.protocol import Address, IPAddress


def family(where: IPAddress | Address) -> socket.AddressFamily:
    """``AF_INET6`` for an IPv6 address, else ``AF_INET``."""
    ip = where.host if isinstance(where, Address) else where
    return socket.AF_INET6 if getattr(ip, "version", 4) == 6 else socket.AF_INET


def ip_text(ip: IPAddress) -> str:
    """``ip`` as the socket calls spell it (``recvfrom``, ``getpeername``)."""
    return socket.inet_ntop(family(ip), ip.packed)


@contextlib.contextmanager
def closed_on_error(sock: socket.socket) -> Iterator[socket.socket]:
    """Close ``sock`` if the block raises (cancellation included), so no descriptor leaks."""
    try:
        yield sock
    except BaseException:
        sock.close()
        raise


def bound_socket(
    ip: IPAddress, port: int, kind: socket.SocketKind, *, listen: int | None = None
) -> socket.socket:
    """A non-blocking socket bound to ``ip``:``port``, listening with ``listen`` as backlog if given."""
    sock = socket.socket(family(ip), kind)
    with closed_on_error(sock):
        sock.setblocking(False)
        sock.bind((str(ip), port))
        if listen is not None:
            sock.listen(listen)
    return sock
