"""BIND (RFC 1928 §4, §6): wait for one incoming connection from the expected peer, then relay.

The request's DST.ADDR/DST.PORT name the host expected to connect.  The listening socket is
bound where ``socksflow_bind`` says, by default on the control connection's local IP (port 0);
the first reply carries that address (or ``bind.advertise``).  Each incoming connection is
checked against the expected peer (``bind.peer_check``) and ``socksflow_bind_peer``.  A refused
peer is closed and the wait goes on — a stray connection (a port scan) must not end the
client's BIND — until ``bind.timeout``, which sends the second reply 0x06 (TTL expired).  The
accepted peer's address goes in the second reply, the listener is closed, and the two
connections are relayed as for CONNECT.  If the client closes its connection meanwhile, the
wait ends.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from socksflow.decisions import Verdict
from socksflow.dial import reply_for_error
from socksflow.errors import PluginError
from socksflow.outbound import BindOutbound, OutboundError, open_bind
from socksflow.protocol import Address, IPAddress, Reply
from socksflow.sockets import bound_socket

if TYPE_CHECKING:
    from socksflow.config import BindSettings
    from socksflow.runner import Runner

log = logging.getLogger("socksflow.bind")


async def handle(runner: Runner) -> None:
    """Serve a BIND request: listen, first reply, accept the expected peer, second reply, relay."""
    session = runner.session
    settings = session.config.bind
    try:
        async with asyncio.timeout(session.config.timeouts.connect):
            upstream = await open_bind(session)
    except OutboundError as exc:
        await runner.fail(exc.reply, f"BIND through the outbound failed: {exc}")
    except (OSError, TimeoutError) as exc:
        await runner.fail(reply_for_error(exc), f"BIND through the outbound failed: {exc}")
    if upstream is not None:
        await _through_upstream(runner, upstream, settings)
        return
    listen = await _listen_address(runner)
    expected = await _expected_peer(runner, settings)
    try:
        listener = bound_socket(listen.host, listen.port, socket.SOCK_STREAM, listen=1)  # type: ignore[arg-type]
    except OSError as exc:
        await runner.fail(reply_for_error(exc), f"cannot listen on {listen}: {exc.strerror or exc}")
    try:
        port = listener.getsockname()[1]
        host = session.local.host if listen.host.is_unspecified else listen.host  # type: ignore[union-attr]
        session.bound = Address(settings.advertise or host, port)
        runner.send_reply(Reply.SUCCEEDED, session.bound)
        peer = await _wait_for_peer(runner, _accept_peer(runner, listener, expected), settings.timeout)
    finally:
        listener.close()
    if peer is not None:
        sock, address = peer
        await runner.start_relay(sock, bound=address)


async def _through_upstream(runner: Runner, upstream: BindOutbound, settings: BindSettings) -> None:
    """BIND on the route's upstream: its first reply's address, its second reply's peer."""
    session = runner.session
    try:
        session.bound = upstream.bound
        runner.send_reply(Reply.SUCCEEDED, upstream.bound)
        peer = await _wait_for_peer(runner, upstream.peer(), settings.timeout)
    except BaseException:
        upstream.close()
        raise
    if peer is None:
        upstream.close()
        return
    sock, address = peer
    refusal = _check_peer(address, await _expected_peer(runner, settings))
    if refusal is not None:  # the upstream accepted it already: no waiting for another
        sock.close()
        await runner.fail(Reply.NOT_ALLOWED, f"BIND peer {address} refused ({refusal})")
    await runner.start_relay(sock, bound=address)


async def _listen_address(runner: Runner) -> Address:
    """Where to listen: the ``socksflow_bind`` answer, else the control connection's local IP."""
    session = runner.session
    try:
        answer, plugin = await runner.hooks.bind(session)
    except PluginError as exc:
        await runner.fail(Reply.GENERAL_FAILURE, "BIND refused: plugin error", exc)
    if isinstance(answer, Verdict):
        if not answer.allowed:
            session.verdict, session.decided_by = answer, plugin
            await runner.fail(answer.reply, f"BIND refused by {plugin}: {answer.reason or answer.rule}")
        answer = None
    if answer is None:
        return Address(session.local.host, 0)
    if not isinstance(answer, Address) or answer.is_domain:
        error = PluginError(plugin, "socksflow_bind", f"answered {answer!r}, not an IP address")
        await runner.fail(Reply.GENERAL_FAILURE, "BIND refused: plugin error", error)
    return answer


async def _expected_peer(runner: Runner, settings: BindSettings) -> tuple[frozenset[IPAddress], int] | None:
    """The IPs (and port, 0 for any) a peer must come from; ``None`` accepts any peer."""
    session = runner.session
    destination = session.destination
    assert destination is not None
    if settings.peer_check == "any" or (not destination.is_domain and destination.host.is_unspecified):  # type: ignore[union-attr]
        return None
    ips = await runner.addresses_to_use()  # a name is resolved once, as for CONNECT
    port = destination.port if settings.peer_check == "strict" else 0
    return frozenset(ips), port


async def _wait_for_peer(
    runner: Runner, accept: Awaitable[tuple[socket.socket, Address]], timeout: float
) -> tuple[socket.socket, Address] | None:
    """The accepted peer; ``None`` if the client went away.  Fails the session on timeout."""
    accepting = asyncio.ensure_future(accept)
    closed = asyncio.ensure_future(runner.wait_client_closed())
    try:
        await asyncio.wait((accepting, closed), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (accepting, closed):
            task.cancel()
        # Let the cancelled accept unregister the listener before the caller closes it.
        await asyncio.wait((accepting, closed))
    if accepting.cancelled():
        if closed.done() and not closed.cancelled():
            runner.set_reason("client closed the connection while waiting for the BIND peer")
            return None
        await runner.fail(Reply.TTL_EXPIRED, f"no acceptable peer connected within {timeout:g}s")
    error = accepting.exception()
    if isinstance(error, PluginError):
        await runner.fail(Reply.GENERAL_FAILURE, "BIND peer check failed: plugin error", error)
    if error is not None:
        reply = error.reply if isinstance(error, OutboundError) else reply_for_error(error)
        await runner.fail(reply, f"accepting the BIND peer failed: {error}")
    peer = accepting.result()
    if closed.done() and not closed.cancelled():  # both at once: nobody is left to relay to
        peer[0].close()
        runner.set_reason("client closed the connection while waiting for the BIND peer")
        return None
    return peer


async def _accept_peer(
    runner: Runner, listener: socket.socket, expected: tuple[frozenset[IPAddress], int] | None
) -> tuple[socket.socket, Address]:
    """Accept connections until one passes the checks; the refused ones are closed."""
    session = runner.session
    loop = asyncio.get_running_loop()
    while True:
        sock, sockaddr = await loop.sock_accept(listener)
        try:
            peer = Address.from_sockaddr(sockaddr)
            refusal = _check_peer(peer, expected)
            if refusal is None:
                verdict, plugin = await runner.hooks.bind_peer(session, peer)
                if verdict is not None and not verdict.allowed:
                    refusal = f"refused by {plugin}: {verdict.reason or verdict.rule or 'no reason given'}"
        except BaseException:
            sock.close()
            raise
        if refusal is None:
            return sock, peer
        log.info("session %s: BIND peer %s refused (%s); still waiting", session.id, peer, refusal)
        sock.close()


def _check_peer(peer: Address, expected: tuple[frozenset[IPAddress], int] | None) -> str | None:
    """Why ``peer`` is not the expected one, or ``None`` if it is."""
    if expected is None:
        return None
    ips, port = expected
    ip = peer.host
    if ip.version == 6 and ip.ipv4_mapped is not None:  # type: ignore[union-attr]
        ip = ip.ipv4_mapped  # type: ignore[union-attr]
    if ip not in ips:
        return f"expected a peer from {', '.join(map(str, sorted(ips, key=str)))}"
    if port and peer.port != port:
        return f"expected a peer from port {port}"
    return None
