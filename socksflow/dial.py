"""Outbound TCP connections: every address tried, Happy Eyeballs style (RFC 8305)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Sequence

from socksflow.protocol import Address, Reply

HAPPY_EYEBALLS_DELAY = 0.25  # RFC 8305 §5 recommends 250 ms between attempts

_REPLY_FOR_ERRNO = {
    errno.ECONNREFUSED: Reply.CONNECTION_REFUSED,
    errno.ENETUNREACH: Reply.NETWORK_UNREACHABLE,
    errno.ENETDOWN: Reply.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: Reply.HOST_UNREACHABLE,
    errno.EHOSTDOWN: Reply.HOST_UNREACHABLE,
    errno.EADDRNOTAVAIL: Reply.HOST_UNREACHABLE,
    errno.ETIMEDOUT: Reply.TTL_EXPIRED,
    errno.EACCES: Reply.NOT_ALLOWED,
    errno.EPERM: Reply.NOT_ALLOWED,
}
# When every address fails, report the most telling failure: a refusal says more than a timeout.
_PRIORITY = (Reply.CONNECTION_REFUSED, Reply.TTL_EXPIRED, Reply.HOST_UNREACHABLE, Reply.NETWORK_UNREACHABLE)


def reply_for_error(error: BaseException) -> Reply:
    """The SOCKS reply code that describes a failed connection attempt."""
    if isinstance(error, TimeoutError):
        return Reply.TTL_EXPIRED
    if isinstance(error, OSError) and error.errno in _REPLY_FOR_ERRNO:
        return _REPLY_FOR_ERRNO[error.errno]
    return Reply.GENERAL_FAILURE


def interleave(addresses: Sequence[Address]) -> list[Address]:
    """Alternate address families, keeping the resolver's order within each (RFC 8305 §4)."""
    first = addresses[0].atyp
    same = [a for a in addresses if a.atyp == first]
    other = [a for a in addresses if a.atyp != first]
    result: list[Address] = []
    for i in range(max(len(same), len(other))):
        result.extend(group[i] for group in (same, other) if i < len(group))
    return result


async def connect_one(address: Address) -> socket.socket:
    """A connected, non-blocking TCP socket to one IP address."""
    family = socket.AF_INET6 if address.atyp.name == "IPV6" else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.get_running_loop().sock_connect(sock, (str(address.host), address.port))
    except BaseException:
        sock.close()
        raise
    return sock


async def dial(addresses: Sequence[Address], delay: float = HAPPY_EYEBALLS_DELAY) -> socket.socket:
    """Connect to the first address that answers; later attempts start ``delay`` apart.

    Raises the most telling :class:`OSError` when every attempt fails.
    """
    if not addresses:
        raise OSError(errno.EHOSTUNREACH, "no address to connect to")
    if len(addresses) == 1:
        return await connect_one(addresses[0])
    pending: set[asyncio.Task[socket.socket]] = set()
    errors: list[BaseException] = []
    try:
        for address in interleave(addresses):
            pending.add(asyncio.ensure_future(connect_one(address)))
            winner = await _first_success(pending, errors, delay)
            if winner is not None:
                return winner
        while pending:
            winner = await _first_success(pending, errors, None)
            if winner is not None:
                return winner
    finally:
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(BaseException):
                (await task).close()  # a loser that connected anyway
    raise min(errors, key=lambda e: _rank(reply_for_error(e)))


async def _first_success(
    pending: set[asyncio.Task[socket.socket]], errors: list[BaseException], timeout: float | None
) -> socket.socket | None:
    done, _ = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    winner = None
    for task in done:
        pending.discard(task)
        if task.exception() is not None:
            errors.append(task.exception())
        elif winner is None:
            winner = task.result()
        else:
            task.result().close()
    return winner


def _rank(reply: Reply) -> int:
    return _PRIORITY.index(reply) if reply in _PRIORITY else len(_PRIORITY)
