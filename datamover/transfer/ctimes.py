"""Since when a tree is known to hold a version, in the terms of its file system's ctimes.

A push or stage records the moment its tree held a version (`replicas.held_since`, a push
checkpoint's `started_at`); a later push reads, and a later stage checks, every file whose
ctime is not before it, whatever its size and mtime. The moment must not be later than the
ctime a change made after it gets: `held_since` makes it so.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

#: The kernel stamps ctimes from its coarse clock, up to a tick behind the one `datetime.now`
#: reads (10 ms at 100 Hz): a change just after the moment must not look older than it.
SLACK = timedelta(milliseconds=20)


def held_since(path: str, at: datetime) -> datetime:
    """`at`, a moment the tree at `path` held a version, as the time to record: less `SLACK`,
    and floored to the whole second where the file system stamps ctimes in whole seconds
    (Lustre, ext4 with 128-byte inodes, some NFS servers), as `path`'s own ctime shows (one
    that cannot be read counts as whole): there a change later in the same second gets that
    second's start. Each file written in the second before is then read once more by the
    next push; on a file system of finer ctimes, each written in the 20 ms before."""
    try:
        coarse = os.stat(path).st_ctime_ns % 1_000_000_000 == 0
    except OSError:
        coarse = True
    at -= SLACK
    return at.replace(microsecond=0) if coarse else at
