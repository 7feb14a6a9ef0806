"""Terminal output for the CLI: human sizes, progress bars, one-line errors, JSON.

Progress bars appear only when stderr is a terminal and `--json` is off, so scripts and logs
see clean output. rich is imported lazily: it costs start-up time a hook cannot spare.
"""

from __future__ import annotations

import json
import sys
from types import TracebackType
from typing import Any


def human_bytes(n: float) -> str:
    """`1536` -> `1.5 KiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`1 pack`, `2 packs`; `plural` where it is not the noun and an s (`directories`)."""
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"


def emit_json(data: dict[str, Any]) -> None:
    """Print one JSON object on stdout."""
    sys.stdout.write(json.dumps(data, sort_keys=True) + "\n")
    sys.stdout.flush()


def error_line(message: str) -> None:
    """Print the one-line error on stderr."""
    sys.stderr.write(f"datamover: error: {message}\n")
    sys.stderr.flush()


class Bar:
    """A `Progress` for a terminal: files and bytes, with rate and ETA when totals are known."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled and sys.stderr.isatty()
        self._progress: Any = None
        self._task: Any = None
        self._files = 0

    def __enter__(self) -> Bar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TextColumn("{task.fields[files]} files"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=None, files=0)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def total(self, files: int | None, nbytes: int | None) -> None:
        """Set the totals when known."""
        if self._progress is not None and nbytes is not None:
            self._progress.update(self._task, total=nbytes)

    def advance(self, files: int, nbytes: int) -> None:
        """Advance the bar."""
        if self._progress is not None:
            self._files += files
            self._progress.update(self._task, advance=nbytes, files=self._files)
