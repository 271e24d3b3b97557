"""Name -> builder registries for models, attacks, defenses and datasets.

A new method is one file and one decorator::

    @DEFENSES.register("ft")
    def build_ft(...): ...
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

from .errors import NFTError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = (name or obj.__name__).lower()
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        key = name.lower()
        if key not in self._items:
            close = difflib.get_close_matches(key, list(self._items), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise NFTError(f"unknown {self.kind} {name!r}{hint} (choices: {', '.join(sorted(self._items))})")
        return self._items[key]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._items


MODELS: Registry = Registry("model")
ATTACKS: Registry = Registry("attack")
DEFENSES: Registry = Registry("defense")
DATASETS: Registry = Registry("dataset")
