"""Typed per-object storage for plugins (pytest's Stash idea): no attributes set on shared objects."""

from __future__ import annotations

from typing import Generic, TypeVar, cast

T = TypeVar("T")


class StashKey(Generic[T]):
    """A key for :class:`Stash`; create one per kind of value, at module level."""

    __slots__ = ("name",)

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"StashKey({self.name!r})"


class Stash:
    """Maps :class:`StashKey` objects to values of the key's type."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[StashKey, object] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._data[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return cast(T, self._data[key])

    def get(self, key: StashKey[T], default: T | None = None) -> T | None:
        return cast("T | None", self._data.get(key, default))

    def setdefault(self, key: StashKey[T], default: T) -> T:
        return cast(T, self._data.setdefault(key, default))

    def __contains__(self, key: StashKey) -> bool:
        return key in self._data

    def __delitem__(self, key: StashKey) -> None:
        del self._data[key]
