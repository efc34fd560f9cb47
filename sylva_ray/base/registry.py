"""A name -> factory registry that refuses duplicates (the peft / timm habit).

Datasets, partitioners, attacks and aggregators are chosen by name from the config, so adding one
is a decorated function in its own module, not another ``elif`` in a driver.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    """Maps names to callables. ``@REG.register("name")`` adds one; a second "name" is an error."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(fn: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of {sorted(self._items)}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def registered(self) -> list[str]:
        """Names in the order they were registered (a module's own listing order)."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
