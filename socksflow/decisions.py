"""The values plugins answer with: verdicts on requests and identities from authentication."""

from __future__ import annotations

from dataclasses import dataclass, field

from socksflow.protocol import Address, IPAddress, Reply


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision on a session, a request or a datagram.

    Build with :meth:`allow`, :meth:`deny` or :meth:`rewrite`.  ``rule`` names what decided
    (``rules.yaml:12``) for logs and ``socksflow explain``; ``reason`` is free text for logs.
    ``outbound`` names the way out of an allowed session (``None``: direct); the plugin that
    owns outbounds dials it.
    """

    allowed: bool
    reply: Reply = Reply.SUCCEEDED
    reason: str = ""
    rule: str = ""
    destination: Address | None = None
    addresses: tuple[IPAddress, ...] | None = None
    outbound: str | None = None

    @classmethod
    def allow(
        cls,
        reason: str = "",
        *,
        rule: str = "",
        addresses: tuple[IPAddress, ...] | None = None,
        outbound: str | None = None,
    ) -> Verdict:
        """Allow; ``addresses`` restricts the connection to these resolved addresses, ``outbound``
        names the way out (``None``: direct)."""
        return cls(True, Reply.SUCCEEDED, reason, rule, None, addresses, outbound)

    @classmethod
    def deny(cls, reason: str = "", *, reply: Reply = Reply.NOT_ALLOWED, rule: str = "") -> Verdict:
        """Deny with ``reply`` (0x02, "not allowed by ruleset", unless told otherwise)."""
        if reply == Reply.SUCCEEDED:
            raise ValueError("a denial needs a failure reply code")
        return cls(False, Reply(reply), reason, rule)

    @classmethod
    def rewrite(cls, destination: Address, reason: str = "", *, rule: str = "") -> Verdict:
        """Allow, but go to ``destination`` instead of what the client asked for."""
        return cls(True, Reply.SUCCEEDED, reason, rule, destination)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the client proved to be."""

    user: str
    groups: frozenset[str] = field(default_factory=frozenset)

    def __str__(self) -> str:
        return self.user


ANONYMOUS = Identity("")
"""The identity of a session that used no authentication."""
