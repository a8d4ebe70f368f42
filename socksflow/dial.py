"""Outbound TCP connections: every address tried, Happy Eyeballs style (RFC 8305)."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Sequence
from typing import TypeVar

from socksflow.protocol import Address, Reply
from socksflow.sockets import closed_on_error, family

T = TypeVar("T")
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


def interleave(*groups: Sequence[T]) -> list[T]:
    """One item of each group in turn, keeping each group's order (RFC 8305 §4 alternates families)."""
    result: list[T] = []
    for i in range(max(map(len, groups), default=0)):
        result.extend(group[i] for group in groups if i < len(group))
    return result


def by_family(addresses: Sequence[Address]) -> list[Address]:
    """Alternate address families from the first address's, keeping the resolver's order within each."""
    first = addresses[0].atyp
    return interleave([a for a in addresses if a.atyp == first], [a for a in addresses if a.atyp != first])


async def connect_one(address: Address) -> socket.socket:
    """A connected, non-blocking TCP socket to one IP address."""
    sock = socket.socket(family(address), socket.SOCK_STREAM)
    with closed_on_error(sock):
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.get_running_loop().sock_connect(sock, (str(address.host), address.port))
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
        for address in by_family(addresses):
            pending.add(asyncio.ensure_future(connect_one(address)))
            winner = await _first_success(pending, errors, delay)
            if winner is not None:
                return winner
        while pending:
            winner = await _first_success(pending, errors, None)
            if winner is not None:
                return winner
    finally:
        if pending:
            for task in pending:
                task.cancel()
            # A cancellation of this call arriving here propagates (asyncio.wait raises it).
            done, _ = await asyncio.wait(pending)
            for task in done:
                if not task.cancelled() and task.exception() is None:
                    task.result().close()  # a loser that connected anyway
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
