"""Every hook socksflow calls, in the order a session meets them.

Conventions for all hooks:

* Hooks are called with keyword arguments; an implementation may accept fewer parameters
  than the spec lists (pluggy's opt-in arguments).
* **Decision hooks** (marked *first result*) are tried in pluggy's order (last registered
  first, ``tryfirst``/``trylast`` respected); ``None`` means "no opinion" and the first
  other answer wins.  Implementations after the winner are not called.
* ``async def`` implementations are awaited by socksflow (not by pluggy), with the phase's
  timeout, wherever a spec says *may be async*.
* A decision hook that raises or times out **fails closed**: the session gets the reply
  the spec names, the error is logged with the plugin's name, and the server keeps serving.
  Observer hooks that raise are logged and ignored.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import socket

    from socksflow.config import Config
    from socksflow.decisions import Identity, Verdict
    from socksflow.errors import ConfigError
    from socksflow.explain import ExplainQuery, Resolver
    from socksflow.protection import Protected
    from socksflow.protocol import Address, IPAddress, Request
    from socksflow.relay import Direction, Limiter
    from socksflow.server import Server
    from socksflow.session import AuthChannel, Session

hookspec = pluggy.HookspecMarker("socksflow")

# ============================================================================ lifecycle


@hookspec
def socksflow_configure(config: Config) -> bool | frozenset[str] | None:
    """Read and validate this plugin's section(s) of the configuration.

    When: each time a configuration is loaded — at start-up, on ``socksflow check``, and on
    every reload — before any session sees it.  A reload that fails validation is discarded
    and the old configuration stays in force, so build state for this configuration in
    ``config.stash``, never in module globals.

    :param config: the loaded file.  Claim a top-level section with
        ``config.section("name")`` (unclaimed sections are errors); its nodes carry file and
        line for :class:`~socksflow.errors.ConfigError` messages.

    Returns ``False`` when this configuration gives the plugin nothing to do (its section
    is absent): the plugin is then *dormant* for the sessions under this configuration, and
    none of its session hooks (those with a ``session`` argument) is called, so an
    unconfigured plugin costs nothing per session.  A set of hook names instead keeps only
    those session hooks called (a plugin with one duty left, such as a default limit).
    Otherwise ``None``.  Must be sync.
    Raising :class:`~socksflow.errors.ConfigError` reports a located error (use
    ``config.errors.capture()`` to report several); any other exception refuses the
    configuration naming this plugin.  Called once per load.
    """


@hookspec
def socksflow_exposure(config: Config) -> str | None:
    """Say how this plugin keeps unknown clients out, for a listener other hosts can reach.

    When: ``socksflow run`` is about to listen on an address that is not loopback (such as
    ``0.0.0.0``).  The core holds no policy, so it asks: when every plugin answers ``None``,
    anyone who reaches the address could relay through the proxy, and ``socksflow run``
    refuses to start unless told to serve an open proxy (``--allow-open-proxy``, or
    ``listen: {open_proxy: true}``).

    :param config: the configuration about to be served (after
        :func:`socksflow_configure` accepted it).

    Returns one line saying what keeps strangers out (``"auth: every client must log in"``),
    or ``None`` when this plugin does not restrict who may use the proxy.  Every plugin is
    called.  Must be sync.  Raising refuses the start, naming the plugin (fail closed).
    Called once per start.
    """


@hookspec
def socksflow_startup(server: Server) -> None:
    """Open long-lived resources (files, sockets, background tasks).

    When: after the first configuration was accepted and the listeners are bound, before
    the first client is accepted.

    :param server: the running server; ``server.config`` is the configuration in force and
        ``server.stash`` holds state that outlives reloads.

    Returns nothing.  May be async.  Raising stops the start-up with an error naming the
    plugin.  Called once per server.
    """


@hookspec
def socksflow_shutdown(server: Server) -> None:
    """Close what :func:`socksflow_startup` opened.

    When: after the listeners closed and the sessions drained (or the drain deadline passed).

    :param server: the stopping server.

    Returns nothing.  May be async.  Raising is logged; the other plugins still shut down.
    Called once per server.
    """


@hookspec
def socksflow_check(config: Config, resolve: Resolver) -> list[ConfigError] | None:
    """Run the configuration's own tests (``socksflow check``): e.g. the rules file's ``tests:``.

    When: ``socksflow check`` after :func:`socksflow_configure` accepted the file.

    :param config: the validated configuration.
    :param resolve: ``await resolve(host, port)`` resolves through the ``socksflow_resolve``
        hook, as a live session would.

    Returns the failures as located :class:`~socksflow.errors.ConfigError` objects (an empty
    list or ``None`` when everything passed), and adds the number of tests it ran to
    ``config.checks_run`` (``check`` says how many ran).  Every plugin is called.  May be async.
    Raising fails the check, naming the plugin.
    """


@hookspec
def socksflow_explain(config: Config, query: ExplainQuery, resolve: Resolver) -> list[str] | None:
    """Explain how this plugin would decide a hypothetical request (``socksflow explain``).

    When: ``socksflow explain``; no client is connected and nothing is dialled.

    :param config: the configuration in force.
    :param query: the request: ``client``, ``user``, ``command``, ``destination``.
    :param resolve: as for :func:`socksflow_check`.

    Returns lines of explanation (each rule tried and why it did or did not match, DNS
    answers used, the verdict and the reply code), or ``None`` when the plugin has no part in
    such decisions.  Every plugin is called.  May be async.  Raising is reported.
    """


# ============================================================================ accept


@hookspec(firstresult=True)
def socksflow_client_connected(session: Session) -> Verdict | None:
    """Decide whether to talk to a new client at all, before a byte is read.

    When: right after the TCP connection is accepted.

    :param session: the new session; ``session.client`` and ``session.local`` are set,
        nothing else yet.

    Returns a :class:`~socksflow.decisions.Verdict`: a denial closes the connection without
    an answer (SOCKS has none before the greeting); ``None`` is no opinion, and a session
    nobody refuses goes on.  *First result*, may be async.  Raising closes the connection and
    logs the plugin.  Called once per connection: keep it cheap (a set or trie look-up).
    """


# ============================================================================ method selection


@hookspec(firstresult=True)
def socksflow_select_method(session: Session, offered: tuple[int, ...]) -> int | None:
    """Choose the authentication method among those the client offered.

    When: after the greeting was read, before anything is sent back.

    :param session: the session.
    :param offered: the method codes from the greeting, in the client's order
        (:class:`~socksflow.protocol.Method` values and private 0x80–0xFE codes).

    Returns a method code from ``offered``, or ``Method.NO_ACCEPTABLE`` (0xFF) to refuse;
    ``None`` is no opinion.  When nobody answers, the core picks ``NO_AUTH`` if offered, else
    0xFF.  A code the client did not offer is a plugin fault.  *First result*, may be async.
    Raising (or a fault) sends ``05 FF`` and closes.  Called once per session.
    """


# ============================================================================ authentication


@hookspec(firstresult=True)
def socksflow_authenticate(session: Session, username: bytes, password: bytes) -> Identity | Verdict | None:
    """Check RFC 1929 username/password credentials.

    When: the client chose method 0x02 and sent its credentials; the status is not sent yet.

    :param session: the session (``session.client`` for per-address throttling).
    :param username: the raw username bytes (RFC 1929 sets no character set; 1–255 bytes,
        or 0 from broken clients).
    :param password: the raw password bytes.  Never log it.

    Returns an :class:`~socksflow.decisions.Identity` to accept, a denying
    :class:`~socksflow.decisions.Verdict` to reject (its reason is logged), or ``None`` for
    "not my user": when nobody accepts, the credentials are rejected.  *First result*, may be
    async.  Raising sends status ``01 01`` and closes.  Called once per session using 0x02.
    """


@hookspec(firstresult=True)
def socksflow_subnegotiate(
    session: Session, method: int, channel: AuthChannel
) -> Identity | Protected | Verdict | None:
    """Run the sub-negotiation of a method the core does not know (GSSAPI, private methods).

    When: the client was sent ``05 <method>`` for a method other than 0x00 and 0x02.

    :param session: the session.
    :param method: the chosen method code.
    :param channel: ``await channel.read(n)`` / ``await channel.readexactly(n)`` and
        ``channel.write(data)`` exchange the method's own messages with the client.

    Returns an :class:`~socksflow.decisions.Identity` when the client is authenticated, or a
    :class:`~socksflow.protection.Protected` (the identity and a per-message protection the
    rest of the session travels in: request, reply and relayed bytes); a denying
    :class:`~socksflow.decisions.Verdict` (or ``None`` from every plugin) to close
    the connection.  Send the method's own failure message before returning a denial.
    *First result*, may be async.  Raising closes the connection.  Called once per session
    using such a method.
    """


@hookspec
def socksflow_auth_result(session: Session, method: int, user: str | None, accepted: bool) -> Verdict | None:
    """Learn the outcome of a login the moment it is known, and refuse it if need be.

    When: every login path — RFC 1929 username/password, a sub-negotiated method (GSSAPI,
    private methods), and any other front door that checks credentials — calls it through
    :meth:`~socksflow.runner.Runner.login_result` as soon as the credentials were judged,
    before the client is told.  Not at session end: a client that keeps its connections open
    has its failures counted all the same (brute-force throttling belongs here).

    :param session: the session (``session.client`` for per-address throttling).
    :param method: the method code used (``Method.USERPASS``, ``Method.GSSAPI``…).
    :param user: the user name the client gave or proved (``None`` when the method failed
        before naming one).  Never a password.
    :param accepted: whether the credentials were right.

    Returns a denying :class:`~socksflow.decisions.Verdict` to refuse a login although the
    credentials were right (an address or account blocked for brute force): the client gets
    the login path's failure answer (``01 01`` for username/password) and the session ends.
    ``None`` lets the outcome stand.  Every plugin is called, in order, so each one sees every
    outcome; the first denial is the session's verdict.  May be async.  Raising refuses the
    login (fail closed).  Called once per login attempt.
    """


# ============================================================================ request


@hookspec(firstresult=True)
def socksflow_request(session: Session, request: Request) -> Verdict | None:
    """Allow, deny or rewrite a CONNECT, BIND or UDP ASSOCIATE request.

    When: after authentication, before any DNS look-up or outbound connection.  To judge
    the addresses a domain resolves to, ``await session.resolve()``: the answers are cached
    on the session and the connection goes to them (or to the subset returned in
    ``Verdict.allow(addresses=...)``) — never to a second look-up.

    :param session: the session (``session.identity``, ``session.client``).
    :param request: the request as the client sent it (``request.command``,
        ``request.destination``).  For UDP ASSOCIATE the destination is the address the
        client will send from, not a destination.

    Returns a :class:`~socksflow.decisions.Verdict`; ``None`` is no opinion, and a request
    nobody rules on is allowed (the core holds no policy).  *First result*, may be async,
    except that a rewrite (``Verdict.rewrite``) does not end the call: the implementations
    after the rewriting one are asked about the rewritten request, so the rules judge where
    the session would actually go.  Raising denies with REP 0x01 (general failure).
    Called once per session (and again, by the plugins after it, per rewrite).
    """


@hookspec(firstresult=True)
def socksflow_resolve(
    session: Session | None, host: str, port: int, config: Config
) -> list[IPAddress] | None:
    """Resolve a domain name to the addresses to connect or send to.

    When: a CONNECT or BIND destination, or a UDP datagram's destination, is a domain name
    (never an IP literal: those are parsed as IPs by the protocol layer).

    :param session: the session asking, or ``None`` when asked outside a session (e.g.
        ``socksflow explain``).
    :param config: the configuration to resolve by (the session's, or the one being
        checked or explained): where a resolver keeps its per-configuration state.
    :param host: the normalised name (lower case, no trailing dot, IDNA).
    :param port: the destination port (for SRV-style or per-port policies).

    Returns the addresses in preference order; an empty list means the name does not exist.
    ``None`` is no opinion; when nobody answers, the system resolver is used off the event
    loop.  Raise :class:`~socksflow.errors.ResolveError` for NXDOMAIN, SERVFAIL or time-outs.
    *First result*, may be async.  Raising sends REP 0x04 (host unreachable).  Called once
    per session (answers are cached on the session) and once per new UDP destination.
    """


@hookspec(firstresult=True)
def socksflow_open_connection(
    session: Session, addresses: tuple[Address, ...]
) -> socket.socket | tuple[socket.socket, Address] | None:
    """Dial the destination, or an upstream proxy that leads to it.

    When: the request was allowed and resolved.

    :param session: the session (``session.destination`` is the possibly rewritten target).
    :param addresses: the checked addresses to connect to, in order; empty when the verdict
        routes the session to an outbound (``Verdict.outbound``) and no rule needed the name
        resolved: the upstream resolves it.

    Returns a connected non-blocking :class:`socket.socket`, which the relay takes over, or
    ``(socket, bound)`` where ``bound`` is the address the client's reply carries (an
    upstream's BND); ``None`` lets the core dial (every address in turn, Happy Eyeballs).
    Raise :class:`OSError` to report a failure with its errno mapped to a reply code, or
    :class:`~socksflow.outbound.OutboundError` to send its ``reply`` (an upstream's own code).
    *First result*, may be async (the connect timeout applies).  Other exceptions send
    REP 0x01.  Called once per CONNECT session.
    """


# ============================================================================ relay


@hookspec
def socksflow_relay_start(session: Session) -> Limiter | None:
    """Hand the relay a limiter (bandwidth, quota) for this session.

    When: the CONNECT or BIND tunnel is about to start moving bytes, or the UDP association
    is about to answer (its datagrams are paced both ways too).

    :param session: the session, with its identity and destination final.

    Returns a :class:`~socksflow.relay.Limiter` or ``None``; every plugin is called and all
    limiters apply.  Must be sync.  Raising closes the session (fail closed).  Called once
    per tunnel: this is where per-session cost belongs, not in per-chunk hooks.
    """


@hookspec
def socksflow_relay_data(session: Session, direction: Direction, data: bytes) -> bytes | None:
    """Inspect or transform a chunk of relayed bytes.

    When: for every chunk read, in either direction.  **Costly**: a server with any
    implementation of this hook leaves the fast path for every tunnel.  On a forwarded HTTP
    request (absolute-form) the chunks are the messages as re-framed and sent on: a
    transformation must keep their framing.

    :param session: the session.
    :param direction: ``Direction.UP`` (client to destination) or ``Direction.DOWN``.
    :param data: the chunk as read (or as transformed by the previous plugin).

    Returns the bytes to pass on (``b""`` drops the chunk) or ``None`` to pass it unchanged;
    implementations are chained in call order.  Must be sync.  Raising closes the tunnel.
    """


@hookspec
def socksflow_session_end(session: Session) -> None:
    """Observe the end of a session, whatever happened (the access log hook).

    When: once per accepted connection, after both sides are closed: refused, failed,
    denied and completed sessions alike.  An HTTP proxy connection carrying absolute-form
    requests is one session per request (each decided on its own), each ending when its
    response has.

    :param session: the finished session: ``session.reply``, ``session.verdict``,
        ``session.decided_by``, ``session.bytes_up``/``bytes_down``, ``session.close_reason``,
        ``session.duration``.

    Returns nothing.  May be async.  Raising is logged and ignored.
    """


# ============================================================================ UDP


@hookspec(firstresult=True)
def socksflow_udp_datagram(session: Session, destination: Address, payload: bytes) -> Verdict | None:
    """Allow, deny or rewrite one datagram a client sends through a UDP association.

    When: for each datagram from the client, after its header was checked and before its
    destination is resolved.

    :param session: the UDP ASSOCIATE session.
    :param destination: where the client wants the datagram to go.
    :param payload: the datagram's payload.

    Returns a :class:`~socksflow.decisions.Verdict`: a denial drops the datagram (UDP has no
    error reply), a rewrite redirects it; ``None`` is no opinion (allowed).  *First result*,
    may be async (costly per datagram: prefer sync); as for requests, a rewrite is put to
    the implementations after the rewriting one.  Raising drops the datagram.
    """


# ============================================================================ BIND


@hookspec(firstresult=True)
def socksflow_bind(session: Session) -> Address | Verdict | None:
    """Choose where a BIND listens, or refuse it.

    When: a BIND request was allowed, before the listening socket is created.

    :param session: the BIND session; ``session.request.destination`` is the expected peer.

    Returns the :class:`~socksflow.protocol.Address` to listen on, a denying
    :class:`~socksflow.decisions.Verdict`, or ``None`` (listen on the control connection's
    local address, any port).  *First result*, may be async.  Raising sends REP 0x01.
    """


@hookspec(firstresult=True)
def socksflow_bind_peer(session: Session, peer: Address) -> Verdict | None:
    """Accept or refuse the host that connected to a BIND listener.

    When: a peer connected and passed the core's check against the request's address
    (``bind.peer_check``); the second reply is not sent yet.

    :param session: the BIND session.
    :param peer: the connecting host's address.

    Returns a :class:`~socksflow.decisions.Verdict`: a denial closes that connection and the
    wait for the expected peer goes on (until ``bind.timeout``); ``None`` is no opinion (the
    peer is accepted).  *First result*, may be async.  Raising ends the BIND with the second
    reply 0x01.  Called once per incoming connection that passed the core's check.
    """


# ============================================================================ errors


@hookspec
def socksflow_session_error(session: Session, error: Exception) -> None:
    """Observe a failure inside a session: a plugin fault, a protocol error, an I/O error.

    When: as the failure is handled, before :func:`socksflow_session_end`.

    :param session: the session.
    :param error: the exception (a :class:`~socksflow.errors.PluginError` names the plugin).

    Returns nothing.  May be async.  Raising is logged and ignored.
    """


ALL_HOOKS: tuple[str, ...] = tuple(name for name in dict(globals()) if name.startswith("socksflow_"))
SESSION_HOOKS: frozenset[str] = frozenset(
    name for name in ALL_HOOKS if "session" in inspect.signature(globals()[name]).parameters
)  # what a dormant plugin is not asked (see socksflow_configure)
SYNC_ONLY_HOOKS: frozenset[str] = frozenset(
    {"socksflow_configure", "socksflow_exposure", "socksflow_relay_start", "socksflow_relay_data"}
)
