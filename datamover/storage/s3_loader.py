"""botocore's data loader for datamover's S3 clients, its endpoint table cut to S3.

The first client of a process has botocore read `endpoints.json`: 1.2 MB describing every
service of every AWS partition, 33 ms of every command's start-up on a small machine, of
which S3 clients use the ~16 KB about S3. `loader_for` gives a loader that returns that
table cut to S3 (every partition as it is, its `services` reduced to `s3`), which
resolves every S3 endpoint, region and signing name exactly as the whole table does, and
keeps the cut in the user's cache directory (`$XDG_CACHE_HOME/datamover/`, by default
`~/.cache/datamover/`), named by the botocore version and the source file's size and
mtime, so that an upgraded or edited table is cut again.

The cut is reported as loaded from botocore's own file, as the whole table would be, so
botocore treats it as its builtin data. A table found on a data path of the user's
(`AWS_DATA_PATH`, `~/.aws/models`) is loaded whole, as botocore would. A cache file is
trusted only if it and its directory belong to this user and are writable by no one
else (a cache planted by another user could send S3 requests elsewhere); anything wrong
with the cache (unwritable, unreadable, not valid) costs the full load and nothing more.
Only the S3 clients made with this loader see the cut table.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import stat
from pathlib import Path
from typing import Any

import botocore
import botocore.loaders

_NAME = "endpoints"
_SERVICE = "s3"


class S3Loader(botocore.loaders.Loader):
    """A botocore `Loader` whose `endpoints` table is cut to S3 (module docstring)."""

    def __init__(self, *args: Any, cache_dir: Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cache_dir = cache_dir
        self._cut: tuple[Any, str] | None = None

    def load_data_with_path(self, name: str) -> Any:
        if name == _NAME:
            if self._cut is None:
                self._cut = self._load_cut()
            if self._cut is not None:
                return self._cut
        return super().load_data_with_path(name)

    def _load_cut(self) -> tuple[Any, str] | None:
        """The cut table and botocore's path of the whole one, or None where the table
        is not botocore's own."""
        location = next(
            (p for p in self._potential_locations(_NAME) if self.file_loader.exists(p)), None
        )
        if location is None or not self.is_builtin_path(location):
            return None
        exts = (".json", ".json.gz")
        source = next((location + e for e in exts if os.path.isfile(location + e)), None)
        if source is None:
            return None
        cache = self._cache_file(source)
        if cache is not None:
            cached = _read_trusted(cache)
            if cached is not None:
                return cached, location
        whole, _ = super().load_data_with_path(_NAME)
        cut = cut_to_s3(whole)
        if cache is not None:
            _write(cache, cut)
        return cut, location

    def _cache_file(self, source: str) -> Path | None:
        if self.cache_dir is None:
            return None
        try:
            st = os.stat(source)
        except OSError:
            return None
        name = f"{_NAME}-{_SERVICE}-{botocore.__version__}-{st.st_size}-{st.st_mtime_ns}.json"
        return self.cache_dir / name


def cut_to_s3(endpoints: Any) -> dict[str, Any]:
    """botocore's endpoint table with each partition's services reduced to S3."""
    return {
        **endpoints,
        "partitions": [
            {**p, "services": {k: v for k, v in p.get("services", {}).items() if k == _SERVICE}}
            for p in endpoints["partitions"]
        ],
    }


def default_cache_dir() -> Path | None:
    """`$XDG_CACHE_HOME/datamover`, else `~/.cache/datamover`; None without a home."""
    base = os.environ.get("XDG_CACHE_HOME")
    if base and Path(base).is_absolute():
        return Path(base, "datamover")
    try:
        home = Path.home()
    except RuntimeError:  # no HOME and no password entry
        return None
    return home / ".cache" / "datamover" if home.is_absolute() else None


@functools.cache
def loader_for(data_path: str | None) -> botocore.loaders.Loader:
    """One loader per botocore data path for the whole process: it keeps the parsed S3
    service model, endpoint rules and defaults for every client made after the first."""
    if data_path is None:
        return S3Loader(cache_dir=default_cache_dir())
    # As botocore's `create_loader` reads `data_path`.
    paths = [os.path.expanduser(os.path.expandvars(p)) for p in data_path.split(os.pathsep)]  # noqa: PTH111
    return S3Loader(extra_search_paths=paths, cache_dir=default_cache_dir())


def _owned(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _read_trusted(path: Path) -> Any | None:
    """The cached table at `path`, or None if it is missing, not this user's alone, or not
    a table."""
    try:
        if not _owned(os.lstat(path.parent)):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            if not _owned(os.fstat(f.fileno())):
                return None
            data = json.loads(f.read())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("partitions"), list)
    return data if ok else None


def _write(path: Path, data: Any) -> None:
    """Write `data` to `path` by a temporary name and a rename, only into a directory of
    this user's alone, never through a symlink (`O_EXCL | O_NOFOLLOW`: the temporary name
    is predictable), 0o600 whatever the umask (a group-writable file is not trusted when
    read back); any failure is ignored."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _owned(os.lstat(path.parent)):
            return
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
