"""Typed per-object storage for plugins (pytest's Stash idea): no attributes set on shared objects."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar

T = TypeVar("T")


class StashKey(Generic[T]):
    """A key for :class:`Stash`; create one per kind of value, at module level."""

    __slots__ = ("name",)

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"StashKey({self.name!r})"


class Stash(dict[StashKey, Any]):
    """Maps :class:`StashKey` objects to values of the key's type.

    A ``dict`` itself, not a wrapper around one: every session has a stash, and an empty dict
    subclass is one 64-byte object where a wrapper, its dict and a bound ``get`` were three
    (184 bytes per idle tunnel).  ``get`` is then ``dict.get``, one C call, as plugins need it:
    they read a session's, its configuration's and its server's stash a dozen times per session.
    Compared, hashed and shown by identity, as before (two empty stashes are not equal).
    """

    __slots__ = ()

    __eq__ = object.__eq__  # type: ignore[assignment]
    __ne__ = object.__ne__  # type: ignore[assignment]
    __hash__ = object.__hash__  # type: ignore[assignment]
    __repr__ = object.__repr__  # type: ignore[assignment]

    if TYPE_CHECKING:

        def get(self, key: StashKey[T], default: T | None = None) -> T | None:  # type: ignore[override]
            """The value stored under ``key``, or ``default``."""

        def __setitem__(self, key: StashKey[T], value: T) -> None: ...

        def __getitem__(self, key: StashKey[T]) -> T: ...

        def setdefault(self, key: StashKey[T], default: T) -> T:  # type: ignore[override]
            ...

        def __contains__(self, key: object) -> bool: ...

        def __delitem__(self, key: StashKey) -> None: ...
