"""One registry shape for every kind: norms, gradient policies, architectures.

A registry is a dict, a ``register`` decorator that refuses duplicates, ``get`` and ``names``.
Other packages add entries through an entry-point group (``hatnorm.norms``,
``hatnorm.policies``, ``hatnorm.architectures``): each entry point names a module that registers
its entries with the decorators when imported.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name → entry mapping for one kind of component.

    Args:
        kind: what the entries are, for messages (``"norm"``).
        group: the entry-point group third-party packages register through.
    """

    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self._entries: dict[str, T] = {}
        self._plugins_loaded = False

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name``; a name already taken is a ``ValueError``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"name: the {self.kind} name {name!r} is already registered; "
                             f"pick a name not in {sorted(self._entries)}")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """The entry registered under ``name``; an unknown name is a ``ValueError`` listing the known ones."""
        self._load_plugins()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"name: unknown {self.kind} {name!r}; registered: {self.names()}") from None

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _load_plugins(self) -> None:
        # Importing a plugin module registers its entries; do it once, on first use, so that
        # importing hatnorm never imports third-party code.
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for point in entry_points(group=self.group):
            point.load()


def check_callable(entry: object, kind: str) -> None:
    """Refuse a registry entry that cannot be called to build the component."""
    if not callable(entry):
        raise TypeError(f"the registered {kind} must be a class or function that builds it, got {entry!r}")

