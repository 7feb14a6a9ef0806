"""The local manifest cache: a write that fails leaves no temporary file behind, and a
push whose object is stored does not fail because the cache could not keep a copy. Each
test here once failed on the code before its fix."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import blake3
import pytest

from datamover.repo.layout import manifest_key
from datamover.repo.repository import Repository
from datamover.storage.memory import MemoryStore

_FULL_DISK = """
import os, resource, signal, sys
from pathlib import Path
from datamover.repo.repository import Repository
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
repo = Repository(store=None, cache_dir=Path(sys.argv[1]))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
for i in range(3):
    try:
        repo._write_cache(bytes([i]) * 32, os.urandom(4 << 20))
    except OSError:
        pass
    else:
        sys.exit("a write past the file size limit succeeded")
"""


def test_a_cache_write_that_fails_leaves_no_temporary_file(tmp_path: Path) -> None:
    # Before: each failed write (a full disk, a quota) left its partial `.tmp` file, which
    # nothing removes: on a full state disk every retry added another.
    proc = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    left = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert left == []


async def test_a_stored_manifest_object_the_cache_cannot_keep_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: the push failed once the object was in the store, for want of a local copy.
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache directory should be\n")
    store = MemoryStore()
    repo = Repository(store, blocked)
    data = b"segment bytes" * 100
    with caplog.at_level(logging.WARNING, logger="datamover.repo.repository"):
        digest = await repo.put_manifest_object(data)
    assert digest == blake3.blake3(data).digest()
    assert await store.get(manifest_key(digest)) == data
    assert "could not be cached" in caplog.text
    assert repo.read_cached(digest) is None
