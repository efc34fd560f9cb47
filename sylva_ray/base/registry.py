"""A name -> entry registry that refuses duplicates (the peft / timm habit), one type for every kind.

Datasets, partitioners, attacks, aggregation rules, adversary behaviours and algorithms are chosen
by name from the config, so adding one is a decorated function (or class) in its own module, not
another ``elif`` in a driver, nor another name in a side table. A kind whose entries carry facts
the engine asks about (a dataset reads ``data.root``; a rule records a selection) registers
*specs*: frozen dataclasses whose first field is the function, built by the same decorator::

    @DATASETS.register("my_data", reads_root=True)
    def load_my_data(cfg: DataConfig) -> DataSource: ...

The configuration fields that name an entry carry the registry's kind (``base.config.registry_kind``),
so the texts that list the choices are made from the registry (``choices``), never typed by hand.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to entries of one kind; a second registration of a name is an error.

    ``spec``: the entries' type, where entries are specs. ``@register(name, **facts)`` on a
    function then stores ``spec(function, **facts)`` (and still returns the function); a value that
    is already a ``spec`` is stored as it is; anything else is refused. Without ``spec`` the
    decorated function, class or value is the entry.
    """

    def __init__(self, kind: str, spec: Optional[type] = None) -> None:
        self.kind = kind
        self.spec = spec
        self._items: dict[str, T] = {}

    def register(self, name: str, **facts: Any) -> Callable[[Any], Any]:
        """Decorator: register the function, class or value under ``name`` (with a spec's ``facts``)."""
        if facts and self.spec is None:
            raise TypeError(f"{self.kind} entries carry no facts; got {sorted(facts)}")

        def decorator(obj: Any) -> Any:
            self._refuse_taken(name)
            entry = obj if self.spec is None or isinstance(obj, self.spec) else self.spec(obj, **facts)
            self.add(name, entry)
            return obj

        return decorator

    def add(self, name: str, entry: T) -> T:
        """Register a ready entry under ``name``."""
        self._refuse_taken(name)
        if self.spec is not None and not isinstance(entry, self.spec):
            raise TypeError(f"a {self.kind} entry must be a {self.spec.__name__}, got {type(entry).__name__}")
        self._items[name] = entry
        return entry

    def _refuse_taken(self, name: str) -> None:
        if name in self._items:
            raise ValueError(
                f"{self.kind} {name!r} is already registered (by {_origin(self._items[name])}); "
                "register yours under another name"
            )

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; {self.choices()}") from None

    def find(self, name: str) -> Optional[T]:
        """The entry, or None for a name nobody registered."""
        return self._items.get(name)

    def names(self) -> list[str]:
        return sorted(self._items)

    def registered(self) -> list[str]:
        """Names in the order they were registered (a module's own listing order)."""
        return list(self._items)

    def choices(self) -> str:
        """The text that ends an unknown name's message: ``choose one of [...]``, from the registry."""
        return f"choose one of {self.names()}"

    def unknown(self, where: str, value: str) -> str:
        """A configuration problem for a name this registry does not hold."""
        return f"{where} = {value!r}: unknown; {self.choices()}"

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


def _origin(entry: Any) -> str:
    """The module an entry (a spec: its function) was defined in, for the duplicate's message."""
    if dataclasses.is_dataclass(entry) and not isinstance(entry, type):
        entry = next((v for v in (getattr(entry, f.name) for f in dataclasses.fields(entry)) if callable(v)), entry)
    return getattr(entry, "__module__", None) or "?"
