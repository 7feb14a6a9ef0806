"""A read-only FUSE file system that passes through to a directory and answers each
`getattr` (the kernel's `lstat`) after a fixed delay: a stand-in for the metadata round trip
of a network or parallel file system (NFS, Lustre, GPFS), for `lookahead.py`.

    python bench/slowfs.py SOURCE MOUNTPOINT DELAY_SECONDS   # until unmounted

Directory listings carry each entry's type (as Lustre's and NFS's do), so a walk needs no
`lstat` to tell a file from a directory. Lookups are served on many threads (libfuse's
multi-threaded loop), as a metadata server answers many clients at once; this server is
Python, so each answer also costs it about 0.5 ms of CPU, which shares the machine's cores
with the walk being measured. Needs `fusepy` (`pip install -e '.[bench]'`) and libfuse 2
(Debian: `apt-get install fuse libfuse2`).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from fuse import FUSE, FuseOSError, Operations  # type: ignore[import-untyped]

_STAT = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_nlink", "st_size", "st_uid", "st_ino")


class SlowPassthrough(Operations):  # type: ignore[misc]
    """Read-only passthrough to `root`, each `getattr` answered after `delay` seconds."""

    def __init__(self, root: str, delay: float) -> None:
        self.root = root
        self.delay = delay

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        time.sleep(self.delay)
        try:
            st = os.lstat(self._path(path))
        except OSError as exc:
            raise FuseOSError(exc.errno) from None
        return {k: getattr(st, k) for k in _STAT} | {"st_mtime": st.st_mtime_ns / 1e9}

    def readdir(self, path: str, fh: Any) -> list[Any]:
        out: list[Any] = [".", ".."]
        with os.scandir(self._path(path)) as it:
            for e in it:
                mode = e.stat(follow_symlinks=False).st_mode
                out.append((e.name, {"st_mode": mode, "st_ino": e.inode()}, 0))
        return out

    def readlink(self, path: str) -> str:
        return os.readlink(self._path(path))

    def open(self, path: str, flags: int) -> int:
        return os.open(self._path(path), flags)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def release(self, path: str, fh: int) -> None:
        os.close(fh)


if __name__ == "__main__":
    source, mountpoint, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    FUSE(
        SlowPassthrough(source, delay),
        mountpoint,
        foreground=True,
        nothreads=False,
        ro=True,
        attr_timeout=0,
        entry_timeout=0,
        use_ino=True,
    )
