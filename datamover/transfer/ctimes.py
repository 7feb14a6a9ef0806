"""Since when a tree is known to hold a version, in the terms of its file system's ctimes.

A push or stage records the moment its tree held a version (`replicas.held_since`, a push
checkpoint's `started_at`); a later push reads, and a later stage checks, every file whose
ctime is not before it (`unchanged_since`), whatever its size and mtime. The moment must
not be later than the ctime any change made after it gets: `moment` takes a tick off it.
Where a file system stamps ctimes in whole seconds (Lustre, ext4 with 128-byte inodes, some
NFS servers), a change later in a second gets that second's start: a file whose ctime is a
whole second is compared with the moment floored to its second. That is told per file, so
a mount of such a file system below a tree of finer ctimes is no exception; on a file
system of nanosecond ctimes one file in a billion is compared so, which only reads it.
The clock's lag and the granule are those `readers.settled` waits out for mtimes.
"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta

from datamover.transfer.readers import COARSE_NS, LAG_NS

#: The kernel stamps ctimes from its coarse clock, up to a tick behind the one `datetime.now`
#: reads (`readers.LAG_NS`): a change just after the moment must not look older than it.
SLACK = timedelta(microseconds=LAG_NS // 1000)
SECOND_NS = COARSE_NS


def whole_seconds(path: str) -> bool:
    """Whether the ctime of `path` is a whole second (one that cannot be read counts as
    whole): on a file system of finer ctimes, one in a billion is."""
    try:
        return os.stat(path).st_ctime_ns % SECOND_NS == 0
    except OSError:
        return True


def moment(at: datetime) -> datetime:
    """`at`, when the tree held a version, as the time to record: less `SLACK`. A file
    written in the tick before (the second, where ctimes are whole seconds) is read once
    more by the next push."""
    return at - SLACK


#: The moment since which every file of a tree never recorded here counts as changed (the
#: epoch: no file's ctime is before it): no record says what it holds (copied in with
#: `cp -a` or `rsync -a`, restored from a backup, a catalog lost), so size and mtime do not
#: tell a file holds an entry's bytes. A first stage records it as the time its tree held
#: a version until it ends `ready`, so that its rerun reads every file too.
NEVER = datetime(1970, 1, 1, tzinfo=UTC)
NEVER_NS = 0


def unchanged_since(ctime_ns: int, since_ns: int | None) -> bool:
    """Whether a file of ctime `ctime_ns` is unchanged since the recorded moment `since_ns`
    (None: not known, so it is): its ctime is before it, or before its second where the
    ctime is a whole second."""
    if since_ns is None:
        return True
    if ctime_ns % SECOND_NS == 0:
        since_ns -= since_ns % SECOND_NS
    return ctime_ns < since_ns


async def after_writes(path: str, wrote: bool) -> datetime:
    """The time to record for the tree at `path` once a stage's writes are over, now. Where
    ctimes are whole seconds (as `path`'s own shows) and the stage wrote anything, first
    wait for the next second (at most one): its own writes of this second would otherwise
    be no older than the time, and a short stage's every file read again by the next push
    (on a mount of such a file system below `path`, only what the stage wrote in its last
    second is). A change made while it waits is one made during the stage."""
    now = datetime.now(UTC)
    if wrote and whole_seconds(path):
        await asyncio.sleep(1 - now.microsecond / 1e6 + SLACK.total_seconds())
        now = datetime.now(UTC)
    return moment(now)
