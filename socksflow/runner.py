"""One client from accept to close: handshake → decide → connect → relay, in this module.

:class:`ClientProtocol` receives the client's bytes and feeds the sans-I/O
:class:`~socksflow.protocol.ServerConnection`; a :class:`Runner` drives one client through
the phases as one coroutine, filling in the :class:`~socksflow.session.Session` that plugins
see.  The runner steps that coroutine itself while it only waits for the client's bytes or for
the dial (the common session: greeting, no authentication, CONNECT to an address, plugins that
answer at once): no Task, no future per wait.  The first time it must await anything else (a
plugin's awaitable, DNS, another command) it goes on in a Task.  Once a CONNECT (or BIND)
succeeds the coroutine ends and the transports belong to a
:class:`~socksflow.relay.Tunnel`: an idle tunnel holds no task, no coroutine frame and no
buffer.  A session ends once, through :meth:`Runner.end`: the first reason given stands.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import random
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, NoReturn, TypeVar

from socksflow import detect, doors, forwarding, protocol, tor
from socksflow.decide import decide, final
from socksflow.decisions import Identity, Verdict
from socksflow.dial import dial, reply_for_error
from socksflow.errors import PluginError, ResolveError
from socksflow.outbound import OutboundError
from socksflow.protection import Protected, protect
from socksflow.protocol import NEED_DATA, Address, Command, IPAddress, Method, ProtocolError, Reply, Request
from socksflow.relay import Limiter, Pending, Tunnel, chunk_transform, new_tunnel
from socksflow.session import AuthChannel, Session

if TYPE_CHECKING:
    from socksflow.config import Config
    from socksflow.hooks import Hooks
    from socksflow.server import Server

log = logging.getLogger("socksflow.session")
T = TypeVar("T")

MAX_HANDSHAKE_BUFFER = 64 * 1024  # bytes accepted ahead of the reply before reading pauses
# After a refusal, wait this long for the client to close first: closing a socket with unread
# input sends a reset, which can destroy the reply in flight (RFC 1928 §6 allows up to 10 s).
LINGER_SECONDS = 2.0
# Handshake deadlines are spread over this share of their length: connections accepted together
# (a flood reconnecting in a burst) then expire over many loop iterations, not in one that would
# hold every good client up for as long as closing thousands of sessions takes.
DEADLINE_SPREAD = 1 / 16
EXPIRED = -math.inf  # Runner._deadline once its deadline cancelled the coroutine (a slot less than a flag)

CommandHandler = Callable[["Runner"], Awaitable[None]]
"""Serves a request other than CONNECT once it is allowed (BIND, UDP ASSOCIATE)."""


class _Suspend:
    """What the session's coroutine yields to the runner stepping it (never to a Task)."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __await__(self) -> Generator[_Suspend, None, None]:
        yield self


INPUT = _Suspend("input")  # until ClientProtocol.wake(): bytes, EOF, or the connection lost
IN_TASK = _Suspend("task")  # from here on in a Task (awaited only while stepped by the runner)


class ClientGone(Exception):
    """The client closed the connection before the handshake finished."""


class SessionDenied(Exception):
    """The session ends here; the reply (if any) has been sent."""


class ClientProtocol(asyncio.Protocol):
    """The client's connection during the handshake."""

    __slots__ = (
        "_idle",
        "_linger",
        "_loop",
        "_paused",
        "_waiter",
        "_waiting",
        "closed",
        "conn",
        "door",
        "driver",
        "eof",
        "local",
        "protocols",
        "runner",
        "server",
        "transport",
        "write_paused",
    )

    def __init__(
        self, server: Server, protocols: frozenset[str] = detect.SOCKS5_ONLY, local: Address | None = None
    ) -> None:
        self.server = server
        self.protocols = protocols  # the listener's front doors (socksflow.doors)
        # The listener's address when it is a specific one (then every client's sockname): no
        # sockname to convert per session.  None: ask the transport.
        self.local = local
        self.door = ""  # the protocol the client speaks, known from its first byte
        self._loop = server.loop  # asyncio.get_running_loop() costs a getpid(2) each time
        self.conn = protocol.ServerConnection()
        self.eof = False
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None
        # The runner stepping its coroutine by hand (no Task yet): a wake steps it directly.
        self.driver: Runner | None = None
        self._waiting = False  # the driver's coroutine waits at INPUT
        self._paused = False
        self._linger: asyncio.TimerHandle | None = None
        self._idle: asyncio.TimerHandle | None = None  # between forwarded HTTP requests
        self.write_paused = False
        self.runner: Runner | None = None

    def connection_made(self, transport: asyncio.BaseTransport, client: Address | None = None) -> None:
        """``client``: the client a PROXY protocol header named (socksflow.proxied), else the peer."""
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer is None:  # reset before its transport was made
            self.closed = True
            transport.abort()
            return
        self.runner = Runner(self.server, self, client or Address.from_sockaddr(peer))
        self.server.session_started(self.runner)

    def data_received(self, data: bytes) -> None:
        if self._linger is not None:
            return  # the session is over: discard
        if not self.door:
            doors.open_door(self, data[0])
        self.conn.receive_data(data)
        if self.conn.buffered > MAX_HANDSHAKE_BUFFER and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        if self.runner is None:
            self._poll_next()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        if self._linger is not None:
            self.transport.close()
        if isinstance(self.conn, doors.HttpDoor) and self.conn.forwarder is not None:
            self.conn.forwarder.receive_client(b"")
            if self.runner is None:
                self._poll_next()
        self._wake()
        return True  # a client may shut down its sending side and still await the reply

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._linger is not None:
            self._linger.cancel()
        if self._idle is not None:
            self._idle.cancel()
        self.server.between_requests.discard(self)
        self._wake()
        runner = self.runner  # none if the client was gone in connection_made, or between requests
        if runner is not None:
            if isinstance(exc, ProtocolError):  # a security layer refused a frame (socksflow.protection)
                runner.set_reason(f"protocol error: {exc}")
            runner.client_lost()

    def finish(self) -> None:
        """Close gracefully: send FIN after what is queued, drain the client's input, then close."""
        if self.closed or self._linger is not None:
            return
        transport = self.transport
        if self.eof or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        transport.resume_reading()
        self._linger = self._loop.call_later(LINGER_SECONDS, transport.abort)

    def _wake(self) -> None:
        if self._waiting:
            self._waiting = False
            self.driver._step()  # type: ignore[union-attr]
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    wake = _wake

    async def wait_input(self) -> None:
        """Wait until something happens: bytes or EOF from the client, or :meth:`wake`."""
        await self._wait()

    def reading(self, on: bool) -> None:
        """Resume (or pause) reading from the client."""
        if self._paused == on and not self.closed:
            self._paused = not on
            if on:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake()

    def serve_next(self) -> None:
        """The session is over and the client's HTTP connection stays open: its next request,
        when it comes, starts the next session (until then the connection holds no session)."""
        self.runner = None
        self.server.between_requests.add(self)
        self._idle = self._loop.call_later(self.server.config.timeouts.idle or 3600, self.finish)
        self._poll_next()

    def _poll_next(self) -> None:
        conn = self.conn
        if self._linger is not None or not isinstance(conn, doors.HttpDoor) or conn.forwarder is None:
            return
        try:
            request = conn.poll()
        except ProtocolError as exc:
            self.write(exc.response)
            request = False
        if request is True and not (self.eof or self.closed):
            return  # wait for more of the request
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self.server.between_requests.discard(self)
        if not isinstance(request, doors.ProxyRequest) or self.server.stopping:
            self.finish()
            return
        self.runner = runner = Runner(self.server, self)
        conn.session = runner.session
        runner.session.protocol = self.door
        self.server.session_started(runner)

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        await self._waiter
        self._waiter = None

    async def next_event(self) -> protocol.Event:
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                return event  # type: ignore[return-value]
            if self.eof or self.closed:
                raise ClientGone("client closed the connection during the handshake")
            if self._paused:
                self._paused = False
                self.transport.resume_reading()
            if self.driver is not None:  # stepped by hand: wake() steps the runner again
                self._waiting = True
                await INPUT
                continue
            self._waiter = self._loop.create_future()  # inline, not _wait(): a coroutine less per event
            await self._waiter
            self._waiter = None

    async def read(self, limit: int) -> bytes:
        """Raw bytes for a plugin-driven sub-negotiation."""
        while not self.conn.buffered:
            if self.eof or self.closed:
                return b""
            await self._wait()
        return self.conn.take_subnegotiation_data(limit)

    async def wait_closed(self) -> None:
        """Wait until the client closes its connection; bytes it sends meanwhile are discarded."""
        while not (self.eof or self.closed):
            self.conn.trailing_data  # noqa: B018 - drop what arrived, keep the buffer bounded
            if self._paused:  # paused by a burst during the handshake: the EOF must still arrive
                self._paused = False
                self.transport.resume_reading()
            await self._wait()

    def write(self, data: bytes) -> None:
        if not self.closed and self._linger is None:  # nothing after finish() sent the FIN
            self.transport.write(data)


class Runner:
    """Runs one client connection and owns everything the plugins' :class:`Session` does not show."""

    __slots__ = (
        "_client",
        "_client_closed",
        "_clock",
        "_context",
        "_coro",
        "_deadline",
        "_must_cancel",
        "_stepping",
        "_task",
        "_timer",
        "_waiting_on",
        "session",
    )

    def __init__(self, server: Server, client: ClientProtocol, peer: Address | None = None) -> None:
        # The session holds the server, its configuration and that configuration's hooks (without
        # the dormant plugins'): the runner reads them there, three slots less per tunnel.
        self._client: ClientProtocol | None = client
        transport = client.transport
        self.session = Session(
            server,
            server.hooks,
            peer or Address.from_sockaddr(transport.get_extra_info("peername")),
            client.local or Address.from_sockaddr(transport.get_extra_info("sockname")),
        )
        self._clock = time.monotonic()
        self._coro: Coroutine[object, None, None] | None = None  # the phases, until they end
        self._task: asyncio.Task[None] | None = None  # once the coroutine goes on in a Task
        # While the runner steps the coroutine itself: the context it runs in (a Task's would be
        # a copy too), the future it waits on (the dial), whether it is running now, and a
        # cancellation to deliver once it is suspended.
        self._context: contextvars.Context | None = None
        self._waiting_on: asyncio.Future[object] | None = None
        self._stepping = False
        self._must_cancel = False
        # One timer per session for the deadlines of _within: it fires at the earliest one armed
        # and, finding a later deadline in force by then, waits on for that one.
        self._timer: asyncio.TimerHandle | None = None
        # The loop time the _within in progress ends at; EXPIRED once it cancelled the coroutine.
        self._deadline: float | None = None
        self._client_closed = False

    def __repr__(self) -> str:
        return f"<Runner {self.session!r}>"

    @property
    def server(self) -> Server:
        return self.session.server

    @property
    def config(self) -> Config:
        """The configuration the session started under (a reload does not change it)."""
        return self.session.config

    @property
    def hooks(self) -> Hooks:
        """The session's configuration's hooks (for the command handlers and the server)."""
        return self.session._hooks

    # ------------------------------------------------------------------ start and end

    def start(self) -> None:
        self._coro = self._run()
        self._context = contextvars.copy_context()
        self._client.driver = self  # type: ignore[union-attr]
        self._step()

    def _step(self, cancel: bool = False) -> None:
        """Run the coroutine until it waits, as a Task's step would (CancelledError thrown in with ``cancel``)."""
        coro = self._coro
        if coro is None or self._task is not None:
            return
        self._waiting_on = None
        self._stepping = True
        try:
            if cancel:
                self._must_cancel = False
                waits_for = self._context.run(coro.throw, asyncio.CancelledError())  # type: ignore[union-attr]
            else:
                waits_for = self._context.run(coro.send, None)  # type: ignore[union-attr]
        except (StopIteration, asyncio.CancelledError):
            return  # the coroutine's own finally has done the bookkeeping
        finally:
            self._stepping = False
        if waits_for is IN_TASK:
            self._hand_to_task(coro)
        elif waits_for is None:  # a bare yield (asyncio.sleep(0)): go on at the next iteration
            self.session.server.loop.call_soon(self._step)
        elif waits_for is not INPUT:  # a future: the dial
            self._waiting_on = waits_for
            waits_for.add_done_callback(self._future_done)
        if self._must_cancel:
            self._deliver_cancel()

    def _future_done(self, future: asyncio.Future[object]) -> None:
        if future is self._waiting_on:
            self._step()

    def _hand_to_task(self, coro: Coroutine[object, None, None]) -> None:
        client = self._client
        if client is not None and client.driver is self:
            client.driver = None
            client._waiting = False
        self._task = self.session.server.loop.create_task(coro, context=self._context)
        if self._must_cancel:
            self._must_cancel = False
            self._task.cancel()

    def _cancel(self) -> None:
        """Cancel the coroutine at its await, as ``Task.cancel()`` does."""
        if self._task is not None:
            self._task.cancel()
        elif self._coro is not None and not self._must_cancel:
            self._must_cancel = True
            if not self._stepping:
                self._deliver_cancel()

    def _deliver_cancel(self) -> None:
        waiting_on = self._waiting_on
        if waiting_on is not None:  # its done callback steps the coroutine into CancelledError
            self._must_cancel = False
            waiting_on.cancel()
            return
        client = self._client
        if client is not None:
            client._waiting = False  # no wake steps it meanwhile
        self.session.server.loop.call_soon(self._step, True)

    def end(self, reason: str, *, now: bool = False) -> None:
        """End the session: record ``reason`` unless one was recorded first, close what is open.

        Gracefully by default (what is queued is sent first); ``now`` aborts whatever the phase
        (shutdown past its deadline, a plugin fault in the relay).  The session is over, and
        ``socksflow_session_end`` called, once every connection it had is closed.
        """
        self.set_reason(reason)
        session = self.session
        if session.tunnel is not None:
            if now:
                session.tunnel.abort()
            else:
                session.tunnel.close()
            return
        if now:
            self._cancel()
        client = self._client
        if client is None:
            return
        if now:
            client.transport.abort()
        elif session.association is not None:  # wait_closed() returns, the UDP handler cleans up
            client.transport.close()
        else:
            client.finish()  # the task, if any, finds the client gone

    def set_reason(self, reason: str) -> None:
        """Record why the session ends, unless a reason was recorded first: the first one stands."""
        if not self.session.close_reason:
            self.session.close_reason = reason

    def _finish(self, reason: str) -> None:
        """The session's task is done with the client: record why, close gracefully (or, for an
        HTTP connection that serves more requests, leave it to the next session)."""
        self.set_reason(reason)
        client = self._client
        if client is None:
            return
        conn = client.conn
        if (
            isinstance(conn, doors.HttpDoor)
            and conn.keeps_open
            and not (client.closed or self.session.server.stopping)
        ):
            self._client = None
            self._client_closed = True
            client.serve_next()
        else:
            client.finish()

    def client_lost(self) -> None:
        """The client's connection closed while the handshake protocol owned it."""
        self._client_closed = True
        self._maybe_ended()

    def _maybe_ended(self) -> None:
        # A session without a tunnel ends when both its task and its client connection are done.
        if self._coro is None and self._client_closed and self.session.tunnel is None:
            self.session.server.session_ended(self)

    # ------------------------------------------------------------------ the phases

    async def _run(self) -> None:
        client = self._client
        assert client is not None
        session = self.session
        try:
            await self._accept()
            # One deadline for greeting, authentication and request, plugin hooks included.
            handshake = session.config.timeouts.handshake
            request = await self._within(
                handshake * (1 + DEADLINE_SPREAD * random.random()), self._negotiate()
            )
            assert isinstance(request, Request)
            session.request = request
            session.timings["handshake"] = time.monotonic() - self._clock
            self._clock = 0.0  # a float less (24 bytes) per idle tunnel
            session.destination = request.destination
            await self._dispatch(request)
        except SessionDenied as exc:
            self._finish(str(exc))
        except ClientGone as exc:
            self._finish(str(exc))
        except TimeoutError:
            self._finish("handshake timed out")
        except ProtocolError as exc:
            if exc.response:
                client.write(exc.response)
            if isinstance(exc, protocol.RequestError):
                session.reply = exc.reply
            self._finish(f"protocol error: {exc}")
        except PluginError as exc:  # a plugin fault outside the phases that map it to a reply
            log.error("session %s: %s", session.id, exc, exc_info=exc.__cause__)
            await self._report(exc)
            self._finish(str(exc))
        except Exception as exc:  # the session boundary: nothing a client sends may crash the server
            log.exception("session %s: unexpected error", session.id)
            await self._report(exc)
            self._finish(f"internal error: {exc!r}")
        finally:
            self._task = self._coro = self._context = None  # a tunnel's runner keeps none of them
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._maybe_ended()

    async def _report(self, error: Exception) -> None:
        if self._task is None:
            await IN_TASK
        await self.session._hooks.session_error(self.session, error)

    def _decided(self, answer: tuple[T | None, str]) -> T | None:
        """A decision hook's answer; remembers which plugin gave it."""
        result, plugin = answer
        if result is not None:
            self.session.decided_by = plugin
        return result

    async def _deny(self, reason: str, response: bytes = b"", error: Exception | None = None) -> NoReturn:
        """Send ``response`` (if any), record why, and end the session (raises SessionDenied)."""
        if error is not None:
            log.error("session %s: %s", self.session.id, error, exc_info=error.__cause__)
            await self._report(error)
        if response:
            self._client.write(response)  # type: ignore[union-attr]
        self.set_reason(reason)
        raise SessionDenied(reason)

    def _refused_by_fault(self, error: PluginError) -> None:
        """A decision hook raised and the session fails closed: record that as the plugin's denial."""
        self.session.verdict = Verdict.deny(f"plugin error in {error.hook}", reply=Reply.GENERAL_FAILURE)
        self.session.decided_by = error.plugin

    async def _accept(self) -> None:
        try:
            answer = self.session._hooks.client_connected(self.session)
            verdict = self._decided(answer if isinstance(answer, tuple) else await self._in_task(answer))
        except PluginError as exc:
            self._refused_by_fault(exc)
            await self._deny("client refused: plugin failed", error=exc)
        if verdict is not None and not verdict.allowed:
            self.session.verdict = verdict
            await self._deny(f"client refused: {verdict.reason or self.session.decided_by}")

    async def _within(self, delay: float, awaitable: Awaitable[T]) -> T:
        """``await awaitable`` in the session's task, raising TimeoutError after ``delay`` seconds.

        What ``asyncio.timeout`` does, for less: no context manager, no lookups of the running
        loop and task (each a getpid(2)), and one timer for the session's successive deadlines
        (handshake, then connect) instead of a timer made and cancelled for each.  A cancellation
        that is not this deadline's (a shutdown) passes through as CancelledError.
        """
        loop = self.session.server.loop
        deadline = self._deadline = loop.time() + delay
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._expire)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self._deadline is EXPIRED and (self._task is None or self._task.uncancel() == 0):
                raise TimeoutError from None
            raise
        finally:
            self._deadline = None

    def _expire(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self._coro is None:
            return  # no deadline in force: the next _within arms its own
        if self.session.server.loop.time() < deadline:  # a later phase's deadline: wait on for it
            self._timer = self.session.server.loop.call_at(deadline, self._expire)
            return
        self._deadline = EXPIRED
        self._cancel()

    async def _in_task(self, awaitable: Awaitable[T]) -> T:
        """Await what a plugin returned, in a Task: plugins may rely on one (``asyncio.timeout``)."""
        if self._task is None:
            await IN_TASK
        return await awaitable

    async def _negotiate(self) -> Request:
        """Greeting, method and its sub-negotiation; the request that follows."""
        client = self._client
        assert client is not None
        session = self.session
        greeting = await client.next_event()
        door_request = None
        if not isinstance(greeting, protocol.Greeting):  # a one-request front door (socksflow.doors)
            door_request, greeting = greeting, doors.greeting_for(greeting)
        try:
            answer = session._hooks.select_method(session, greeting.methods)
            method = self._decided(answer if isinstance(answer, tuple) else await self._in_task(answer))
            if method is None:
                method = Method.NO_AUTH if Method.NO_AUTH in greeting.methods else Method.NO_ACCEPTABLE
            if method != Method.NO_ACCEPTABLE and method not in greeting.methods:
                raise PluginError(
                    session.decided_by, "socksflow_select_method", f"chose 0x{method:02x}, not offered"
                )
        except PluginError as exc:
            await self._deny("method selection failed", client.conn.send_method(Method.NO_ACCEPTABLE), exc)
        session.method = method
        client.write(client.conn.send_method(method))
        if method == Method.NO_ACCEPTABLE:
            await self._deny(f"no acceptable method among {list(greeting.methods)}")
        if method != Method.NO_AUTH and self._task is None:  # plugins judge the login: they may await
            await IN_TASK
        if method == Method.USERPASS:
            if door_request is None:
                credentials = await client.next_event()
            else:
                credentials = doors.credentials_for(door_request)
            assert isinstance(credentials, protocol.UserPassAuth)
            await self._authenticate(credentials)
        elif method != Method.NO_AUTH:
            await self._subnegotiate(method)
        if door_request is not None:
            return doors.request_for(session, door_request)
        return await client.next_event()  # type: ignore[return-value]

    async def _authenticate(self, credentials: protocol.UserPassAuth) -> None:
        client = self._client
        assert client is not None
        session = self.session
        conn = client.conn
        try:
            result = self._decided(
                await session._hooks.authenticate(session, credentials.username, credentials.password)
            )
        except PluginError as exc:
            self._refused_by_fault(exc)
            await self._deny("authentication failed: plugin error", conn.send_auth_status(False), exc)
        user = credentials.username.decode("utf-8", "backslashreplace")
        if isinstance(result, Identity):
            refusal = await self.login_result(Method.USERPASS, result.user, True)
            result = result if refusal is None else refusal
        else:
            await self.login_result(Method.USERPASS, user, False)
        if not isinstance(result, Identity):
            reason = (
                result.reason if isinstance(result, Verdict) and result.reason else "credentials rejected"
            )
            session.verdict = result if isinstance(result, Verdict) else Verdict.deny(reason)
            session.identity = Identity(user)  # who tried, for the access log; never the password
            session.authenticated = False
            await self._deny(f"authentication failed for {user!r}: {reason}", conn.send_auth_status(False))
        session.identity = self._with_groups(result)
        session.authenticated = True
        client.write(conn.send_auth_status(True))

    async def login_result(self, method: int, user: str | None, accepted: bool) -> Verdict | None:
        """Report a login's outcome the moment the credentials were judged (every login path calls it).

        Calls :func:`~socksflow.hookspecs.socksflow_auth_result` on every plugin, so failures
        count when they happen, not when the session ends.  Returns the first denial (which then
        becomes the session's verdict) of an accepted login, or ``None`` when the outcome stands;
        a plugin that raises refuses the login (fail closed).  The caller answers the client.
        """
        session = self.session
        try:
            answers = await session._hooks.auth_result(session, method, user, accepted)
        except PluginError as exc:
            self._refused_by_fault(exc)
            log.error("session %s: %s", session.id, exc, exc_info=exc.__cause__)
            await self._report(exc)
            return session.verdict
        for answer, plugin in answers:
            if accepted and isinstance(answer, Verdict) and not answer.allowed:
                session.verdict, session.decided_by = answer, plugin
                return answer
        return None

    def _with_groups(self, identity: Identity) -> Identity:
        # The groups section is the core's, so every plugin (rules, limits…) sees the same groups.
        groups = self.session.config.groups_of(identity.user, identity.groups)
        return identity if groups is identity.groups else Identity(identity.user, groups)

    async def _subnegotiate(self, method: int) -> None:
        client = self._client
        assert client is not None
        session = self.session
        conn = client.conn
        # A multi-round exchange: bounded by the handshake deadline (_within), not a timer of its
        # own, which would end it as a plugin fault just before the (spread) deadline does.
        try:
            answer = await session._hooks.subnegotiate(session, method, AuthChannel(client), timeout=None)
            result = self._decided(answer)
        except PluginError as exc:
            conn.finish_subnegotiation(False)
            await self._deny(f"method 0x{method:02x} failed: plugin error", error=exc)
        identity = result.identity if isinstance(result, Protected) else result
        if isinstance(identity, Identity):
            refusal = await self.login_result(method, identity.user, True)
            result = result if refusal is None else refusal
        else:
            await self.login_result(method, None, False)
        if not isinstance(result, Identity | Protected):
            conn.finish_subnegotiation(False)
            session.authenticated = False
            reason = result.reason if isinstance(result, Verdict) and result.reason else "not authenticated"
            session.verdict = result if isinstance(result, Verdict) else Verdict.deny(reason)
            await self._deny(f"method 0x{method:02x}: {reason}")
        if isinstance(result, Protected):  # the rest of the session travels in the method's frames
            client.transport = protect(client.transport, result.protection, conn.take_subnegotiation_data())
            result = result.identity
        conn.finish_subnegotiation(True)
        session.identity = self._with_groups(result)
        session.authenticated = True

    async def _dispatch(self, request: Request) -> None:
        """Decide the request, then serve it: CONNECT here, other commands by their handler."""
        session = self.session
        # Before any plugin sees it:
        if request.command in tor.COMMANDS and not session.config.doors.tor_resolve:
            await self.fail(
                Reply.COMMAND_NOT_SUPPORTED, f"{request.command.name} is off (doors: tor_resolve)"
            )

        def ask(destination: Address, after: str | None) -> Awaitable[tuple[Verdict | None, str]]:
            if after is None:
                return session._hooks.request(session, request)
            # The plugins judging a rewrite see where the session would now go.
            session.destination, session.decided_by = destination, after
            return session._hooks.request(session, replace(request, destination=destination), after=after)

        try:
            answer = session._hooks.request(session, request)
            if not isinstance(answer, tuple):
                answer = await self._in_task(answer)
            # Most answers decide on their own; a rewrite is judged by the plugins after it.
            decision = final(answer, request.destination) or await self._in_task(
                decide(ask, request.destination, answer)
            )
        except PluginError as exc:
            self._refused_by_fault(exc)
            await self.fail(Reply.GENERAL_FAILURE, "request check failed: plugin error", exc)
        if decision.verdict is not None:
            session.verdict, session.decided_by = decision.verdict, decision.decided_by
            if not decision.allowed:
                await self.fail(decision.reply, f"denied: {decision.why() or session.decided_by}")
            session.destination = decision.destination
            if decision.addresses is not None:
                session.addresses = decision.addresses
        if request.command == Command.CONNECT:
            await self._connect()
            return
        handler = session.server.command_handler(request.command)
        if handler is None:
            await self.fail(Reply.COMMAND_NOT_SUPPORTED, f"{request.command.name} is not supported")
        await self._in_task(handler(self))
        if session.tunnel is None:  # the command ended without handing the client to a tunnel
            self._finish("closed")

    # ------------------------------------------------------------------ for the command handlers

    async def fail(self, reply: Reply, reason: str, error: Exception | None = None) -> NoReturn:
        """Answer the request with a failure ``reply`` and end the session (raises SessionDenied)."""
        self.session.reply = reply
        conn = self._client.conn  # type: ignore[union-attr]
        response = (
            conn.send_second_reply(reply) if conn.phase is protocol.Phase.DONE else conn.send_reply(reply)
        )
        await self._deny(reason, response, error)

    def send_reply(self, reply: Reply, bound: Address) -> None:
        """Send the (first) reply to the request: for commands that reply before relaying (BIND, UDP)."""
        self.session.reply = reply
        client = self._client
        assert client is not None
        client.write(client.conn.send_reply(reply, bound))

    async def wait_client_closed(self) -> None:
        """Wait until the client closes its connection; bytes it sends meanwhile are discarded."""
        assert self._client is not None
        await self._client.wait_closed()

    async def addresses_to_use(self) -> tuple[IPAddress, ...]:
        """The checked addresses of the destination (resolving it if nobody did yet)."""
        session = self.session
        if session.addresses is None:
            destination = session.destination
            assert destination is not None
            if destination.is_domain and self._task is None:  # DNS: plugins, the resolver's timeout
                await IN_TASK
            try:
                session.addresses = await session.resolve()
            except ResolveError as exc:
                await self.fail(exc.reply, f"cannot resolve {destination.host}: {exc}")
            except PluginError as exc:
                await self.fail(Reply.HOST_UNREACHABLE, f"cannot resolve {destination.host}", exc)
            if not session.addresses:
                await self.fail(Reply.HOST_UNREACHABLE, f"{destination.host} has no address")
        return session.addresses

    async def _connect(self) -> None:
        session = self.session
        destination = session.destination
        assert destination is not None
        verdict = session.verdict
        if verdict is not None and verdict.outbound not in (None, "direct") and session.addresses is None:
            ips: tuple[IPAddress, ...] = ()  # routed, and no rule needed the addresses: the upstream resolves
        else:
            ips = await self.addresses_to_use()
        if len(ips) == 1 and ips[0] is destination.host:  # the client asked for this address
            targets: tuple[Address, ...] = (destination,)
        else:
            targets = tuple(Address(ip, destination.port) for ip in ips)
        timeout = session.config.timeouts.connect
        began = time.monotonic()
        upstream = bound = None
        try:
            opened = session._hooks.open_connection(session, targets, timeout=timeout)
            sock, _ = opened if isinstance(opened, tuple) else await self._in_task(opened)
            if isinstance(sock, tuple):  # an upstream's stream: BND is what its last hop reported
                sock, bound = sock
            if sock is None:
                if len(targets) == 1:  # the common case: the loop dials in one step
                    upstream = await self._within(timeout, _open(session.server.loop, targets[0]))
                else:
                    sock = await self._within(timeout, self._in_task(dial(targets)))
        except PluginError as exc:
            cause = exc.__cause__
            if isinstance(cause, OutboundError):  # an upstream's own code, or why it failed: no fault
                await self.fail(cause.reply, f"connect failed: {cause}")
            reply = reply_for_error(cause) if isinstance(cause, OSError) else Reply.GENERAL_FAILURE
            await self.fail(reply, f"connect failed: {exc}", exc)
        except (OSError, TimeoutError) as exc:
            await self.fail(reply_for_error(exc), f"connect to {destination} failed: {_describe(exc)}")
        session.timings["connect"] = time.monotonic() - began
        if upstream is None:
            await self.start_relay(sock, bound)
        else:
            await self._relay(upstream, remote=targets[0])  # its peer is the address dialled

    async def start_relay(self, sock: socket.socket, bound: Address | None = None) -> None:
        """Reply success and hand the client and ``sock`` to a tunnel (CONNECT, BIND)."""
        try:
            _, upstream = await self.session.server.loop.create_connection(Pending, sock=sock)
        except OSError as exc:
            sock.close()
            await self.fail(reply_for_error(exc), f"connection lost: {_describe(exc)}")
        await self._relay(upstream, bound)

    async def _relay(
        self, upstream: Pending, bound: Address | None = None, remote: Address | None = None
    ) -> None:
        session = self.session
        transport = upstream.transport
        try:
            peer = transport.get_extra_info("peername")
            session.remote = Address.from_sockaddr(peer) if remote is None or peer is None else remote
            session.bound = bound or Address.from_sockaddr(transport.get_extra_info("sockname"))
        except (OSError, TypeError) as exc:  # the destination already closed: no addresses left
            transport.abort()
            await self.fail(Reply.GENERAL_FAILURE, f"connection lost: {_describe(exc)}")
        try:
            limiters = session._hooks.relay_start(session)
        except PluginError as exc:
            transport.abort()
            await self.fail(Reply.GENERAL_FAILURE, "relay start failed: plugin error", exc)
        client = self._client
        assert client is not None
        conn = client.conn
        if isinstance(conn, doors.HttpDoor) and conn.forwarder is not None:
            await self._in_task(self._forward(conn, upstream, limiters))
            return
        # The runner is the tunnel's on_close (__call__): no bound method kept per tunnel.
        tunnel = new_tunnel(self, chunk_transform(session._hooks, session), limiters)
        if client.closed:  # the client left while we were connecting
            transport.close()
            raise ClientGone("client closed the connection before the reply")
        session.reply = Reply.SUCCEEDED
        client.write(_success(client.conn, session.bound))
        session.tunnel = tunnel
        tunnel.start(client.transport, upstream, client.conn.trailing_data, client.eof)
        self._client = None  # the tunnel owns the transport now

    async def _forward(self, conn: doors.HttpDoor, upstream: Pending, limiters: Sequence[Limiter]) -> None:
        """Serve one absolute-form HTTP request over ``upstream`` (socksflow.forwarding)."""
        client = self._client
        assert client is not None and conn.forwarder is not None and conn.proxy_request is not None
        session = self.session
        session.reply = Reply.SUCCEEDED
        client.write(conn.send_reply(Reply.SUCCEEDED))
        session.forwarded = counts = forwarding.Counts()
        idle = session.config.timeouts.idle
        transform = chunk_transform(session._hooks, session)
        try:
            await forwarding.exchange(
                client, conn.forwarder, conn.proxy_request, upstream, counts, limiters, idle, transform
            )
        except PluginError as exc:  # a relay_data plugin raised: fail closed, as a tunnel does
            log.error("session %s: %s", session.id, exc, exc_info=exc.__cause__)
            self.set_reason(str(exc))
            client.transport.abort()
            return
        self._finish("closed")

    def __call__(self, tunnel: Tunnel) -> None:
        """The tunnel closed (its ``on_close``)."""
        if tunnel.failure is not None:  # a relay_data plugin raised: its error is the reason
            log.error("session %s: %s", self.session.id, tunnel.failure, exc_info=tunnel.failure.__cause__)
            self.set_reason(str(tunnel.failure))
        if tunnel.error is not None:
            self.set_reason(f"relay error: {_describe(tunnel.error)}")
        self.set_reason("closed")
        self.session.server.session_ended(self)


def _success(conn: protocol.ServerConnection, bound: Address) -> bytes:
    if conn.phase is protocol.Phase.DONE:  # BIND's second reply
        return conn.send_second_reply(Reply.SUCCEEDED, bound)
    return conn.send_reply(Reply.SUCCEEDED, bound)


async def _open(loop: asyncio.AbstractEventLoop, address: Address) -> Pending:
    """A connection to one IP address, held by a Pending protocol until the tunnel starts."""
    _, upstream = await loop.create_connection(Pending, str(address.host), address.port)
    return upstream


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
