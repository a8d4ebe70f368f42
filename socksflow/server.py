"""Listeners, the session registry, reload and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import time
from collections.abc import Awaitable, Callable, KeysView
from typing import TYPE_CHECKING

from socksflow import app, bind, resolution, tor, udp
from socksflow.accept import Acceptor, SpareDescriptor, backlog, listening_socket
from socksflow.config import Config, StateSettings
from socksflow.errors import ConfigErrors
from socksflow.hooks import Hooks
from socksflow.peers import Peers
from socksflow.protocol import Address, Command
from socksflow.proxied import ProxiedProtocol
from socksflow.resolution import Resolver
from socksflow.runner import ClientProtocol, CommandHandler, Runner
from socksflow.session import Session
from socksflow.sharedstate import SharedTable
from socksflow.stash import Stash
from socksflow.workers import Group

if TYPE_CHECKING:
    from socksflow.plugins import PluginManager
    from socksflow.redisstate import RedisState

log = logging.getLogger("socksflow.server")

# Young-generation threshold of the garbage collector in a serving process (CPython's default:
# 700).  Sessions free their objects by refcount; but objects still alive when a collection
# runs make the next ones come sooner (the count restarts at 0 and their frees are not
# counted), and with 100 sessions in flight that fed on itself: from 50 to 780 collections per
# 24,000 sessions, up to 7 us a session.  At 5000 the objects of 100 sessions in flight fit.
GC_YOUNG_THRESHOLD = 5000


class Server:
    """A running socksflow server: one plugin manager, one configuration in force at a time."""

    def __init__(
        self, config: Config, pm: PluginManager, *, worker: int | None = None, group: Group | None = None
    ) -> None:
        self.config = config
        self.pm = pm
        self._hooks: tuple[Config, Hooks] | None = None  # the hooks of the configuration in force
        self.worker = worker  # with --workers N: this process's number, 0 to N-1
        # With --workers N: the other workers (to ask for their share of the whole server's view),
        # and limit state shared with them; otherwise this process's own.
        self.peers: Peers | None = None
        self.shared_state = SharedTable(workers=1)
        if group is not None and worker is not None:
            self.peers = Peers(group.name, worker, group.workers)
            self.shared_state = group.table
            self.shared_state.worker = worker
        self._redis: RedisState | None = None
        # A second configuration decided beside the one in force, with no effect on traffic
        # (``socksflow run --shadow``): plugins that can compare their decisions do.
        self.shadow: Config | None = None
        self.stash = Stash()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start()
        self._runners: dict[Session, Runner] = {}
        # HTTP proxy connections kept alive between two forwarded requests: no session holds them.
        self.between_requests: set[ClientProtocol] = set()
        self.stopping = False
        self._settles_heap = False  # settle_heap() was called: again after each reload
        self.addresses: list[Address] = []
        self._listeners: list[Acceptor | asyncio.Server] = []
        self._spare: SpareDescriptor | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._drained = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        self._commands: dict[Command, CommandHandler] = {}
        self.register_command(Command.BIND, bind.handle)
        self.register_command(Command.UDP_ASSOCIATE, udp.handle)
        for command in tor.COMMANDS:
            self.register_command(command, tor.handle)

    @property
    def descriptors(self) -> SpareDescriptor | None:
        """The account of running out of file descriptors (``episodes``, ``refused``); None before start."""
        return self._spare

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind every listener, then run the plugins' start-up hooks."""
        self.loop = loop = asyncio.get_running_loop()
        self._spare = SpareDescriptor()
        own_accept = isinstance(
            loop, asyncio.SelectorEventLoop
        )  # its own accept loop spins out of descriptors
        try:
            for index, address in enumerate(self.config.listen):
                sock = listening_socket(address, reuse_port=self.worker is not None)
                bound = Address.from_sockaddr(sock.getsockname())
                factory = self._protocol_factory(index, bound)
                listener: Acceptor | asyncio.Server
                if own_accept:
                    listener = Acceptor(sock, factory, self._spare)
                else:
                    listener = await loop.create_server(factory, sock=sock, backlog=backlog())
                self._listeners.append(listener)
                self.addresses.append(bound)
        except OSError as exc:
            await self._close_listeners()
            if self._spare is not None:
                self._spare.close()
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(exc.errno, f"cannot listen on {address}: {reason}") from None
        if not own_accept:
            self._spare.watch(loop)
        if self.peers is not None:
            await self.peers.start()
        if self.config.state.redis is not None:
            await self._share_through_redis(self.config.state)
        await self.hooks.startup(self)
        if self.config.timeouts.idle:
            self._sweeper = loop.create_task(self._sweep_idle())

    def settle_heap(self) -> None:
        """Keep the garbage collector off what lives as long as the configuration does.

        For a process that serves (``socksflow run`` calls it once started, and it runs again
        after each reload): collect, then freeze what is left (modules, plugins, the
        configuration and its rule tables) out of every later collection, and collect the young
        generation less often (:data:`GC_YOUNG_THRESHOLD`).  Frozen objects are still freed by
        refcount; a reload unfreezes first, so the old configuration's cycles are collected.
        Process-wide: not for a process that runs other things (tests).
        """
        self._settles_heap = True
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])

    def _protocol_factory(self, index: int, bound: Address) -> Callable[[], asyncio.Protocol]:
        """What serves a connection on the ``index``-th listener, bound to ``bound`` (behind a
        balancer: its header first)."""
        protocols = self.config.protocols_at(index)
        settings = self.config.proxy_protocol_at(index)
        if settings is None:
            # A listener on one address is every client's local address: no sockname per session.
            local = None if bound.host.is_unspecified else bound  # type: ignore[union-attr]
            return functools.partial(ClientProtocol, self, protocols, local)
        return functools.partial(ProxiedProtocol, self, protocols, settings)

    async def _share_through_redis(self, settings: StateSettings) -> None:
        """Keep limit state in Redis, shared with every instance that points at it."""
        from socksflow.redisstate import RedisState  # redis-py is an optional dependency

        self._redis = RedisState(
            settings.redis, prefix=settings.prefix, fail_closed=settings.on_outage == "refuse"
        )
        await self._redis.start()
        self.shared_state = self._redis  # type: ignore[assignment]
        log.info("limit state shared through %s", settings.redis)

    async def stop(self, timeout: float | None = None) -> None:
        """Stop accepting; let sessions finish for up to ``timeout``; close the rest."""
        self.stopping = True
        await self._close_listeners()
        for client in list(self.between_requests):  # no new request starts a session now
            client.finish()
        timeout = self.config.timeouts.shutdown if timeout is None else timeout
        if self.sessions:
            log.info("waiting up to %gs for %d sessions to finish", timeout, len(self.sessions))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._drained.wait()
        if self.sessions:
            log.warning("closing %d sessions still open after %gs", len(self.sessions), timeout)
            self.abort_all()
            await asyncio.sleep(0)
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._background:  # session_end observers (the access log) run before the plugins shut down
            await asyncio.wait(self._background, timeout=self.config.timeouts.hook)
        await self.hooks.shutdown(self)
        if self.peers is not None:
            await self.peers.close()
        if self._redis is not None:
            await self._redis.close()
        if self._spare is not None:
            self._spare.close()

    @property
    def hooks(self) -> Hooks:
        """The typed hooks of the configuration in force (follows reloads: new sessions use the new one)."""
        config = self.config
        if self._hooks is None or self._hooks[0] is not config:
            self._hooks = (config, Hooks(config.hooks or self.pm, config.timeouts.hook))
        return self._hooks[1]

    def resolver(self, config: Config | None = None) -> Resolver:
        """Name resolution outside any session, under ``config`` (default: the one in force).

        For what judges a configuration before it is applied (the admin API's check and replay).
        """
        if config is None or config is self.config:
            return resolution.resolver(self.hooks, self.config)
        return resolution.resolver(Hooks(config.hooks or self.pm, config.timeouts.hook), config)

    @property
    def sessions(self) -> KeysView[Session]:
        """The sessions open now (a live view: copy it to keep it across awaits)."""
        return self._runners.keys()

    def end_session(self, session: Session, reason: str) -> bool:
        """End an open session now, whatever its phase, recording ``reason`` unless one was first.

        Returns whether the session was open (the admin API closes sessions by id).
        """
        runner = self._runners.get(session)
        if runner is None:
            return False
        runner.end(reason, now=True)
        return True

    def abort_all(self) -> None:
        """Close every session now."""
        for runner in list(self._runners.values()):
            runner.end("server shutdown", now=True)

    async def _close_listeners(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()

    async def reload(self, config: Config | None = None) -> bool:
        """Re-read the configuration file (or apply ``config``, validated already); a bad file is logged and the old one stays."""
        try:
            if config is None:
                config = app.load_config(self.config.file)
                if self.config.listen_override is not None:  # run --listen holds, whatever the file says
                    config.override_listen(
                        self.config.listen_override, self.config.listen_protocols, self.config.listen_proxy
                    )
                app.configure(self.pm, config)
        except ConfigErrors as exc:
            log.error("reload rejected, keeping the running configuration:\n%s", exc)
            return False
        if self.config.listen_override is None and (
            config.listen_in_file,
            config.listen_protocols,
            config.listen_proxy,
        ) != (self.config.listen_in_file, self.config.listen_protocols, self.config.listen_proxy):
            log.warning("listen addresses changed in %s: restart to apply them", config.file)
        if config.state != self.config.state:
            log.warning("the state section changed in %s: restart to apply it", config.file)
        self.config = config
        log.info("configuration reloaded from %s", config.file)
        if self._settles_heap:
            self.settle_heap()
        return True

    # ------------------------------------------------------------------ sessions

    def session_started(self, runner: Runner) -> None:
        self._runners[runner.session] = runner
        self._drained.clear()
        runner.start()

    def session_ended(self, runner: Runner) -> None:
        session = runner.session
        if self._runners.pop(session, None) is None:
            return
        session.ended = time.time()
        pending = runner.hooks.session_end(session)
        if pending is not None:  # only async observers cost a task
            self.spawn(pending)
        if not self._runners:
            self._drained.set()

    def spawn(self, coroutine: Awaitable[None]) -> None:
        """Run a background coroutine the server waits for on shutdown."""
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def register_command(self, command: Command, handler: CommandHandler) -> None:
        self._commands[command] = handler

    def command_handler(self, command: Command) -> CommandHandler | None:
        return self._commands.get(command)

    async def _sweep_idle(self) -> None:
        """Close tunnels in which no byte moved for the idle timeout (checked in quarters)."""
        interval = self.config.timeouts.idle / 4
        while True:
            await asyncio.sleep(interval)
            for runner in list(self._runners.values()):
                tunnel = runner.session.tunnel
                if tunnel is not None and tunnel.poll_idle() >= 4:
                    runner.end("idle timeout")
