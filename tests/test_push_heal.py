"""A push heals what the store lost of its parent version instead of pointing at it again:
files whose chunks were in a lost pack are read again, a lost segment is uploaded again."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from datamover.domain.ids import new_version_id
from datamover.errors import Corrupt
from datamover.repo.layout import manifest_key, version_key
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from datamover.transfer.verify import verify
from tests.fixtures_sites import MakeSite
from tests.treegen import snapshot, three_packs

KiB = 1 << 10


async def test_a_lost_pack_is_healed_by_the_next_push(make_site: MakeSite) -> None:
    a, b = await make_site("site-a", pack_size=1024 * KiB), await make_site("site-b")
    three_packs(a.data / "x")
    site_a, site_b = await a.open(), await b.open()
    try:
        first = await push(site_a, "/proj/x")
        packs = sorted([o.key async for o in site_a.store.list("packs/")])
        assert first.packs == len(packs) >= 3
        await site_a.store.delete(packs[1])  # by hand, or a bucket restored from a copy

        healed = await push(site_a, "/proj/x")  # nothing changed on disk
        assert 0 < healed.files_read < 40  # only the files that were in the lost pack
        assert healed.packs == 1 and healed.uploaded_bytes > 0
        # Packs are named by their content: the same chunks packed in the same order make
        # the same pack again, so the version is whole again under its own id.
        assert healed.unchanged and healed.version == first.version
        assert await site_a.repo.stored(packs[1])

        await stage(site_b, "/proj/x")
        assert snapshot(b.data / "x") == snapshot(a.data / "x")
        assert (await verify(site_b, "/proj/x")).ok

        again = await push(site_a, "/proj/x")  # healed: a no-op again
        assert again.unchanged and again.files_read == 0 and again.packs == 0
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_lost_pack_with_other_changes_publishes_a_stageable_version(
    make_site: MakeSite,
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "x").mkdir()
    (a.data / "x" / "f").write_bytes(b"first file" * 100)
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/x")
        [key] = [o.key async for o in site_a.store.list("packs/")]
        await site_a.store.delete(key)
        (a.data / "x" / "g").write_bytes(b"second file" * 100)
        result = await push(site_a, "/proj/x")
        assert result.files == 2 and result.files_read == 2
        await stage(site_b, "/proj/x")
        assert snapshot(b.data / "x") == snapshot(a.data / "x")
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_lost_segment_is_uploaded_again(make_site: MakeSite) -> None:
    a, b = await make_site("site-a", segment_entries=8), await make_site("site-b")
    (a.data / "x").mkdir()
    for i in range(60):
        (a.data / "x" / f"f{i:02d}").write_text(f"file {i}\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        first = await push(site_a, "/proj/x")
        parent = await site_a.repo.read_version("/proj/x", first.version)
        refs = await site_a.repo.segments(parent)
        assert len(refs) >= 3
        lost = manifest_key(refs[1].digest)
        await site_a.store.delete(lost)  # the site still has it in its local cache

        again = await push(site_a, "/proj/x")
        assert again.unchanged and again.version == first.version
        assert again.files_read == 0 and again.uploaded_bytes == refs[1].stored_size
        assert await site_a.repo.stored(lost)
        await stage(site_b, "/proj/x")  # site B has no cache: it reads the store
        assert snapshot(b.data / "x") == snapshot(a.data / "x")
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_push_heads_each_reused_pack_once(make_site: MakeSite) -> None:
    """The check costs one HEAD per pack the parent's unchanged files use, not per file."""
    a = await make_site("site-a", pack_size=1024 * KiB)
    three_packs(a.data / "x")
    site_a = await a.open()
    try:
        await push(site_a, "/proj/x")
        packs = {o.key async for o in site_a.store.list("packs/")}
        heads: list[str] = []
        real = site_a.repo.stored_size

        async def counting(key: str) -> int | None:
            heads.append(key)
            return await real(key)

        site_a.repo.stored_size = counting  # type: ignore[method-assign]
        again = await push(site_a, "/proj/x")
        assert again.unchanged
        assert sorted(k for k in heads if k.startswith("packs/")) == sorted(packs)
    finally:
        await site_a.close()


async def test_a_malformed_latest_version_document_is_passed_over_by_the_next_push(
    make_site: MakeSite, caplog: pytest.LogCaptureFixture
) -> None:
    """It had failed every push of the dataset, `--force` too (`version document ... is
    malformed`), until someone deleted the object by hand. The next push warns, takes the
    newest version that reads as its parent, and publishes; the damaged one stays corrupt
    to a stage that asks for it by id."""
    a, b = await make_site("site-a"), await make_site("site-b")
    src = a.data / "x"
    src.mkdir()
    (src / "keep.txt").write_text("one\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        first = await push(site_a, "/proj/x")
        (src / "new.txt").write_text("two\n")
        second = await push(site_a, "/proj/x")
        await site_a.store.put(version_key("/proj/x", second.version), b"garbage")
        (src / "third.txt").write_text("three\n")
        with caplog.at_level(logging.WARNING):
            third = await push(site_a, "/proj/x")
        assert third.parent == first.version
        assert f"version {second.version} cannot be read" in caplog.text
        assert await site_a.repo.latest("/proj/x") == third.version
        staged = await stage(site_b, "/proj/x")
        assert staged.version == third.version
        assert snapshot(b.data / "x") == snapshot(src)
        with pytest.raises(Corrupt, match="malformed"):
            await stage(site_b, "/proj/x", version=second.version)

        # One dated ahead of this clock (a site whose clock runs fast): the next version
        # must still follow it, or it stays the latest and every stage says corrupt.
        ahead = new_version_id("site-z", now=datetime.now(UTC) + timedelta(minutes=10))
        await site_a.store.put(version_key("/proj/x", ahead), b"garbage")
        (src / "fourth.txt").write_text("four\n")
        fourth = await push(site_a, "/proj/x")
        assert fourth.parent == third.version and fourth.version > ahead
        assert await site_a.repo.latest("/proj/x") == fourth.version
        assert (await stage(site_b, "/proj/x")).version == fourth.version

        # One dated at the last microsecond there is: nothing can follow it. The push
        # follows the readable parent, says so, and publishes (it had uploaded everything
        # and then failed: "dated at the end of time").
        end = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
        await site_a.store.put(version_key("/proj/x", new_version_id("site-z", now=end)), b"?")
        (src / "fifth.txt").write_text("five\n")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            fifth = await push(site_a, "/proj/x")
        assert fifth.parent == fourth.version and "stays the latest" in caplog.text
        assert (await stage(site_b, "/proj/x", version=fifth.version)).files == 5
    finally:
        await site_a.close()
        await site_b.close()
