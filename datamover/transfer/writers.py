"""Decoding, verifying and writing fetched small files in worker processes (stage).

A stage of many small files spends most of its interpreter time per file (a zstd frame, a
BLAKE3 digest, five system calls); `write_batch` does that for one batch in a worker process
(`procpool`), so batches are written on every core while the stage process fetches the next.
Each call opens the dataset root again, component by component without following symlinks,
and its directories as it needs them: nothing is cached between batches, so a directory the
stage process moved to the trash meanwhile cannot be written into. The stage process creates
every directory a batch needs before it hands the batch over.

Wire format (what pickles fast): a file is `(path, mode, mtime_ns, chunks)`; chunks are the
manifest's `ChunkRef`s, the same objects as in `ranges`, so each is pickled once.
"""

from __future__ import annotations

import os
from pathlib import Path

from datamover.domain.manifest import ChunkRef, Entry, Kind
from datamover.transfer import fsops
from datamover.transfer.fetch import Range, decode_ranges

WireFile = tuple[str, int, int, tuple[ChunkRef, ...]]


def write_batch(
    base: str,
    parts: tuple[str, ...],
    ranges: list[Range],
    blobs: list[bytes],
    files: list[WireFile],
) -> dict[str, int]:
    """Worker-process entry point: verify every chunk of `ranges` and write `files` (each
    under a temporary name, renamed into place with its mode and mtime). Return the
    directories made writable to do so (`TreeWriter.unlocked`: path -> mode before): the
    stage process gives them their mode back at the end, after every batch.

    Raises `Corrupt` naming the file whose chunk failed verification; a file is at its final
    path only when it was written completely.
    """
    owners = {c.digest: path for path, _, _, chunks in files for c in chunks}
    decoded = decode_ranges(ranges, blobs, owners)
    blobs.clear()
    # The stage process created the root; opened again here, never created.
    root_fd = fsops.open_root(Path(base), parts, create=False)
    writer = fsops.TreeWriter(root_fd, Path(base, *parts))
    try:
        for path, mode, mtime_ns, chunks in files:
            entry = Entry(path, Kind.FILE, mode, mtime_ns)
            writer.write_file(entry, [decoded[c] for c in chunks])
    finally:
        writer.close()
        os.close(root_fd)
    return writer.unlocked
