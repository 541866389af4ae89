"""A registry is a plain dict filled by a decorator; tests are generated from it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T], dict):
    """``name -> object`` with a decorator and an error that lists the known names."""

    def __init__(self, family: str):
        super().__init__()
        self.family = family

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self:
                raise ValueError(f"{self.family} {name!r} is registered twice")
            self[name] = obj
            return obj

        return deco

    def get_or_raise(self, name: str) -> T:
        if name not in self:
            raise KeyError(f"unknown {self.family} {name!r}; known: {', '.join(sorted(self))}")
        return self[name]
