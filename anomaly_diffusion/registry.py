"""Named extension points: one table per kind of choice (guidance targets, residuals, encodings).

A registry maps a name to an entry (a function and a one-line description). Config validation,
the CLI's choices and `--help` text, and evaluate's method keys are all derived from it, so a
new choice is one function plus one `register` call:

    RESIDUALS.register("squared", squared_residual, "sum_c (x_c - x_healthy_c)^2")
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from anomaly_diffusion.errors import ConfigError

F = TypeVar("F")


@dataclass(frozen=True)
class Entry(Generic[F]):
    """One registered choice: its name, its function and a one-line description for `--help`."""

    name: str
    function: F
    description: str


class Registry(Generic[F]):
    """An ordered table name -> `Entry`; the first entry registered is listed first."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[F]] = {}

    def register(self, name: str, function: F, description: str) -> F:
        """Add a choice (a new name; re-registering a name is a programming error)."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered already")
        self._entries[name] = Entry(name, function, description)
        return function

    def unregister(self, name: str) -> None:
        """Remove a choice (for tests that register a toy one)."""
        self._entries.pop(name, None)

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[F]]:
        return iter(tuple(self._entries.values()))

    def check(self, name: str, what: str | None = None) -> str:
        """The name itself if registered, else ConfigError '<what> must be one of a, b, got 'x''."""
        if name not in self._entries:
            raise ConfigError(f"{what or self.kind} must be one of {', '.join(self._entries)}, got {name!r}")
        return name

    def get(self, name: str, what: str | None = None) -> Entry[F]:
        """The entry of a registered name (see `check` for the error)."""
        return self._entries[self.check(name, what)]

    def help(self) -> str:
        """'a: first description; b: second description', for `--help` texts."""
        return "; ".join(f"{e.name}: {e.description}" for e in self._entries.values())
