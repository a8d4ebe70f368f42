"""Tor's SOCKS5 extensions: RESOLVE (0xF0) and RESOLVE_PTR (0xF1), for clients such as torsocks.

A RESOLVE request names a host; the proxy looks it up (through the ``socksflow_resolve`` hook:
the DNS plugin, its cache and its rules) and answers the address in BND.ADDR instead of
connecting.  RESOLVE_PTR names an IP address and gets a host name back.  Both are decided by
the request hooks like any command first, so rules can refuse a look-up (``command: resolve``).
Off unless ``doors: {tor_resolve: true}``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import TYPE_CHECKING

from socksflow.protocol import Address, Command, InvalidAddress, Reply, parse_host

if TYPE_CHECKING:
    from socksflow.runner import Runner
    from socksflow.session import Session

COMMANDS = (Command.RESOLVE, Command.RESOLVE_PTR)


async def handle(runner: Runner) -> None:
    """Answer a RESOLVE or RESOLVE_PTR request with the address or name, then close."""
    session = runner.session
    assert session.request is not None and session.destination is not None
    if session.request.command == Command.RESOLVE:
        ips = await runner.addresses_to_use()  # a name that does not resolve fails the request
        ipv4 = [ip for ip in ips if ip.version == 4]
        runner.send_reply(Reply.SUCCEEDED, Address((ipv4 or list(ips))[0], 0))
        return
    host = session.destination.host
    if isinstance(host, str):
        await runner.fail(Reply.ADDRESS_TYPE_NOT_SUPPORTED, "RESOLVE_PTR needs an IP address")
    name = await _reverse(session, host)  # type: ignore[arg-type]
    if name is None:
        await runner.fail(Reply.HOST_UNREACHABLE, f"{host} has no name")
    runner.send_reply(Reply.SUCCEEDED, Address(name, 0))  # type: ignore[arg-type]


async def _reverse(session: Session, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """The name of ``ip`` from the system's resolver (hosts file first), or None."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(session.config.timeouts.hook):
            name, _ = await loop.getnameinfo((str(ip), 0), socket.NI_NAMEREQD)
        return parse_host(name)  # type: ignore[return-value]
    except (OSError, TimeoutError, InvalidAddress):
        return None
