"""A name -> class table for the runtime's plug-in points (executors, scheduling policies): what
``EngineConfig`` accepts by name, and what a user adds to with ``register``."""
from __future__ import annotations

from typing import Callable


class Registry(dict):
    def __init__(self, kind: str, base: type, check: Callable[[str, type], None] | None = None):
        super().__init__()
        self.kind, self.base, self.check = kind, base, check

    def register(self, name: str, cls: type | None = None):
        """Register ``cls`` under ``name`` (usable as a decorator). Not a subclass of the base, or a
        name taken by another class, is a ``ValueError``."""
        def add(c):
            if not (isinstance(c, type) and issubclass(c, self.base)):
                article = "an" if self.kind[0] in "aeiou" else "a"
                raise ValueError(f"{article} {self.kind} must subclass {self.base.__name__}, got {c!r}")
            if name in self and self[name] is not c:
                raise ValueError(f"{self.kind} name {name!r} is taken by {self[name].__name__}")
            if self.check is not None:
                self.check(name, c)
            self[name] = c
            return c
        return add if cls is None else add(cls)

    def unregister(self, name: str) -> None:
        self.pop(name, None)

    def make(self, name: str, *args, **kwargs):
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; one of {', '.join(self)}")
        return self[name](*args, **kwargs)
