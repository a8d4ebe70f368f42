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


class Stash:
    """Maps :class:`StashKey` objects to values of the key's type.

    ``get`` is the underlying dict's own method, bound once: plugins read a session's, its
    configuration's and its server's stash a dozen times per session, and a Python method
    (with ``typing.cast``) around ``dict.get`` cost two calls each time.
    """

    __slots__ = ("_data", "get")

    def __init__(self) -> None:
        self._data: dict[StashKey, Any] = {}
        self.get = self._data.get  # type: ignore[method-assign]

    if TYPE_CHECKING:

        def get(self, key: StashKey[T], default: T | None = None) -> T | None:
            """The value stored under ``key``, or ``default``."""

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._data[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return self._data[key]  # type: ignore[no-any-return]

    def setdefault(self, key: StashKey[T], default: T) -> T:
        return self._data.setdefault(key, default)  # type: ignore[no-any-return]

    def __contains__(self, key: StashKey) -> bool:
        return key in self._data

    def __delitem__(self, key: StashKey) -> None:
        del self._data[key]
