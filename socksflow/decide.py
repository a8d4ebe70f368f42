"""Where a request or a datagram goes: the one decision path for CONNECT, BIND and UDP datagrams.

The plugins answer in call order (``socksflow_request`` for a request, ``socksflow_udp_datagram``
for a datagram).  A rewrite does not end the decision: the plugins after the rewriting one
(the rules among them) judge where the traffic would now go, and so on for each rewrite.  The
result is one :class:`Decision`: the verdict, the destination after rewrites, who decided —
and, for routing, the outbound it leaves by.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from socksflow.decisions import Verdict
from socksflow.protocol import Address, IPAddress, Reply

Answer = tuple[Verdict | None, str]
Ask = Callable[[Address, "str | None"], "Answer | Awaitable[Answer]"]
"""``ask(destination, after)``: the first answer about ``destination`` from the plugins after
``after`` (all of them when ``None``)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of deciding one destination."""

    verdict: Verdict | None  # None: no plugin had an opinion, which allows
    destination: Address  # after rewrites
    decided_by: str = ""  # the plugin whose verdict stands ("" when none)
    rewritten: bool = False
    outbound: str | None = None  # where routing sends it; None is the direct path

    @property
    def allowed(self) -> bool:
        return self.verdict is None or self.verdict.allowed

    @property
    def addresses(self) -> tuple[IPAddress, ...] | None:
        """The resolved addresses the verdict restricts the connection to, if it does."""
        if self.verdict is None or self.verdict.addresses is None:
            return None
        return tuple(self.verdict.addresses)

    @property
    def as_asked(self) -> bool:
        """Whether it goes where the client asked, to whatever the name resolves to."""
        return not self.rewritten and self.addresses is None

    @property
    def reply(self) -> Reply:
        return Reply.SUCCEEDED if self.verdict is None else self.verdict.reply

    def why(self) -> str:
        """What a denial is logged with."""
        verdict = self.verdict
        return (verdict.reason or verdict.rule) if verdict is not None else ""


def final(answer: Answer, destination: Address) -> Decision | None:
    """The decision the first answer makes on its own; ``None`` when it rewrites (then :func:`decide`)."""
    verdict, plugin = answer
    if verdict is not None and verdict.allowed and verdict.destination is not None:
        return None
    return Decision(verdict, destination, plugin, outbound=verdict.outbound if verdict is not None else None)


async def decide(ask: Ask, destination: Address, answer: Answer | None = None) -> Decision:
    """Decide ``destination``, from the first plugin's ``answer`` (asked here when not given).

    Raises :class:`~socksflow.errors.PluginError` when a plugin fails (the caller fails closed).
    """
    if answer is None:
        first = ask(destination, None)
        answer = await first if inspect.isawaitable(first) else first  # type: ignore[assignment]
    verdict, plugin = answer  # type: ignore[misc]
    rewritten = False
    while verdict is not None and verdict.allowed and verdict.destination is not None:
        destination, rewritten = verdict.destination, True
        following = ask(destination, plugin)
        judged, by = await following if inspect.isawaitable(following) else following  # type: ignore[misc]
        if judged is None:
            break  # nobody objects: the rewrite stands
        verdict, plugin = judged, by
    outbound = verdict.outbound if verdict is not None else None
    return Decision(verdict, destination, plugin, rewritten, outbound)
