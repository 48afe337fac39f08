"""A tiny name -> factory registry shared by distances, models, datasets, operations and baselines.

Unknown names raise with the list of what exists (timm's habit), so a typo in a config is
caught at once and the message says what would have worked. A registry filled by plugin modules
names them in `builtins`: the first lookup imports them, so `fipray.config` can list the operations
without importing the layers above it.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T", bound=Callable[..., Any])


class Registry(Generic[T]):
    """A dict of named factories with a decorator to fill it."""

    def __init__(self, kind: str, builtins: str | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._builtins = builtins

    def _load(self) -> None:
        if self._builtins is not None:
            name, self._builtins = self._builtins, None
            importlib.import_module(name)

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(fn: T) -> T:
            key = name or getattr(fn, "name", None) or fn.__name__
            if key in self._items and self._items[key] is not fn:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._items[key] = fn
            return fn

        return deco

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._items))}"
            ) from None

    def names(self, pattern: str = "*") -> list[str]:
        self._load()
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def items(self) -> Iterator[tuple[str, T]]:
        self._load()
        return iter(sorted(self._items.items()))

    def unregister(self, name: str) -> None:
        """Drop a name (tests that register a toy entry clean up after themselves)."""
        self._items.pop(name, None)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items
