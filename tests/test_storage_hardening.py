"""The bandwidth budget and the POSIX store against what their callers and neighbours do: GETs
asked with room to spare, and a store directory someone else can write to."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from datamover.errors import ObjectNotFound, StoreAccessDenied
from datamover.storage.bandwidth import Pacer, ThrottledStore
from datamover.storage.memory import MemoryStore
from datamover.storage.posix import PosixStore
from datamover.storage.s3 import S3Store

MiB = 1 << 20


class _SlowStore(MemoryStore):
    """A MemoryStore whose GETs take a store's round trip."""

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        await asyncio.sleep(0.005)
        return await super().get(key, offset, length)


class _ClockedStore(MemoryStore):
    """A MemoryStore noting when each GET's bytes left it."""

    def __init__(self) -> None:
        super().__init__()
        self.served: list[float] = []

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        data = await super().get(key, offset, length)
        self.served.append(time.monotonic())
        return data


# -- the bandwidth budget -----------------------------------------------------------------


async def test_throttled_small_gets_asked_with_room_do_not_wait_for_the_room() -> None:
    # Before: each GET booked the whole length it asked for (a version document is read with
    # room for 1 MiB + 1) before it was sent, and the calls waiting kept their turns when the
    # unused part was given back: 32 concurrent reads of 300 bytes at 1 MiB/s took 31 s.
    inner = _SlowStore()
    await inner.put("doc", bytes(300))
    store = ThrottledStore(inner, download=MiB)
    started = time.monotonic()
    reads = asyncio.gather(*(store.get("doc", 0, MiB + 1) for _ in range(32)))
    assert await asyncio.wait_for(reads, 10) == [bytes(300)] * 32
    assert time.monotonic() - started < 2


async def test_throttled_large_gets_keep_the_rate_on_average() -> None:
    # GETs past what is booked up front pay for the rest after: of 2 MiB at 1 MiB/s, the
    # first GET's 512 KiB go at once, and the last bytes cannot come before 1.5 s.
    inner = _ClockedStore()
    await inner.put("pack", bytes(MiB // 2))
    store = ThrottledStore(inner, download=MiB)
    started = time.monotonic()
    reads = asyncio.gather(*(store.get("pack", 0, MiB // 2) for _ in range(4)))
    assert await reads == [bytes(MiB // 2)] * 4
    assert 1.45 <= max(inner.served) - started < 3


# -- POSIX: a symlink in place of a directory leads nowhere ---------------------------------


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_posix_follows_no_symlink_in_place_of_a_directory(tmp_path: Path) -> None:
    # Before: only a key's last part was opened with O_NOFOLLOW. With packs/ab replaced by a
    # symlink (by anyone who may write to the store directory), put wrote into the directory
    # it points at, get and head read the files there, delete removed them and list listed
    # them.
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "planted").write_bytes(b"secret")
    root = tmp_path / "root"
    root.mkdir()
    store = PosixStore(root)
    await store.put("packs/cd/y", b"1")
    (root / "packs" / "ab").symlink_to(outside)
    (root / "top").symlink_to(outside)

    for key in ("packs/ab/x", "packs/ab/sub/x", "top/x"):
        with pytest.raises(StoreAccessDenied, match="symlink"):
            await store.put(key, b"data")
    assert _names(outside) == ["planted", "sub"]
    assert _names(outside / "sub") == []
    for key in ("packs/ab/planted", "top/planted"):
        with pytest.raises(ObjectNotFound):
            await store.get(key)
        with pytest.raises(ObjectNotFound):
            await store.get(key, 1, 2)
        with pytest.raises(ObjectNotFound):
            await store.head(key)
        await store.delete(key)  # nothing there to delete
    assert (outside / "planted").read_bytes() == b"secret"
    for prefix in ("packs/ab/", "packs/ab/p", "packs/ab/sub/", "top/"):
        assert [i.key async for i in store.list(prefix)] == [], prefix
    assert [i.key async for i in store.list()] == ["packs/cd/y"]
    assert [i.key async for i in store.list("packs/")] == ["packs/cd/y"]
    assert await store.get("packs/cd/y") == b"1"


async def test_posix_list_enters_no_directory_swapped_for_a_symlink_meanwhile(
    tmp_path: Path,
) -> None:
    # Before: a listing found packs/ab a directory, then entered it by its path: swapped for
    # a symlink while packs/aa was listed, it listed the directory the link points at.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "planted").write_bytes(b"secret")
    root = tmp_path / "root"
    root.mkdir()
    store = PosixStore(root)
    await store.put("packs/aa/x", b"1")
    await store.put("packs/ab/y", b"2")
    listed = []
    async for info in store.list("packs/"):
        listed.append(info.key)
        if info.key == "packs/aa/x":
            (root / "packs" / "ab" / "y").unlink()
            (root / "packs" / "ab").rmdir()
            (root / "packs" / "ab").symlink_to(outside)
    assert listed == ["packs/aa/x"]


async def test_posix_root_may_be_a_symlink(tmp_path: Path) -> None:
    # The configured directory is taken as it is named; only what lies below it is checked.
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    store = PosixStore(tmp_path / "link")
    await store.check()
    await store.put("packs/ab/x", b"data")
    assert (tmp_path / "real" / "packs" / "ab" / "x").read_bytes() == b"data"
    assert await store.get("packs/ab/x", 1, 2) == b"at"
    assert (await store.head("packs/ab/x")).size == 4
    assert [i.key async for i in store.list("packs/")] == ["packs/ab/x"]
    await store.delete("packs/ab/x")
    assert _names(tmp_path / "real") == []


async def test_a_call_cancelled_as_its_turn_comes_stays_cancelled() -> None:
    # Before: the head of the line waited with `asyncio.wait_for`, which on Python 3.11
    # returns normally when its wait ends in the step the task is cancelled in: time given
    # back (`refund`) and a cancel together had the call go on as if never cancelled.
    pacer = Pacer(1000)
    await pacer.take(1000)  # the next second is booked
    went: list[str] = []

    async def call() -> None:
        await pacer.take(10)
        went.append("went")

    task = asyncio.create_task(call())
    await asyncio.sleep(0.05)  # it waits at the head of the line
    pacer.refund(1000)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert went == [] and not pacer._line


async def test_a_body_damaged_on_the_way_is_refused_not_stored(
    s3_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server checks the body against its `x-amz-checksum-crc32c` header: bytes that
    are not those the header was computed over (damaged in transit) are refused, and no
    object is left at the key."""
    from datamover.errors import DatamoverError
    from datamover.storage import s3 as s3_module

    real = s3_module.checksum

    async def of_other_bytes(view: memoryview) -> str:
        return await real(memoryview(b"the bytes the header was computed over"))

    monkeypatch.setattr(s3_module, "checksum", of_other_bytes)
    with pytest.raises(DatamoverError, match=r"BadDigest|checksum|digest") as refused:
        await s3_store.put("damaged", b"payload " * 1000)
    monkeypatch.undo()
    with pytest.raises(ObjectNotFound):
        await s3_store.head("damaged")
    await s3_store.put("damaged", b"payload " * 1000)  # the same bytes, checked: stored
    assert (await s3_store.head("damaged")).size == 8000
    assert "damaged" in str(refused.value)
