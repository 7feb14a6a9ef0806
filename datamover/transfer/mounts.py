"""Mount points below a directory: what a move to the trash and the trash's emptying must
never take along or reach into.

A directory of a tree that a stage moves to the trash (`stage --delete`, or a directory the
version has a file in place of) may hold a mount point: a bind mount, an NFS or sshfs
mount, a scratch file system mounted into a project's tree. Renamed into the trash, the
mount would go with it, and emptying the trash would then delete the mounted file
system's files; moved to a trash on another file system (copied, then removed), its files
would be copied and removed one by one. Such a directory is refused, whole.

Mount points are read from `/proc/self/mountinfo` (this process's mount namespace: a bind
mount of the same file system shows nowhere else, not even in `st_dev`). The walks that
copy and remove (`crossfs.copy_tree`, `trash.remove_tree`) look again at each directory
they open on another device than its parent (`refuse_mount_point`): an open may mount one
(an automount, an NFS server's submount). A device change alone is no mount point where
the table can be read (every btrfs subvolume has a device of its own); where it cannot
(no /proc), it counts as one.
"""

from __future__ import annotations

import errno
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


def _path(fd: int) -> str | None:
    """The path of what `fd` is open on, by the kernel (None: not reachable by a path)."""
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return path if path.startswith("/") else None


def refuse_mount_point(fd: int, parent: int, name: str) -> None:
    """`OSError` (EXDEV, naming `name`) if directory `name` of directory `parent`, open as
    `fd`, is a mount point: on another device than `parent` and in the mount table (looked
    at only then), or, where the table or the directory's path cannot be read (no /proc),
    on another device at all: refused, never walked into."""
    if os.fstat(fd).st_dev == os.fstat(parent).st_dev:
        return
    path, table = _path(fd), mount_points()
    if path is None or not table or path in table:
        raise OSError(errno.EXDEV, "a file system is mounted there", name)


def mounted_at(dir_fd: int, name: str) -> str | None:
    """`mounted_in` of entry `name` of directory `dir_fd`, opened without following a
    symlink; None where it is no directory (or gone): nothing can be mounted in it, and the
    caller's move or removal says what it finds."""
    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return mounted_in(fd)
    finally:
        os.close(fd)


def mounted_in(fd: int) -> str | None:
    """A mount point at or below the directory open as `fd` (its path), else None. The
    directory's path is the kernel's (`/proc/self/fd`), so neither a symlink on the way
    nor a rename since the open misleads it."""
    path = _path(fd)
    if path is None:
        return None  # not reachable by a path (deleted, another namespace's)
    below = path.rstrip("/") + "/"
    for point in mount_points():
        if point == path or point.startswith(below):
            return point
    return None
