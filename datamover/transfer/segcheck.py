"""Previous segments found unchanged in worker processes: a re-push's walk over many cores.

A re-push walks the whole tree and compares every entry with the previous version's, one
after another: `lstat`, the decoded previous entry, the comparison, about 15 us an entry in
the interpreter, so a no-op re-push of 600 million files would take more than two hours on
one core. Most of a re-pushed tree is unchanged, a segment (8,192 entries) at a time, and
each segment names its first and last paths: the part of the walk it covers is known before
the walk gets there.

So the push hands the segments ahead of its walk to its worker processes
(`Scanner.check_ahead`). A worker walks that part of the tree alone (`Walker.skip`, then
`Walker.stop_after`), with the same scanner merging it with the segment's entries, and
answers with what the push needs of a segment found unchanged (`scan.Unchanged`), or None.
When the push's own walk reaches the segment's first path, it takes the answer: it passes
over the segment's entries without looking at them, and the previous stream skips them
without decoding them. Anything else (a change, an error, a special file the strict walk
would count, a cache file that is not the segment) makes the answer None: the walk then
goes through the segment itself, exactly as without workers, and meets the change or the
error there. So the manifest published is the one a walk without workers would make.

A worker looks at the tree earlier than the push's walk would have, by at most a window of
segments: as a walk without workers, it reports each file as it was at some moment of the
push, after the push began (which is when the site's record says the tree held the version
from: `replicas.held_since_ns`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import blake3

from datamover.chunking.chunker import ChunkerParams
from datamover.errors import DatamoverError
from datamover.repo.manifest import SegmentRef, decode_segment
from datamover.transfer.readers import TreeRoot
from datamover.transfer.reuse import pack_ends
from datamover.transfer.scan import SameSegment, Scanner, Unchanged

__all__ = ["check"]


def check(
    root: TreeRoot,
    cached: str,
    ref: SegmentRef,
    params: ChunkerParams,
    links: Callable[[str], str],
    changed_since_ns: int | None,
    lookup_threads: int,
) -> Unchanged | None:
    """Whether the part of the tree at `root` that previous segment `ref` covers (its
    first path to its last) is unchanged from the segment, whose bytes are in the manifest
    cache at `cached`: what the push needs of it if so, else None. `params`, `links`,
    `changed_since_ns` and `lookup_threads` are the push's scanner's. Runs in a worker
    process."""
    try:
        data = Path(cached).read_bytes()
    except OSError:
        return None
    if len(data) != ref.stored_size or blake3.blake3(data).digest() != ref.digest:
        return None  # the walk here meets what is wrong (`Repository.iter_cached`)
    scanner = Scanner(
        root,
        itertools.chain([ref], decode_segment(data)),
        params,
        workers=0,
        links=links,
        changed_since_ns=changed_since_ns,
        lookup_threads=lookup_threads,
    )
    try:
        scanner.walker.skip(tuple(ref.first_path.split("/")), inclusive=False)
        scanner.walker.stop_after(tuple(ref.last_path.split("/")))
        same = scanner.whole()
        if same is None or same.entries is None or scanner.walker.skipped_special_count:
            return None
        return _unchanged(ref, same)
    except (DatamoverError, OSError):
        return None
    finally:
        scanner.close()


def _unchanged(ref: SegmentRef, same: SameSegment) -> Unchanged | None:
    """What the push needs of `same`, the segment found unchanged; None unless its entries
    add up to the segment's line in the manifest list (the walk without workers fails
    there)."""
    entries = same.entries
    assert entries is not None
    files, dirs, symlinks, nbytes = same.counts()
    if (
        len(entries) != ref.entries
        or entries[0].path != ref.first_path
        or entries[-1].path != ref.last_path
        or nbytes != ref.bytes
    ):
        return None
    return Unchanged(files, dirs, symlinks, nbytes, tuple(pack_ends(entries).items()))
