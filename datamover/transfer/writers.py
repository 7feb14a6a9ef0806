"""Decoding, verifying and writing fetched small files in worker processes (stage).

A stage of many small files spends most of its interpreter time per file (a zstd frame, a
BLAKE3 digest, five system calls); `write_batch` does that for one batch in a worker process
(`procpool`), so batches are written on every core while the stage process fetches the next.
Each call opens the dataset root again, component by component without following symlinks,
and its directories as it needs them: nothing is cached between batches, so a directory the
stage process moved to the trash meanwhile cannot be written into. The stage process creates
every directory a batch needs before it hands the batch over.

Wire format (what pickles fast): a file is `(path, mode, mtime_ns, chunks, replaces)`; chunks
are the manifest's `ChunkRef`s, the same objects as in `ranges`, so each is pickled once;
`replaces` is the `(inode, size, mtime)` the walk saw of the file it replaces, or None
(`TreeWriter.make_way`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from datamover.domain.manifest import ChunkRef, Entry, Kind
from datamover.errors import Conflict
from datamover.transfer import fsops
from datamover.transfer.fetch import Range, decode_ranges

WireFile = tuple[str, int, int, tuple[ChunkRef, ...], tuple[int, int, int] | None]


class Written(NamedTuple):
    """What a worker's batch did besides writing its files: the directories it made
    writable (path -> mode before), the first `fsops.TRASHED_SAMPLE` paths it moved to the
    trash, and how many it moved there in all (more than the sample holds, possibly)."""

    unlocked: dict[str, int]
    trashed: list[str]
    trashed_count: int


class BatchFailed(Exception):
    """A worker's batch that failed after it made directories writable: the error, and
    those directories (path -> mode before), which the stage process must still give their
    mode back (its `_restore_modes`); a failure alone would lose them with the worker's
    `TreeWriter`. Pickled to the stage process as its two arguments."""

    def __init__(self, error: Exception, unlocked: dict[str, int]) -> None:
        super().__init__(error, unlocked)
        self.error = error
        self.unlocked = unlocked


def write_batch(
    base: str,
    parts: tuple[str, ...],
    ranges: list[Range],
    blobs: list[bytes],
    files: list[WireFile],
    trash: str | None = None,
    sparse: bool = False,
    trash_run: str | None = None,
    root_id: tuple[int, int] | None = None,
) -> Written:
    """Worker-process entry point: verify every chunk of `ranges` and write `files` (each
    under a temporary name, renamed into place with its mode and mtime; a file a user
    changed since the walk is moved into the directory `trash` first, and the mtime of
    `trash_run`, the run's directory above it, set to now; `Conflict` if the dataset's
    directory is not `root_id` any more). Return the directories made
    writable to do so (`TreeWriter.unlocked`: path -> mode before), which
    the stage process gives their mode back at the end, after every batch; and the paths
    moved to the trash, a sample of them with their count (`Written`). `sparse`: all-zero
    chunks become holes (`fsops.is_hole`).

    Raises `Corrupt` naming the file whose chunk failed verification; a file is at its final
    path only when it was written completely. A failure after a directory was made writable
    (a full disk, a trash move refused) is raised as `BatchFailed`, which carries it with
    those directories.
    """
    owners = {c.digest: f[0] for f in files for c in f[3]}
    decoded = decode_ranges(ranges, blobs, owners)
    blobs.clear()
    # The stage process created the root; opened again here, never created, and refused
    # unless it is still the directory the stage process holds (`root_id`: its device and
    # inode): one put in its place meanwhile would get this batch, the stage's own writes
    # the other, and the stage would end "ready" over a tree missing files.
    root_fd = fsops.open_root(Path(base), parts, create=False)
    if root_id is not None:
        st = os.fstat(root_fd)
        if (st.st_dev, st.st_ino) != root_id:
            os.close(root_fd)
            raise Conflict(
                f"the dataset's directory {str(Path(base, *parts))!r} was replaced while "
                "stage wrote it; nothing more was written there: stage again"
            )
    writer = fsops.TreeWriter(
        root_fd,
        Path(base, *parts),
        Path(trash) if trash else None,
        sparse=sparse,
        trash_run=Path(trash_run) if trash_run else None,
    )
    try:
        for path, mode, mtime_ns, chunks, replaces in files:
            entry = Entry(path, Kind.FILE, mode, mtime_ns)
            writer.write_file(entry, [decoded[c] for c in chunks], replaces)
    except Exception as exc:
        if writer.unlocked:
            raise BatchFailed(exc, writer.unlocked) from exc  # its frames reach the debug trace
        raise
    finally:
        writer.close()
        os.close(root_fd)
    return Written(writer.unlocked, writer.trashed, writer.trashed_count)
