"""Progress reporting: a tiny interface the CLI (and later the daemon) implements."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Receives totals once known and increments as work is done. Must be cheap."""

    def total(self, files: int | None, nbytes: int | None) -> None:
        """Announce totals (None: unknown, e.g. a push still walking)."""

    def advance(self, files: int, nbytes: int) -> None:
        """Count `files` more files and `nbytes` more bytes as done."""


class NoProgress:
    """Discards everything."""

    def total(self, files: int | None, nbytes: int | None) -> None:
        """Ignore."""

    def advance(self, files: int, nbytes: int) -> None:
        """Ignore."""
