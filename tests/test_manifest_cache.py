"""The local manifest cache: a write that fails leaves no temporary file behind, and a
push whose object is stored does not fail because the cache could not keep a copy. Each
test here once failed on the code before its fix."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import blake3
import pytest

from datamover.repo import repository
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
    left = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".legacy-tmp-swept"]
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


def test_a_killed_writers_temporary_file_is_swept_by_a_later_process(tmp_path: Path) -> None:
    # Before: a writer killed between writing and renaming left its `.tmp` file beside the
    # cached objects for good; nothing looked for it.
    Repository(MemoryStore(), tmp_path)._write_cache(b"\1" * 32, b"first")
    tmp_dir = tmp_path / "manifests" / "tmp"
    stale, fresh = tmp_dir / "ab.0001.tmp", tmp_dir / "cd.0002.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"another process is writing this")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    later = Repository(MemoryStore(), tmp_path)  # a later process
    later._write_cache(b"\2" * 32, b"second")
    assert not stale.exists()
    assert fresh.exists()  # a running writer's file is left alone
    good = b"segment"
    digest = blake3.blake3(good).digest()
    later._write_cache(digest, good)
    assert later.read_cached(digest) == good
    assert sorted(p.name for p in tmp_dir.glob("*.tmp")) == ["cd.0002.tmp"]


def test_temporary_files_of_the_old_layout_are_swept_once(tmp_path: Path) -> None:
    # Before: builds that wrote temporaries beside the objects (`manifests/xx/.<digest>.<8
    # hex>.tmp`) left a killed writer's there for good; the sweep of `manifests/tmp/`
    # never looked at them.
    h = "ab" * 32
    objects = tmp_path / "manifests" / "ab"
    objects.mkdir(parents=True)
    cached, stale, fresh = objects / h, objects / f".{h}.0badcafe.tmp", objects / f".{h}.1.tmp"
    mine = objects / f".{h}.12345678.tmp"
    for path in (cached, stale, fresh, mine):
        path.write_bytes(b"data")
    old = time.time() - 2 * 3600
    for path in (cached, stale, fresh):
        os.utime(path, (old, old))
    os.utime(mine, (time.time(), time.time()))
    Repository(MemoryStore(), tmp_path)._write_cache(b"\1" * 32, b"first")
    # the stale temporary goes; the cached object, a name that is not such a temporary
    # and a writer's fresh file stay, and so the cache is not yet marked swept
    assert sorted(p.name for p in objects.iterdir()) == sorted([h, fresh.name, mine.name])
    marker = tmp_path / "manifests" / "tmp" / ".legacy-tmp-swept"
    assert not marker.exists()
    # a later process, once that file is stale too, removes it and marks the cache swept
    os.utime(mine, (old, old))
    Repository(MemoryStore(), tmp_path)._write_cache(b"\2" * 32, b"second")
    assert sorted(p.name for p in objects.iterdir()) == sorted([h, fresh.name])
    assert marker.exists()
    # and the next one does not list the object directories again
    stale.write_bytes(b"data")
    os.utime(stale, (old, old))
    Repository(MemoryStore(), tmp_path)._write_cache(b"\3" * 32, b"third")
    assert stale.exists()


def test_a_damaged_copy_replaced_while_it_was_read_keeps_the_good_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reader found the cached copy damaged while a writer renamed a good copy over it:
    # it removed the good copy (a fetch more for the next reader, and a stage reading the
    # cache then found the segment gone). A damaged copy is now left for the fetch to
    # replace.
    good = b"segment bytes" * 10
    digest = blake3.blake3(good).digest()
    repo = Repository(MemoryStore(), tmp_path)
    repo._write_cache(digest, b"damaged on disk")
    real = repository.blake3.blake3

    def hash_then_write(data: bytes) -> object:
        monkeypatch.setattr(repository.blake3, "blake3", real)
        Repository(MemoryStore(), tmp_path)._write_cache(digest, good)  # the other writer
        return real(data)

    monkeypatch.setattr(repository.blake3, "blake3", hash_then_write)
    assert repo.read_cached(digest) is None
    assert repo.read_cached(digest) == good
