"""Mount points below a directory: what a move to the trash and the trash's emptying must
never take along or reach into.

A directory of a tree that a stage moves to the trash (`stage --delete`, or a directory the
version has a file in place of) may hold a mount point: a bind mount, an NFS or sshfs
mount, a scratch file system mounted into a project's tree. Renamed into the trash, the
mount would go with it, and emptying the trash would then delete the mounted file
system's files; moved to a trash on another file system (copied, then removed), its files
would be copied and removed one by one. Such a directory is refused, whole.

Mount points are read from `/proc/self/mountinfo` (this process's mount namespace: a bind
mount of the same file system shows nowhere else, not even in `st_dev`). Where that
cannot be read, `st_dev` checks in the walks that copy and remove (`crossfs.copy_tree`,
`trash.remove_tree`) still stop at another file system.
"""

from __future__ import annotations

import os
import re

_MOUNTINFO = "/proc/self/mountinfo"
_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """A mountinfo path field as a path: the kernel writes space, tab, newline and
    backslash as three-digit octal escapes."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mount_points() -> list[str]:
    """Every mount point of this process's mount namespace (empty where it cannot be
    read)."""
    try:
        with open(_MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
            return [_unescape(line.split(" ", 5)[4]) for line in f if line.count(" ") >= 5]
    except OSError:
        return []


def mounted_in(fd: int) -> str | None:
    """A mount point at or below the directory open as `fd` (its path), else None. The
    directory's path is the kernel's (`/proc/self/fd`), so neither a symlink on the way
    nor a rename since the open misleads it."""
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    if not path.startswith("/"):
        return None  # not reachable by a path (deleted, another namespace's)
    below = path.rstrip("/") + "/"
    for point in mount_points():
        if point == path or point.startswith(below):
            return point
    return None
