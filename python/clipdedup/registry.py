"""One registry pattern for decoders, encoders, matchers and keep strategies.

Each entry has a name, a priority (higher is tried first), an availability check that says why not,
and the function. An explicit name (a flag or an environment variable) wins; otherwise the best
available entry is picked.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from clipdedup.errors import UserError

T = TypeVar("T")


class UnavailableError(UserError):
    """A requested backend exists but cannot run here, or no such backend exists; the message says
    why, and the CLI prints it as one line (exit 2)."""


def always() -> str | None:
    return None


@dataclass
class Entry(Generic[T]):
    name: str
    fn: T
    priority: int = 0
    why_not: Callable[[], str | None] = always
    doc: str = ""

    def unavailable_reason(self) -> str | None:
        try:
            return self.why_not()
        except Exception as e:  # an import probe that blows up means: not available
            return f"{type(e).__name__}: {e}"


@dataclass
class Registry(Generic[T]):
    kind: str
    env_var: str | None = None
    entries: dict[str, Entry[T]] = field(default_factory=dict)
    _warned: set[str] = field(default_factory=set)

    def register(
        self,
        name: str,
        *,
        priority: int = 0,
        why_not: Callable[[], str | None] = always,
        doc: str = "",
    ) -> Callable[[T], T]:
        def deco(fn: T) -> T:
            self.add(name, fn, priority=priority, why_not=why_not, doc=doc)
            return fn

        return deco

    def add(
        self,
        name: str,
        value: T,
        *,
        priority: int = 0,
        why_not: Callable[[], str | None] = always,
        doc: str = "",
    ) -> None:
        """Registers `value` (a function, or a record of functions and data) under `name`."""
        self.entries[name] = Entry(name, value, priority, why_not, doc)

    def names(self) -> list[str]:
        return sorted(self.entries, key=lambda n: -self.entries[n].priority)

    def status(self) -> list[tuple[str, str | None, str]]:
        """(name, reason it is unavailable or None, doc) for every entry, best first."""
        return [(n, self.entries[n].unavailable_reason(), self.entries[n].doc) for n in self.names()]

    def explain_default(self) -> str:
        """One line saying which entry `get()` picks here and why: the environment override, or the
        first available by priority with the reason of every entry above it."""
        name = os.environ.get(self.env_var) or None if self.env_var else None
        if name is not None:
            why = self.entries[name].unavailable_reason() if name in self.entries else f"no such {self.kind}"
            return f"{name}, set by {self.env_var}" + (f", but not available here: {why}" if why else "")
        above: list[str] = []
        for n in self.names():
            why = self.entries[n].unavailable_reason()
            if why is None:
                line = f"{n}, the first available by priority"
                return line + (f" ({'; '.join(above)})" if above else "")
            above.append(f"{n}: {why}")
        return f"none: no {self.kind} is available ({'; '.join(above)})"

    def get(self, name: str | None = None) -> Entry[T]:
        """The entry called `name`, else the environment override, else the best available one."""
        if name is None and self.env_var:
            name = os.environ.get(self.env_var) or None
        if name is not None:
            if name not in self.entries:
                raise UnavailableError(f"unknown {self.kind} {name!r}; choose from {', '.join(self.names())}")
            entry = self.entries[name]
            why = entry.unavailable_reason()
            if why:
                raise UnavailableError(f"{self.kind} {name!r} is not available here: {why}")
            return entry
        for n in self.names():
            entry = self.entries[n]
            why = entry.unavailable_reason()
            if why is None:
                return entry
            if n not in self._warned and entry.priority > 0 and os.environ.get("CLIPDEDUP_VERBOSE"):
                self._warned.add(n)
                print(f"clipdedup: {self.kind} {n!r} unavailable ({why}); falling back", file=sys.stderr)
        raise UnavailableError(f"no {self.kind} is available")
