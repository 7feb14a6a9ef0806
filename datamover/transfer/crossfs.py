"""Moving an entry of a tree to a trash on another file system: copy it, then remove it.

A rename cannot cross file systems (state on local disk, data on a parallel file system),
so the entry is copied into the trash and the original removed. Both go through
descriptors only: the entry is opened below its parent's descriptor with `O_NOFOLLOW`, and
everything inside a directory below the descriptor of the directory that holds it, each
directory again with `O_NOFOLLOW | O_DIRECTORY`. No path is looked up again from the
tree's top, so a directory a local user swaps for a symlink while the copy runs is never
followed: the copy cannot take in, nor the removal unlink, anything outside the entry.
Symlinks inside are copied as symlinks; FIFOs, sockets and device nodes are made anew.

The copy is made under a temporary name beside its destination (`.dm-moving-<hex>`) and
renamed to it once whole, before anything of the original is removed: a move cut short (the
stage killed mid-copy) never leaves a partial copy under the entry's name in the trash,
where a user restoring it would take it for the whole. Such a leftover goes with its run.
A copy that fails is removed again and the original left whole. Of a directory, only what
did not change during the copy is removed (a file by inode, size and mtime as they were
when it was copied, a symlink also by its target), a directory only once empty; a file
written meanwhile stays where it was, and that is an error.

The kernel resolves nothing here by path but single names below open descriptors; every
directory of the copied tree's current branch holds two descriptors (its original and its
copy) while it is copied, so a tree deeper than about half the descriptor limit fails to
copy (and stays in place) rather than being followed by path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from dataclasses import dataclass, field
from typing import NamedTuple

from datamover.transfer import mounts
from datamover.transfer.trash import remove_tree

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Never blocks: a FIFO swapped in for a file must not wait for a writer.
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: What `setxattr` fails with for an attribute this file system or user cannot set.
_XATTR_SKIP = (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.ENODATA, errno.EINVAL)

Identity = tuple[int, int, int]


class Seen(NamedTuple):
    """A copied non-directory as it was before its copy: `(inode, size, mtime)`, and for a
    symlink its target (None for anything else)."""

    ident: Identity
    target: str | None


def identity(st: os.stat_result) -> Identity:
    """`(inode, size, mtime)`: what shows that a file was not changed between two looks."""
    return st.st_ino, st.st_size, st.st_mtime_ns


def changed(what: str = "it changed while it was copied") -> OSError:
    """The error for an entry that changed under the copy (the caller reports it)."""
    return OSError(errno.EAGAIN, what)


def copy_data(src: int, dst: int, size: int) -> None:
    """Copy the `size` bytes of regular file `src` to the new, empty file `dst`, its holes
    left holes: only the runs `SEEK_DATA`/`SEEK_HOLE` find are copied (`copy_file_range`,
    else `pread`/`pwrite`), and the end is set by `ftruncate`. Where the file system
    cannot tell its holes, the rest is copied as data. A file cut short meanwhile (a
    user's save) ends the copy where its data does: the caller compares the file with
    what it saw, and drops the copy."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
            end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole from here on (or cut short)
                break
            start, end = offset, size  # holes not told apart: the rest as data
        if start >= size or not _copy_run(src, dst, start, end):
            break
        offset = end
    os.ftruncate(dst, size)


def _copy_run(src: int, dst: int, start: int, end: int) -> bool:
    """Copy bytes `[start, end)` of `src` to the same offsets of `dst`; False where `src`
    ended first (cut short meanwhile)."""
    at = start
    try:
        while at < end:
            n = os.copy_file_range(src, dst, end - at, at, at)
            if n == 0:
                break  # the end, or a file system that copies nothing so: read to know
            at += n
        else:
            return True
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.EOPNOTSUPP):
            raise
    while at < end:
        data = os.pread(src, min(end - at, 1 << 20), at)
        if not data:
            return False
        view = memoryview(data)
        while view:
            written = os.pwrite(dst, view, at)
            view, at = view[written:], at + written
    return True


def copy_xattrs(src: int, dst: int) -> None:
    """Copy the extended attributes of `src` to `dst` (both descriptors), as `shutil.copy2`
    does, but none of `security.*` (file capabilities, like a set-user-ID bit, are a
    privilege; a security label is the policy's to give). What cannot be set is skipped."""
    try:
        names = os.listxattr(src)
    except OSError as exc:
        if exc.errno in _XATTR_SKIP:
            return
        raise
    for name in names:
        if name.startswith("security."):
            continue
        try:
            os.setxattr(dst, name, os.getxattr(src, name))
        except OSError as exc:
            if exc.errno not in _XATTR_SKIP:
                raise


def _mode(st: os.stat_result, now: os.stat_result) -> int:
    """The original's (`st`) permission bits for its copy (`now`): without the set-user-ID
    bit unless the copy has the original's owner, without set-group-ID unless its group."""
    mode = stat.S_IMODE(st.st_mode)
    if now.st_uid != st.st_uid:
        mode &= ~stat.S_ISUID
    if now.st_gid != st.st_gid:
        mode &= ~stat.S_ISGID
    return mode


def give_attrs(st: os.stat_result, fd: int | None, dst_dir: int = -1, name: str = "") -> None:
    """Give a copy, open as `fd` (or, for a symlink or special file, `name` in directory
    `dst_dir`), the owner, mode and times of the original `st`.

    The owner only where this process may give it (as root; as tar and `rsync -a` do):
    otherwise the copy is this process's. Set-user-ID and set-group-ID bits go with the
    mode only where the copy has the original's owner (group): a stage run as root had
    made a local user's set-user-ID program a set-user-ID root program in the trash. The
    owner is set first, since a `chown` clears those bits."""
    if fd is not None:
        if os.geteuid() == 0:
            os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, _mode(st, os.fstat(fd)))
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        return
    if os.geteuid() == 0:
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_dir, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        now = os.stat(name, dir_fd=dst_dir, follow_symlinks=False)
        # The node this process just made in its own trash directory: no link to follow.
        os.chmod(name, _mode(st, now), dir_fd=dst_dir)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_dir, follow_symlinks=False)


def copy_file(src: int, st: os.stat_result, dst_dir: int, name: str) -> None:
    """Copy regular file `src` (an open descriptor; `st` its `fstat`) to the new file `name`
    in directory `dst_dir`, with its holes (`copy_data`: a sparse file written out as data
    could fill the trash's file system), extended attributes, mode and times. The copy holds
    the `st.st_size` bytes seen: the caller compares the file with `st` afterwards."""
    out = os.open(name, _NEW, 0o600, dir_fd=dst_dir)
    try:
        copy_data(src, out, st.st_size)
        copy_xattrs(src, out)
        give_attrs(st, out)
    finally:
        os.close(out)


def _copy_other(src_dir: int, name: str, st: os.stat_result, dst_dir: int, to: str) -> Seen:
    """Copy the symlink, FIFO, socket or device node `name` of `src_dir` (`st` its
    `lstat`) to `to` in `dst_dir`."""
    target = None
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(name, dir_fd=src_dir)
        os.symlink(target, to, dir_fd=dst_dir)
    else:  # a FIFO or socket holds no data; a device node is its numbers
        os.mknod(to, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=dst_dir)
    give_attrs(st, None, dst_dir, to)
    return Seen(identity(st), target)


def _copy_entry(
    src_dir: int, name: str, dst_dir: int, to: str
) -> tuple[Seen | None, tuple[int, int, os.stat_result] | None]:
    """Copy the non-directory `name` of `src_dir` to `to` in `dst_dir`; or, for a
    directory, make its (empty) copy and return both open (`(src, dst, fstat of src)`):
    the caller copies what is in it and closes them."""
    st = os.stat(name, dir_fd=src_dir, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        src = os.open(name, _DIR, dir_fd=src_dir)  # a symlink swapped in: ELOOP
        try:
            st = os.fstat(src)
            mounts.refuse_mount_point(src, src_dir, name)
            _removable(src, name)
            os.mkdir(to, 0o700, dir_fd=dst_dir)
            dst = os.open(to, _DIR, dir_fd=dst_dir)
        except BaseException:
            os.close(src)
            raise
        return None, (src, dst, st)
    if not stat.S_ISREG(st.st_mode):
        return _copy_other(src_dir, name, st, dst_dir, to), None
    fd = os.open(name, _READ, dir_fd=src_dir)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise changed()
        copy_file(fd, st, dst_dir, to)
    finally:
        os.close(fd)
    return Seen(identity(st), None), None


@dataclass(slots=True)
class _Frame:
    """A directory being walked: its descriptor (`src`), its copy's (`dst`, -1 when
    removing), its path below the top, the names still to do, and its `fstat` (None for
    the top, whose descriptors the caller owns)."""

    src: int
    dst: int
    rel: str
    todo: list[str] = field(default_factory=list)
    st: os.stat_result | None = None
    mode: int | None = None  # its mode before `remove_copied` made it writable

    def path(self, name: str) -> str:
        return f"{self.rel}/{name}" if self.rel else name

    def close(self) -> None:
        if self.st is not None:
            os.close(self.src)
            if self.dst >= 0:
                os.close(self.dst)


def _names(fd: int) -> list[str]:
    """The names in directory `fd`, in the order they are taken from the end."""
    return sorted(os.listdir(fd), reverse=True)


def copy_tree(src: int, dst: int) -> dict[str, Seen]:
    """Copy everything in directory `src` into the empty directory `dst` (both open
    descriptors, which the caller keeps); return each copied non-directory by its path
    relative to `src`, as it was before its copy. A directory gets its attributes after
    what is in it. Raises on the first failure (the caller removes the copy)."""
    copied: dict[str, Seen] = {}
    frames = [_Frame(src, dst, "", _names(src))]
    try:
        while frames:
            top = frames[-1]
            if not top.todo:
                frames.pop()
                if top.st is not None:
                    try:
                        copy_xattrs(top.src, top.dst)
                        give_attrs(top.st, top.dst)
                    finally:
                        top.close()
                continue
            name = top.todo.pop()
            seen, opened = _copy_entry(top.src, name, top.dst, name)
            if seen is not None:
                copied[top.path(name)] = seen
                continue
            assert opened is not None
            frames.append(_Frame(opened[0], opened[1], top.path(name), st=opened[2]))
            frames[-1].todo = _names(opened[0])
        return copied
    finally:
        for frame in frames:
            frame.close()


def _same_dir(parent: int, name: str, fd: int) -> bool:
    """Whether `name` in `parent` is still the directory open as `fd`."""
    try:
        now = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except OSError:
        return False
    then = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (then.st_dev, then.st_ino)


def _unchanged(parent: int, name: str, st: os.stat_result, seen: Seen | None) -> bool:
    if seen is None or seen.ident != identity(st):
        return False
    return seen.target is None or os.readlink(name, dir_fd=parent) == seen.target


def remove_copied(top: int, copied: dict[str, Seen]) -> None:
    """Remove from directory `top` (an open descriptor; the caller keeps it and removes
    `top` itself) what `copy_tree` copied and has not changed since (`copied`), bottom up;
    a directory only once empty. What changed, or came, meanwhile stays."""
    frames = [_Frame(top, -1, "", _names(top))]
    parents: list[tuple[int, str]] = [(-1, "")]
    try:
        while frames:
            here = frames[-1]
            if not here.todo:
                frames.pop()
                parent, name = parents.pop()
                if here.st is not None:
                    gone = False
                    with contextlib.suppress(OSError):  # not empty: something stays
                        if _same_dir(parent, name, here.src):
                            os.rmdir(name, dir_fd=parent)
                            gone = True
                    if not gone and here.mode is not None:  # it stays with its mode
                        with contextlib.suppress(OSError):
                            os.fchmod(here.src, here.mode)
                    here.close()
                continue
            name = here.todo.pop()
            try:
                st = os.stat(name, dir_fd=here.src, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    child = os.open(name, _DIR, dir_fd=here.src)
                    frames.append(_Frame(child, -1, here.path(name), st=os.fstat(child)))
                    parents.append((here.src, name))
                    frames[-1].todo = _names(child)
                    frames[-1].mode = _writable(child)
                elif _unchanged(here.src, name, st, copied.get(here.path(name))):
                    os.unlink(name, dir_fd=here.src)
            except OSError:
                continue  # gone, or not to be looked into: it stays
    finally:
        for frame in frames:
            frame.close()


def move_across(src_dir: int, name: str, dst_dir: int, to: str) -> None:
    """Move entry `name` of directory `src_dir` (any kind, a directory whole) to the new
    name `to` in directory `dst_dir` on another file system: copy it, then remove it, both
    through descriptors (see the module docstring).

    Raises `OSError` when it cannot be copied (the copy is removed again, the original left
    whole), when a file changed while it was copied (the same), and with `ENOTEMPTY` when
    something of a directory changed meanwhile (that stays in place, the rest is in the
    trash)."""
    st = os.stat(name, dir_fd=src_dir, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        _move_one(src_dir, name, dst_dir, to)
        return
    try:
        src = os.open(name, _DIR, dir_fd=src_dir)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise changed("it was replaced while it was moved (now a symlink or a file)") from None
        raise
    try:
        st = os.fstat(src)
        mounts.refuse_mount_point(src, src_dir, name)
        point = mounts.mounted_in(src)
        if point is not None:
            raise OSError(errno.EBUSY, f"a file system is mounted at {point!r} in it", name)
        _removable(src, name)
        tmp = _moving_name()
        os.mkdir(tmp, 0o700, dir_fd=dst_dir)
        try:
            dst = os.open(tmp, _DIR, dir_fd=dst_dir)
            try:
                copied = copy_tree(src, dst)
                copy_xattrs(src, dst)
                give_attrs(st, dst)
            finally:
                os.close(dst)
            _publish(dst_dir, tmp, to)
        except BaseException:
            _remove_copy(dst_dir, tmp)
            raise
        # Its entries go, so it must be writable (a read-only tree a user trashed whole):
        # its own mode is given back if it stays.
        mode = _writable(src)
        remove_copied(src, copied)
        removed = False
        with contextlib.suppress(OSError):
            if _same_dir(src_dir, name, src):
                os.rmdir(name, dir_fd=src_dir)
                removed = True
        # Not removed: still there (where it was, or renamed meanwhile). Decided by the
        # `rmdir`, not by the link count of the open directory, which overlayfs (a lower
        # layer's directory) still shows above zero after it.
        if not removed:
            if mode is not None:
                with contextlib.suppress(OSError):
                    os.fchmod(src, mode)
            raise OSError(
                errno.ENOTEMPTY,
                "it changed while it was copied (what changed is still in place, the rest in "
                "the trash)",
            )
    finally:
        os.close(src)


def _move_one(src_dir: int, name: str, dst_dir: int, to: str) -> None:
    """`move_across` of anything but a directory: copied, then unlinked only if it is
    still what was copied."""
    tmp = _moving_name()
    try:
        seen, opened = _copy_entry(src_dir, name, dst_dir, tmp)
        if opened is not None:  # a directory now: it was swapped in after the look
            os.close(opened[0])
            os.close(opened[1])
            os.rmdir(tmp, dir_fd=dst_dir)
            raise changed()
        assert seen is not None
        if not _unchanged(
            src_dir, name, os.stat(name, dir_fd=src_dir, follow_symlinks=False), seen
        ):
            raise changed()
        _publish(dst_dir, tmp, to)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dst_dir)
        raise
    try:
        os.unlink(name, dir_fd=src_dir)
    except BaseException:  # the original stays whole: so must the trash not hold a copy
        with contextlib.suppress(FileNotFoundError):
            os.unlink(to, dir_fd=dst_dir)
        raise


def _removable(fd: int, name: str) -> None:
    """Raise `PermissionError` before anything is copied if the entries of directory `fd`
    (`name`) could not be removed after: neither writable by this process nor its own to
    make writable (`_writable`). The copy had been made, the original then left, whole
    or in part, and every later stage added one more copy to the trash."""
    if os.access(".", os.W_OK | os.X_OK, dir_fd=fd) or os.fstat(fd).st_uid == os.geteuid():
        return
    raise PermissionError(errno.EACCES, "Permission denied (another user's directory)", name)


def _writable(fd: int) -> int | None:
    """Give directory `fd` its owner's write and search bits where this process may not
    change it otherwise (it owns it, or is root); return the mode it had then, or None
    if it was not changed (writable already, or not this user's: the removal is refused)."""
    if os.access(".", os.W_OK | os.X_OK, dir_fd=fd):
        return None
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    try:
        os.fchmod(fd, mode | stat.S_IWUSR | stat.S_IXUSR)
    except PermissionError:
        return None
    return mode


def _remove_copy(dst_dir: int, name: str) -> None:
    """Remove the copy `name` of `dst_dir` a failed move made, read-only directories in it
    too (its copied modes: `trash.remove_tree` gives them their owner's bits first)."""
    with contextlib.suppress(OSError):
        remove_tree(dst_dir, name)


def _moving_name() -> str:
    """A fresh temporary name for a copy being made (see the module docstring)."""
    return f".dm-moving-{secrets.token_hex(8)}"


def _publish(dst_dir: int, tmp: str, to: str) -> None:
    """Rename the whole copy `tmp` to `to` in `dst_dir`, never over something there (the
    caller chose a free `to` in a trash directory only this stage writes into)."""
    try:
        os.stat(to, dir_fd=dst_dir, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(tmp, to, src_dir_fd=dst_dir, dst_dir_fd=dst_dir)
        return
    raise OSError(errno.EEXIST, "its place in the trash was taken meanwhile")
