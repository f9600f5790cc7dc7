"""Where each file's last read or write ended: the sequential-access state shared by the layers."""

from __future__ import annotations

from typing import Generic, TypeVar

#: Files whose last request a layer remembers; past it the least recently used is let go
#: (its next request then counts as random: the worst a forgotten stream can cost).
MAX_TRACKED_STREAMS = 4096

State = TypeVar("State")


class FileStreams(Generic[State]):
    """Per-file state of the last request of each file, at most ``limit`` files.

    A layer takes a file's state when a request arrives and puts the new state
    back, which also makes that file the most recently used. Files are keyed by
    inode number, or by path where a layer remembers names (a lookup cache).

    Args:
        limit: most files remembered.
    """

    def __init__(self, limit: int = MAX_TRACKED_STREAMS) -> None:
        self._limit = limit
        self._state: dict[int | str, State] = {}  # insertion order = least recently used first

    def take(self, ino: int | str) -> State | None:
        """Remove and return the state of ``ino`` (None if not remembered)."""
        return self._state.pop(ino, None)

    def put(self, ino: int | str, state: State) -> None:
        """Remember ``state`` for ``ino`` as the most recently used file."""
        self._state.pop(ino, None)
        self._state[ino] = state
        if len(self._state) > self._limit:
            del self._state[next(iter(self._state))]

    def __len__(self) -> int:
        return len(self._state)
