"""One client from accept to close: negotiate → authenticate → request → command.

The handshake runs as one coroutine per client over :class:`ClientProtocol`, which feeds
the sans-I/O :class:`~socksflow.protocol.ServerConnection`.  Once a CONNECT succeeds the
coroutine ends and the transports belong to a :class:`~socksflow.relay.Tunnel`: an idle
tunnel holds no task, no coroutine frame and no buffer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import socket
import time
from collections.abc import Awaitable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from socksflow import detect, doors, protocol, tor
from socksflow.decisions import ANONYMOUS, Identity, Verdict
from socksflow.dial import dial, reply_for_error
from socksflow.errors import PluginError, ResolveError
from socksflow.outbound import OutboundError
from socksflow.protection import Protected, protect
from socksflow.protocol import (
    NEED_DATA,
    Address,
    Command,
    IPAddress,
    Method,
    ProtocolError,
    Reply,
    Request,
)
from socksflow.relay import Direction, Pending, Tunnel
from socksflow.stash import Stash

if TYPE_CHECKING:
    from socksflow.config import Config
    from socksflow.plugins import HookCaller
    from socksflow.server import Server
    from socksflow.udp import Association

log = logging.getLogger("socksflow.session")
T = TypeVar("T")

MAX_HANDSHAKE_BUFFER = 64 * 1024  # bytes accepted ahead of the reply before reading pauses
# After a refusal, wait this long for the client to close first: closing a socket with unread
# input sends a reset, which can destroy the reply in flight (RFC 1928 §6 allows up to 10 s).
LINGER_SECONDS = 2.0
MAX_REMEMBERED_NAMES = 1024  # per session (a UDP association may name many destinations)
# Handshake deadlines are spread over this share of their length: connections accepted together
# (a flood reconnecting in a burst) then expire over many loop iterations, not in one that would
# hold every good client up for as long as closing thousands of sessions takes.
DEADLINE_SPREAD = 1 / 16
_ids = itertools.count(1)


class ClientGone(Exception):
    """The client closed the connection before the handshake finished."""


class SessionDenied(Exception):
    """The session ends here; the reply (if any) has been sent."""


class ClientProtocol(asyncio.Protocol):
    """The client's connection during the handshake."""

    __slots__ = (
        "_linger",
        "_loop",
        "_paused",
        "_waiter",
        "closed",
        "conn",
        "door",
        "eof",
        "protocols",
        "server",
        "session",
        "transport",
    )

    def __init__(self, server: Server, protocols: frozenset[str] = detect.SOCKS5_ONLY) -> None:
        self.server = server
        self.protocols = protocols  # the listener's front doors (socksflow.doors)
        self.door = ""  # the protocol the client speaks, known from its first byte
        self._loop = server.loop  # asyncio.get_running_loop() costs a getpid(2) each time
        self.conn = protocol.ServerConnection()
        self.eof = False
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        if transport.get_extra_info("peername") is None:  # reset before its transport was made
            self.closed = True
            transport.abort()
            return
        self.session = Session(self.server, self)
        self.server.session_started(self.session)

    def data_received(self, data: bytes) -> None:
        if self._linger is not None:
            return  # the session is over: discard
        if not self.door:
            doors.open_door(self, data[0])
        self.conn.receive_data(data)
        if self.conn.buffered > MAX_HANDSHAKE_BUFFER and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        if self._linger is not None:
            self.transport.close()
        self._wake()
        return True  # a client may shut down its sending side and still await the reply

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._linger is not None:
            self._linger.cancel()
        self._wake()
        session = getattr(self, "session", None)  # none if the client was gone in connection_made
        if session is not None:
            if isinstance(exc, ProtocolError):  # a security layer refused a frame (socksflow.protection)
                session.close_reason = session.close_reason or f"protocol error: {exc}"
            session.client_lost()

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
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

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
            self._waiter = self._loop.create_future()
            await self._waiter
            self._waiter = None

    async def read(self, limit: int) -> bytes:
        """Raw bytes for a plugin-driven sub-negotiation."""
        while not self.conn.buffered:
            if self.eof or self.closed:
                return b""
            self._waiter = self._loop.create_future()
            await self._waiter
            self._waiter = None
        return self.conn.take_subnegotiation_data(limit)

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)


class AuthChannel:
    """What a ``socksflow_subnegotiate`` plugin uses to talk to the client."""

    __slots__ = ("_client",)

    def __init__(self, client: ClientProtocol) -> None:
        self._client = client

    async def read(self, limit: int = 65536) -> bytes:
        """Up to ``limit`` bytes; ``b""`` when the client has closed."""
        return await self._client.read(limit)

    async def readexactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = await self._client.read(n - len(data))
            if not chunk:
                raise asyncio.IncompleteReadError(data, n)
            data += chunk
        return data

    def write(self, data: bytes) -> None:
        self._client.write(data)


class Session:
    """One client connection, from accept to close, as plugins see it.

    Stable attributes: ``id``, ``client``, ``local``, ``config``, ``stash``, ``protocol`` (the
    front door: ``"socks5"``, ``"socks4"``, ``"http"``, ``"unknown"``; ``""`` before the first byte), ``method``,
    ``identity``, ``request``, ``destination`` (after rewrites), ``addresses`` (what the
    destination resolved to), ``remote`` (the address actually connected to), ``bound``,
    ``verdict``, ``decided_by``, ``reply``, ``bytes_up``, ``bytes_down`` (payload bytes, TCP
    or UDP), ``datagrams_up``, ``datagrams_down`` (UDP ASSOCIATE), ``started``,
    ``duration``, ``close_reason``, ``authenticated`` (``None`` when no credentials were
    checked, else whether they were accepted) and ``timings`` (seconds spent in the phases
    that took place: ``"handshake"`` from accept to the request, ``"resolve"`` in DNS,
    ``"connect"`` dialling the destination).
    """

    # Slots: a tunnel's session lives as long as the tunnel, and an instance dict of 30 keys
    # or more is not key-shared (1.5 KiB instead of 0.3).
    __slots__ = (
        "_client",
        "_client_closed",
        "_clock",
        "_expired",
        "_resolved",
        "_task",
        "addresses",
        "association",
        "authenticated",
        "bound",
        "client",
        "close_reason",
        "config",
        "decided_by",
        "destination",
        "ended",
        "id",
        "identity",
        "local",
        "method",
        "pm",
        "protocol",
        "remote",
        "reply",
        "request",
        "server",
        "started",
        "stash",
        "timings",
        "tunnel",
        "verdict",
    )

    def __init__(self, server: Server, client: ClientProtocol) -> None:
        self.id = f"{next(_ids):x}" if server.worker is None else f"w{server.worker}-{next(_ids):x}"
        self.server = server
        self.config: Config = server.config
        self.pm: HookCaller = self.config.hooks or server.pm  # without the dormant plugins' hooks
        self._client = client
        transport = client.transport
        self.client = Address.from_sockaddr(transport.get_extra_info("peername"))
        self.local = Address.from_sockaddr(transport.get_extra_info("sockname"))
        self.stash = Stash()
        self.method: int | None = None
        self.protocol = ""  # the front door: "socks5", "socks4" or "http" (from the first byte)
        self.identity: Identity = ANONYMOUS
        self.request: Request | None = None
        self.destination: Address | None = None
        self.addresses: tuple[IPAddress, ...] | None = None
        self.remote: Address | None = None
        self.bound: Address | None = None
        self.verdict: Verdict | None = None
        self.decided_by = ""
        self.reply: Reply | None = None
        self.close_reason = ""
        self.authenticated: bool | None = None
        self.timings: dict[str, float] = {}
        self.started = time.time()
        self._clock = time.monotonic()
        self.ended: float | None = None
        self.tunnel: Tunnel | None = None
        self.association: Association | None = None  # UDP ASSOCIATE
        self._task: asyncio.Task[None] | None = None
        self._expired = False  # the deadline of _within cancelled the task
        self._client_closed = False
        self._resolved: dict[str, tuple[IPAddress, ...]] = {}

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.client} -> {self.destination}>"

    @property
    def bytes_up(self) -> int:
        relay = self.tunnel or self.association
        return relay.bytes_up if relay else 0

    @property
    def bytes_down(self) -> int:
        relay = self.tunnel or self.association
        return relay.bytes_down if relay else 0

    @property
    def datagrams_up(self) -> int:
        return self.association.datagrams_up if self.association else 0

    @property
    def datagrams_down(self) -> int:
        return self.association.datagrams_down if self.association else 0

    @property
    def duration(self) -> float:
        return (self.ended or time.time()) - self.started

    def abort(self) -> None:
        """End the session now, whatever its phase (shutdown past its deadline)."""
        if self.tunnel is not None:
            self.tunnel.abort()
            return
        if self._task is not None:
            self._task.cancel()
        if self._client is not None:
            self._client.transport.abort()

    # ------------------------------------------------------------------ resolution

    async def resolve(self, host: str | None = None, port: int | None = None) -> tuple[IPAddress, ...]:
        """The addresses ``host`` (default: the destination) resolves to, looked up once per session.

        Raises :class:`~socksflow.errors.ResolveError` when the name does not resolve.
        """
        if host is None:
            assert self.destination is not None
            if not self.destination.is_domain:
                return (self.destination.host,)  # type: ignore[return-value]
            host, port = self.destination.host, self.destination.port  # type: ignore[assignment]
        cached = self._resolved.get(host)
        if cached is None:
            began = time.monotonic()
            try:
                cached = await self.server.resolve(self, host, port or 0)
            finally:
                self.timings["resolve"] = self.timings.get("resolve", 0.0) + time.monotonic() - began
            if len(self._resolved) >= MAX_REMEMBERED_NAMES:  # a UDP client spraying names starts over
                self._resolved.clear()
            self._resolved[host] = cached
        return cached

    def resolved(self, host: str) -> tuple[IPAddress, ...] | None:
        """What ``host`` resolved to in this session, if it was looked up already (no waiting)."""
        return self._resolved.get(host)

    # ------------------------------------------------------------------ the session

    def start(self) -> None:
        self._task = self.server.loop.create_task(self._run())

    async def _run(self) -> None:
        client = self._client
        try:
            await self._accept()
            # One deadline for greeting, authentication and request, plugin hooks included.
            handshake = self.config.timeouts.handshake
            request = await self._within(handshake * (1 + DEADLINE_SPREAD * random.random()), self._negotiate())
            assert isinstance(request, Request)
            self.request = request
            self.timings["handshake"] = time.monotonic() - self._clock
            self.destination = request.destination
            await self._dispatch(request)
        except SessionDenied:
            self._close()
        except ClientGone as exc:
            self._finish_handshake_failure(str(exc))
        except TimeoutError:
            self._finish_handshake_failure("handshake timed out")
        except ProtocolError as exc:
            if exc.response:
                client.write(exc.response)
            if isinstance(exc, protocol.RequestError):
                self.reply = exc.reply
            self._finish_handshake_failure(f"protocol error: {exc}")
        except PluginError as exc:  # a plugin fault outside the phases that map it to a reply
            log.error("session %s: %s", self.id, exc, exc_info=exc.__cause__)
            await self._report(exc)
            self._finish_handshake_failure(str(exc))
        except Exception as exc:  # the session boundary: nothing a client sends may crash the server
            log.exception("session %s: unexpected error", self.id)
            await self._report(exc)
            self._finish_handshake_failure(f"internal error: {exc!r}")
        finally:
            self._task = None
            self._maybe_ended()

    def client_lost(self) -> None:
        """The client's connection closed while the handshake protocol owned it."""
        self._client_closed = True
        self._maybe_ended()

    def _maybe_ended(self) -> None:
        # A session without a tunnel ends when both its task and its client connection are done.
        if self._task is None and self._client_closed and self.tunnel is None:
            self.server.session_ended(self)

    async def _report(self, error: Exception) -> None:
        await self.pm.notify("socksflow_session_error", self.config.timeouts.hook, session=self, error=error)

    def _finish_handshake_failure(self, reason: str) -> None:
        self.close_reason = self.close_reason or reason
        self._close()

    def _close(self) -> None:
        self._client.finish()

    async def _decide(self, hook: str, timeout: float | None = None, **kwargs: Any) -> Any:
        result, plugin = await self.pm.call_first(hook, timeout or self.config.timeouts.hook, **kwargs)
        if result is not None:
            self.decided_by = plugin
        return result

    async def _deny(self, reason: str, response: bytes = b"", error: Exception | None = None) -> None:
        """Send ``response`` (if any), record why, and end the session."""
        if error is not None:
            log.error("session %s: %s", self.id, error, exc_info=error.__cause__)
            await self._report(error)
        if response:
            self._client.write(response)
        self.close_reason = reason
        raise SessionDenied(reason)

    def _refused_by_fault(self, error: PluginError) -> None:
        """A decision hook raised and the session fails closed: record that as the plugin's denial."""
        self.verdict = Verdict.deny(f"plugin error in {error.hook}", reply=Reply.GENERAL_FAILURE)
        self.decided_by = error.plugin

    # ------------------------------------------------------------------ phases

    async def _accept(self) -> None:
        try:
            verdict = await self._decide("socksflow_client_connected", session=self)
        except PluginError as exc:
            self._refused_by_fault(exc)
            await self._deny("client refused: plugin failed", error=exc)
        if verdict is not None and not verdict.allowed:
            self.verdict = verdict
            await self._deny(f"client refused: {verdict.reason or self.decided_by}")

    async def _within(self, delay: float, awaitable: Awaitable[T]) -> T:
        """``await awaitable`` in the session's task, raising TimeoutError after ``delay`` seconds.

        What ``asyncio.timeout`` does, for less: one timer handle, no context manager, no lookups
        of the running loop and task (each a getpid(2)).  A cancellation that is not this
        deadline's (a shutdown) passes through as CancelledError.
        """
        timer = self.server.loop.call_later(delay, self._expire)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self._expired and self._task is not None and self._task.uncancel() == 0:
                raise TimeoutError from None
            raise
        finally:
            timer.cancel()
            self._expired = False

    def _expire(self) -> None:
        if self._task is not None:
            self._expired = True
            self._task.cancel()

    async def _negotiate(self) -> Request:
        """Greeting, method and its sub-negotiation; the request that follows."""
        client = self._client
        greeting = await client.next_event()
        door_request = None
        if not isinstance(greeting, protocol.Greeting):  # a one-request front door (socksflow.doors)
            door_request, greeting = greeting, doors.greeting_for(greeting)
        try:
            method = await self._decide("socksflow_select_method", session=self, offered=greeting.methods)
            if method is None:
                method = Method.NO_AUTH if Method.NO_AUTH in greeting.methods else Method.NO_ACCEPTABLE
            if method != Method.NO_ACCEPTABLE and method not in greeting.methods:
                raise PluginError(
                    self.decided_by, "socksflow_select_method", f"chose 0x{method:02x}, not offered"
                )
        except PluginError as exc:
            await self._deny("method selection failed", client.conn.send_method(Method.NO_ACCEPTABLE), exc)
        self.method = method
        client.write(client.conn.send_method(method))
        if method == Method.NO_ACCEPTABLE:
            raise SessionDenied(self._set_reason(f"no acceptable method among {list(greeting.methods)}"))
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
            return doors.request_for(self, door_request)
        return await client.next_event()  # type: ignore[return-value]

    def _set_reason(self, reason: str) -> str:
        self.close_reason = reason
        return reason

    async def _authenticate(self, credentials: protocol.UserPassAuth) -> None:
        conn = self._client.conn
        try:
            result = await self._decide(
                "socksflow_authenticate",
                session=self,
                username=credentials.username,
                password=credentials.password,
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
            self.verdict = result if isinstance(result, Verdict) else Verdict.deny(reason)
            self.identity = Identity(user)  # who tried, for the access log; never the password
            self.authenticated = False
            await self._deny(f"authentication failed for {user!r}: {reason}", conn.send_auth_status(False))
        self.identity = self._with_groups(result)
        self.authenticated = True
        self._client.write(conn.send_auth_status(True))

    async def login_result(self, method: int, user: str | None, accepted: bool) -> Verdict | None:
        """Report a login's outcome the moment the credentials were judged (every login path calls it).

        Calls :func:`~socksflow.hookspecs.socksflow_auth_result` on every plugin, so failures
        count when they happen, not when the session ends.  Returns the first denial (which then
        becomes ``self.verdict``) of an accepted login, or ``None`` when the outcome stands; a
        plugin that raises refuses the login (fail closed).  The caller answers the client.
        """
        try:
            answers = await self.pm.call_all_named(
                "socksflow_auth_result", self.config.timeouts.hook,
                session=self, method=method, user=user, accepted=accepted,
            )  # fmt: skip
        except PluginError as exc:
            self._refused_by_fault(exc)
            log.error("session %s: %s", self.id, exc, exc_info=exc.__cause__)
            await self._report(exc)
            return self.verdict
        for answer, plugin in answers:
            if accepted and isinstance(answer, Verdict) and not answer.allowed:
                self.verdict, self.decided_by = answer, plugin
                return answer
        return None

    def _with_groups(self, identity: Identity) -> Identity:
        # The groups section is the core's, so every plugin (rules, limits…) sees the same groups.
        extra = self.config.groups_of(identity.user)
        return Identity(identity.user, identity.groups | extra) if extra else identity

    async def _subnegotiate(self, method: int) -> None:
        conn = self._client.conn
        try:  # a multi-round exchange: bounded by the handshake deadline, not the hook timeout
            result = await self._decide(
                "socksflow_subnegotiate", None,
                session=self, method=method, channel=AuthChannel(self._client),
            )  # fmt: skip
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
            self.authenticated = False
            reason = result.reason if isinstance(result, Verdict) and result.reason else "not authenticated"
            self.verdict = result if isinstance(result, Verdict) else Verdict.deny(reason)
            await self._deny(f"method 0x{method:02x}: {reason}")
        if isinstance(result, Protected):  # the rest of the session travels in the method's frames
            client = self._client
            client.transport = protect(client.transport, result.protection, conn.take_subnegotiation_data())
            result = result.identity
        conn.finish_subnegotiation(True)
        self.identity = self._with_groups(result)
        self.authenticated = True

    async def _dispatch(self, request: Request) -> None:
        if request.command in tor.COMMANDS and not self.config.doors.tor_resolve:  # before any plugin sees it
            await self.fail(Reply.COMMAND_NOT_SUPPORTED, f"{request.command.name} is off (doors: tor_resolve)")
        try:
            verdict = await self._decide("socksflow_request", session=self, request=request)
            while verdict is not None and verdict.allowed and verdict.destination is not None:
                # A rewrite does not end the decision: the plugins after the rewriting one (the
                # rules among them) judge where the session would now go.
                self.destination = verdict.destination
                request = replace(request, destination=verdict.destination)
                following, plugin = await self.pm.call_first_after(
                    "socksflow_request",
                    self.config.timeouts.hook,
                    self.decided_by,
                    session=self,
                    request=request,
                )
                if following is None:
                    break  # nobody objects: the rewrite stands
                verdict, self.decided_by = following, plugin
        except PluginError as exc:
            self._refused_by_fault(exc)
            await self.fail(Reply.GENERAL_FAILURE, "request check failed: plugin error", exc)
        if verdict is not None:
            self.verdict = verdict
            if not verdict.allowed:
                await self.fail(verdict.reply, f"denied: {verdict.reason or verdict.rule or self.decided_by}")
            if verdict.destination is not None:
                self.destination = verdict.destination
            if verdict.addresses is not None:
                self.addresses = tuple(verdict.addresses)
        if request.command == Command.CONNECT:
            await self._connect()
        else:
            handler = self.server.command_handler(request.command)
            if handler is None:
                await self.fail(Reply.COMMAND_NOT_SUPPORTED, f"{request.command.name} is not supported")
            await handler(self)
            if self.tunnel is None:  # the command ended without handing the client to a tunnel
                self.close_reason = self.close_reason or "closed"
                self._close()

    async def fail(self, reply: Reply, reason: str, error: Exception | None = None) -> None:
        """Answer the request with a failure ``reply`` and end the session (raises SessionDenied)."""
        self.reply = reply
        conn = self._client.conn
        response = (
            conn.send_second_reply(reply) if conn.phase is protocol.Phase.DONE else conn.send_reply(reply)
        )
        await self._deny(reason, response, error)

    def send_reply(self, reply: Reply, bound: Address) -> None:
        """Send the (first) reply to the request: for commands that reply before relaying (BIND, UDP)."""
        self.reply = reply
        self._client.write(self._client.conn.send_reply(reply, bound))

    async def wait_client_closed(self) -> None:
        """Wait until the client closes its connection; bytes it sends meanwhile are discarded."""
        client = self._client
        while not (client.eof or client.closed):
            client.conn.trailing_data  # noqa: B018 - drop what arrived, keep the buffer bounded
            if client._paused:  # paused by a burst during the handshake: the EOF must still arrive
                client._paused = False
                client.transport.resume_reading()
            client._waiter = client._loop.create_future()
            await client._waiter
            client._waiter = None

    @property
    def client_transport(self) -> asyncio.Transport:
        return self._client.transport

    async def addresses_to_use(self) -> tuple[IPAddress, ...]:
        """The checked addresses of the destination (resolving it if nobody did yet)."""
        if self.addresses is None:
            try:
                self.addresses = await self.resolve()
            except ResolveError as exc:
                await self.fail(exc.reply, f"cannot resolve {self.destination.host}: {exc}")
            except PluginError as exc:
                await self.fail(Reply.HOST_UNREACHABLE, f"cannot resolve {self.destination.host}", exc)
            if not self.addresses:
                await self.fail(Reply.HOST_UNREACHABLE, f"{self.destination.host} has no address")
        return self.addresses

    async def _connect(self) -> None:
        verdict = self.verdict
        if verdict is not None and verdict.outbound not in (None, "direct") and self.addresses is None:
            ips: tuple[IPAddress, ...] = ()  # routed, and no rule needed the addresses: the upstream resolves
        else:
            ips = await self.addresses_to_use()
        targets = tuple(Address(ip, self.destination.port) for ip in ips)
        timeout = self.config.timeouts.connect
        began = time.monotonic()
        upstream = bound = None
        try:
            sock, _ = await self.pm.call_first(
                "socksflow_open_connection", timeout, session=self, addresses=targets
            )
            if isinstance(sock, tuple):  # an upstream's stream: BND is what its last hop reported
                sock, bound = sock
            if sock is None:
                if len(targets) == 1:  # the common case: the loop dials in one step
                    upstream = await self._within(timeout, _open(self.server.loop, targets[0]))
                else:
                    sock = await self._within(timeout, dial(targets))
        except PluginError as exc:
            cause = exc.__cause__
            if isinstance(cause, OutboundError):  # an upstream's own code, or why it was unreachable: no fault
                await self.fail(cause.reply, f"connect failed: {cause}")
            reply = reply_for_error(cause) if isinstance(cause, OSError) else Reply.GENERAL_FAILURE
            await self.fail(reply, f"connect failed: {exc}", exc)
        except (OSError, TimeoutError) as exc:
            await self.fail(reply_for_error(exc), f"connect to {self.destination} failed: {_describe(exc)}")
        self.timings["connect"] = time.monotonic() - began
        if upstream is None:
            await self.start_relay(sock, bound)
        else:
            await self._relay(upstream)

    async def start_relay(self, sock: socket.socket, bound: Address | None = None) -> None:
        """Reply success and hand the client and ``sock`` to a tunnel (CONNECT, BIND)."""
        try:
            _, upstream = await self.server.loop.create_connection(Pending, sock=sock)
        except OSError as exc:
            sock.close()
            await self.fail(reply_for_error(exc), f"connection lost: {_describe(exc)}")
        await self._relay(upstream, bound)

    async def _relay(self, upstream: Pending, bound: Address | None = None) -> None:
        transport = upstream.transport
        try:
            self.remote = Address.from_sockaddr(transport.get_extra_info("peername"))
            self.bound = bound or Address.from_sockaddr(transport.get_extra_info("sockname"))
        except (OSError, TypeError) as exc:  # the destination already closed: no addresses left
            transport.abort()
            await self.fail(Reply.GENERAL_FAILURE, f"connection lost: {_describe(exc)}")
        try:
            limiters = self.pm.call_all_sync("socksflow_relay_start", session=self)
        except PluginError as exc:
            transport.abort()
            await self.fail(Reply.GENERAL_FAILURE, "relay start failed: plugin error", exc)
        tunnel = Tunnel(self._tunnel_closed, self.server.transform_for(self), limiters)
        client = self._client
        if client.closed:  # the client left while we were connecting
            transport.close()
            raise ClientGone("client closed the connection before the reply")
        self.reply = Reply.SUCCEEDED
        client.write(self._reply_bytes(self.bound))
        self.tunnel = tunnel
        tunnel.start(client.transport, upstream, client.conn.trailing_data, client.eof)
        self._client = None  # type: ignore[assignment]  # the tunnel owns the transport now
        self.server.tunnel_started(self)

    def _reply_bytes(self, bound: Address) -> bytes:
        conn = self._client.conn
        if conn.phase is protocol.Phase.DONE:  # BIND's second reply
            return conn.send_second_reply(Reply.SUCCEEDED, bound)
        return conn.send_reply(Reply.SUCCEEDED, bound)

    def _tunnel_closed(self, tunnel: Tunnel) -> None:
        if tunnel.error is not None and not self.close_reason:
            self.close_reason = f"relay error: {_describe(tunnel.error)}"
        self.close_reason = self.close_reason or "closed"
        self.server.session_ended(self)


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


__all__ = ["AuthChannel", "ClientProtocol", "Direction", "Session"]
