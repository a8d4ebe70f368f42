"""What plugins may rely on in the objects their hooks receive: ``Session`` and ``Server``.

These are typing protocols, for annotations and documentation: the engine's own classes
satisfy them, and anything else a plugin is handed (a test double) may too.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from socksflow.config import Config
    from socksflow.decisions import Identity, Verdict
    from socksflow.protocol import Address, IPAddress, Reply, Request
    from socksflow.resolution import Resolver
    from socksflow.sharedstate import SharedTable
    from socksflow.stash import Stash


class Session(Protocol):
    """One client connection, as hooks see it (see ``docs/reference/hooks.md``)."""

    id: str
    client: Address
    local: Address
    config: Config
    server: Server
    stash: Stash
    protocol: str
    method: int | None
    identity: Identity
    authenticated: bool | None
    request: Request | None
    destination: Address | None
    addresses: tuple[IPAddress, ...] | None
    remote: Address | None
    bound: Address | None
    verdict: Verdict | None
    decided_by: str
    reply: Reply | None
    close_reason: str
    started: float
    timings: dict[str, float]

    @property
    def bytes_up(self) -> int: ...
    @property
    def bytes_down(self) -> int: ...
    @property
    def datagrams_up(self) -> int: ...
    @property
    def datagrams_down(self) -> int: ...
    @property
    def duration(self) -> float: ...
    @property
    def outcome(self) -> str | None: ...

    async def resolve(self, host: str | None = None, port: int | None = None) -> tuple[IPAddress, ...]:
        """The addresses ``host`` (default: the destination) resolves to, looked up once per session."""
        ...

    def resolved(self, host: str) -> tuple[IPAddress, ...] | None:
        """What ``host`` resolved to in this session already, without waiting."""
        ...


class Server(Protocol):
    """The running server, as ``socksflow_startup`` and ``socksflow_shutdown`` see it."""

    config: Config
    stash: Stash
    worker: int | None
    addresses: list[Address]
    shared_state: SharedTable  # limit state every worker of the server shares (see socksflow.sharedstate)

    @property
    def sessions(self) -> Collection[Session]:
        """The sessions open now (iterate, count, test membership; copy it to keep it)."""
        ...

    def resolver(self, config: Config | None = None) -> Resolver:
        """Name resolution outside any session, under ``config`` (default: the one in force)."""
        ...

    def end_session(self, session: Session, reason: str) -> bool:
        """End an open session now, whatever its phase, recording ``reason`` (the admin API's close)."""
        ...
