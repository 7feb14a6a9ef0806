"""Bad input: one clear line on stderr, a non-zero exit, no traceback, nothing changed."""

from __future__ import annotations

import json
import os
import threading
import time
import unicodedata
from pathlib import Path

import pytest

from datamover.domain.ids import new_version_id
from datamover.domain.manifest import Entry, Kind
from datamover.errors import Conflict, InvalidInput
from datamover.repo.layout import VersionDoc
from datamover.repo.manifest import SegmentRef, encode_list, encode_segment
from datamover.repo.repository import utc_now
from datamover.transfer.push import push
from tests.fixtures_sites import MakeSite, SiteEnv
from tests.treegen import make_tree

MiB = 1 << 20


def fails(env: SiteEnv, *args: str, code: int, says: str) -> dict:
    """Run a CLI command expected to fail; check the one-line error and the JSON error."""
    proc = env.cli(*args, "--json")
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("datamover: error: ")]
    assert len(errors) == 1, proc.stderr
    assert says in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)["error"]


async def store_keys(env: SiteEnv, prefix: str = "") -> list[str]:
    site = await env.open()
    try:
        return [o.key async for o in site.store.list(prefix)]
    finally:
        await site.close()


async def test_bad_paths_and_unknown_names(make_site: MakeSite) -> None:
    a = await make_site("site-a")
    make_tree(a.data / "x", files=3)
    fails(a, "push", "/elsewhere/x", code=2, says="outside every namespace prefix")
    fails(a, "push", "/proj/../etc", code=2, says="'..'")
    fails(a, "push", "proj/x", code=2, says="must start with '/'")
    fails(a, "push", "/proj/absent", code=3, says="does not exist")
    # A dataset directory that is a link below the configured one may lead anywhere (outside
    # the namespace): push reads no tree through it, as stage writes none.
    outside = a.data.parent / "outside"
    make_tree(outside, files=3)
    (a.data / "linked").symlink_to(outside)
    fails(a, "push", "/proj/linked", code=2, says="is a symlink, not the dataset's directory")
    (a.data / "linked").unlink()
    (a.data / "afile").write_text("x")
    fails(a, "push", "/proj/afile", code=2, says="is not a directory")
    fails(a, "push", "/proj/afile/below", code=2, says="is not a directory")
    (a.data / "afile").unlink()
    fails(a, "stage", "/proj/x", code=3, says="no published version")
    fails(a, "stage", "/proj/x", "--version", "latest", code=2, says="invalid version id")
    fails(a, "verify", "/proj/x", code=3, says="no published version")
    assert await store_keys(a) == []  # nothing was written anywhere
    a.cli_json("push", "/proj/x")
    unknown = new_version_id("site-a")
    error = fails(a, "stage", "/proj/x", "--version", unknown, code=3, says="has no version")
    assert error["code"] == "not_found"


async def test_store_problems_are_named(make_site: MakeSite, seaweed, tmp_path: Path) -> None:
    a = await make_site("site-a")
    make_tree(a.data / "x", files=2)
    good = a.config_path.read_text()

    a.config_path.write_text(good.replace(seaweed.endpoint, "http://127.0.0.1:9"))
    started = time.monotonic()
    fails(a, "push", "/proj/x", code=6, says="http://127.0.0.1:9")
    assert time.monotonic() - started < 30

    a.config_path.write_text(good.replace(seaweed.secret_key, "wrong-secret"))
    fails(a, "push", "/proj/x", code=7, says="refused")

    bucket = good.split('bucket = "')[1].split('"')[0]
    a.config_path.write_text(good.replace(f'bucket = "{bucket}"', 'bucket = "no-such-bucket"'))
    fails(a, "push", "/proj/x", code=7, says="'no-such-bucket' does not exist")

    a.config_path.write_text("[site]\nname = 'x'\n")
    fails(a, "push", "/proj/x", code=2, says="[store] bucket is required")
    a.config_path.write_text(good)
    assert await store_keys(a) == []


@pytest.mark.parametrize(
    ("make_bad", "says"),
    [
        (lambda d: (d / "bad\x07name").write_text("x"), "control character"),
        (lambda d: (d / "bad\nline").write_text("x"), "control character"),
        (
            lambda d: [
                (d / unicodedata.normalize("NFC", "café")).write_text("1"),
                (d / unicodedata.normalize("NFD", "café")).write_text("2"),
            ],
            "Unicode normalisation",
        ),
        (lambda d: (d / "ctl").symlink_to("/tmp/a\x01b"), "control character"),
        (lambda d: (d / "escape").symlink_to("../../outside"), "points outside"),
    ],
)
async def test_bad_names_in_the_source_tree(make_site: MakeSite, make_bad, says: str) -> None:
    a = await make_site("site-a")
    src = a.data / "x"
    make_tree(src, files=2)
    make_bad(src / "d00")
    fails(a, "push", "/proj/x", code=2, says=says)
    assert not [k for k in await store_keys(a, "datasets/")]


async def test_a_link_too_long_for_this_site_is_refused_before_anything_is_written(
    make_site: MakeSite,
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b-whose-directories-are-longer")
    src = a.data / "links"
    src.mkdir()
    # A link into the namespace whose target is 4,095 bytes at site A: at site B, whose data
    # directory has a longer path, the same logical target would be longer than Linux allows.
    rest = ""
    while len(str(a.data)) + len(rest) + 201 <= 4095:
        rest += "/" + "x" * 200
    rest += "/" + "y" * (4095 - len(str(a.data)) - len(rest) - 1)
    target = str(a.data) + rest
    assert len(target) == 4095
    (src / "deep").symlink_to(target)
    (src / "f").write_text("data")
    assert a.cli_json("push", "/proj/links")["symlinks"] == 1
    fails(b, "stage", "/proj/links", code=2, says="longer than 4095 bytes")
    assert not (b.data / "links").exists()


async def test_non_utf8_name_is_rejected(make_site: MakeSite) -> None:
    a = await make_site("site-a")
    src = a.data / "x"
    src.mkdir()
    fd = os.open(os.path.join(os.fsencode(src), b"bad\xff"), os.O_WRONLY | os.O_CREAT)
    os.close(fd)
    fails(
        a,
        "push",
        "/proj/x",
        code=2,
        says=r"invalid name 'bad\xff' in '.': bytes that are not valid UTF-8",
    )


async def publish_manifest(env: SiteEnv, dataset: str, entries: list[Entry]) -> str:
    """Publish a hand-made (possibly hostile) version straight into the store."""
    site = await env.open()
    try:
        data = encode_segment(entries)
        digest = await site.repo.put_manifest_object(data)
        ref = SegmentRef(digest, len(data), len(entries), entries[0].path, entries[-1].path, 0)
        listing = encode_list([ref])
        list_digest = await site.repo.put_manifest_object(listing)
        doc = VersionDoc(
            dataset,
            new_version_id("site-a"),
            None,
            "site-a",
            utc_now(),
            list_digest.hex(),
            len(listing),
            1,
            len(entries),
            0,
            0,
            0,
        )
        await site.repo.publish(doc)
        return doc.version
    finally:
        await site.close()


@pytest.mark.parametrize(
    "entries",
    [
        [Entry("../evil", Kind.FILE, 0o644, 0)],
        [Entry("/etc/evil", Kind.FILE, 0o644, 0)],
        [Entry("a", Kind.SYMLINK, 0o777, 0, 2, ".."), Entry("b", Kind.FILE, 0o644, 0)],
        [Entry("a", Kind.SYMLINK, 0o777, 0, 1, "d"), Entry("a/evil", Kind.FILE, 0o644, 0)],
        [Entry("z", Kind.FILE, 0o644, 0), Entry("a", Kind.FILE, 0o644, 0)],
    ],
)
async def test_hostile_manifest_is_rejected_before_any_write(
    make_site: MakeSite, tmp_path: Path, entries: list[Entry]
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    await publish_manifest(a, "/proj/evil", entries)
    fails(b, "stage", "/proj/evil", code=5, says="malformed")
    assert not (b.data / "evil").exists() or list((b.data / "evil").iterdir()) == []
    assert not (b.data / "etc").exists() and not (b.data.parent / "evil").exists()


async def flip_pack_byte(env: SiteEnv, offset: int) -> None:
    """Damage one byte of the only pack in the bucket, as a faulty store or disk would."""
    site = await env.open()
    try:
        [pack_key] = [k async for k in (o.key async for o in site.store.list("packs/"))]
        data = bytearray(await site.store.get(pack_key))
        data[offset] ^= 0xFF
        await site.store.put(pack_key, bytes(data))
    finally:
        await site.close()


async def test_corrupt_pack_is_detected_and_names_the_file(make_site: MakeSite) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    src = a.data / "x"
    src.mkdir()
    (src / "precious.dat").write_bytes(os.urandom(50_000))
    a.cli_json("push", "/proj/x")
    await flip_pack_byte(a, 100)
    fails(b, "stage", "/proj/x", code=5, says="'precious.dat'")
    assert not (b.data / "x" / "precious.dat").exists()
    leftovers = [p.name for p in (b.data / "x").iterdir()] if (b.data / "x").exists() else []
    assert leftovers == []


async def test_corrupt_pack_is_detected_by_a_writer_process(make_site: MakeSite) -> None:
    # Enough files for stage to hand batches to worker processes: the failure crosses the
    # process boundary as the same one-line error, and no file is at its final path torn.
    a, b = await make_site("site-a"), await make_site("site-b")
    src = a.data / "x"
    for d in range(3):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(700):
            (src / f"d{d}" / f"f{f:03d}").write_bytes(os.urandom(64))
    a.cli_json("push", "/proj/x")
    await flip_pack_byte(a, 100_000)
    error = fails(b, "stage", "/proj/x", code=5, says="the data is corrupt")
    named = error["message"].split("'")[1]
    assert (src / named).is_file()  # the file whose chunk is damaged
    assert not (b.data / "x" / named).exists()
    staged = b.data / "x"
    for path in staged.rglob("*"):
        assert not path.name.startswith(".dm-"), path
        if path.is_file():
            assert path.read_bytes() == (src / path.relative_to(staged)).read_bytes()


async def test_corrupt_pack_under_a_large_file_is_detected(make_site: MakeSite) -> None:
    # batch_bytes=1 MiB makes the 8 MiB file "large": its ranges are verified and written by
    # the range threads, and the failure must stop them all before anything is renamed.
    a, b = await make_site("site-a"), await make_site("site-b", batch_bytes=MiB)
    src = a.data / "x"
    src.mkdir()
    (src / "big.dat").write_bytes(os.urandom(8 * MiB))
    a.cli_json("push", "/proj/x")
    await flip_pack_byte(a, 5 * MiB)
    fails(b, "stage", "/proj/x", code=5, says="'big.dat'")
    assert not (b.data / "x" / "big.dat").exists()


async def cut_the_pack(env: SiteEnv, keep: int | None) -> None:
    """Cut the only pack in the bucket to its first `keep` bytes, or delete it (None)."""
    site = await env.open()
    try:
        [pack_key] = [o.key async for o in site.store.list("packs/")]
        if keep is None:
            await site.store.delete(pack_key)
        else:
            await site.store.put(pack_key, (await site.store.get(pack_key))[:keep])
    finally:
        await site.close()


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("keep", [None, 0, 5 * MiB])
async def test_a_pack_cut_short_or_lost_names_the_file_and_says_corrupt(
    make_site: MakeSite, size: str, keep: int | None
) -> None:
    """As a damaged chunk is: the file that needs the missing bytes, and that the data is
    corrupt. It had been `pack packs/.. is shorter than the manifest says (0+5242880 of
    ...)` or `... is missing from the store`, naming no file."""
    a = await make_site("site-a")
    b = await make_site("site-b", batch_bytes=MiB if size == "large" else 64 * MiB)
    src = a.data / "x"
    src.mkdir()
    (src / "a-first.dat").write_bytes(os.urandom(MiB // 2))
    (src / "needed.dat").write_bytes(os.urandom(8 * MiB))
    a.cli_json("push", "/proj/x")
    await cut_the_pack(a, keep)
    error = fails(b, "stage", "/proj/x", code=5, says="the data is corrupt")
    lost = "is missing from the store" if keep is None else "ends after"
    assert lost in error["message"]
    # The file whose bytes are gone: past 5 MiB only the large one's; with none, either.
    named = ("'needed.dat'",) if keep else ("'a-first.dat'", "'needed.dat'")
    assert error["message"].startswith(named), error["message"]
    assert not (b.data / "x" / "needed.dat").exists()


async def test_tampered_manifest_object_is_detected(make_site: MakeSite) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    make_tree(a.data / "x", files=3)
    a.cli_json("push", "/proj/x")
    site = await a.open()
    try:
        keys = [o.key async for o in site.store.list("manifests/")]
        blobs = {key: await site.store.get(key) for key in keys}
        for key, blob in blobs.items():  # same length, one byte changed
            await site.store.put(key, blob[:-1] + bytes([blob[-1] ^ 0xFF]))
        fails(b, "stage", "/proj/x", code=5, says="does not match its digest")
        for key, blob in blobs.items():  # truncated
            await site.store.put(key, blob[: len(blob) // 2])
        fails(b, "stage", "/proj/x", code=5, says="its reference says")
    finally:
        await site.close()
    assert not (b.data / "x").exists()


async def test_file_growing_during_push_is_never_published(make_site: MakeSite) -> None:
    a = await make_site("site-a")
    src = a.data / "x"
    src.mkdir()
    log = src / "growing.log"
    log.write_bytes(os.urandom(8 << 20))
    stop = threading.Event()

    def grow() -> None:
        with open(log, "ab") as f:
            while not stop.is_set():
                f.write(b"more\n")
                f.flush()
                time.sleep(0.0005)

    writer = threading.Thread(target=grow)
    writer.start()
    site = await a.open()
    try:
        with pytest.raises(Conflict, match=r"changed while it was read"):
            await push(site, "/proj/x")
        assert await site.repo.latest("/proj/x") is None
    finally:
        stop.set()
        writer.join()
        await site.close()


async def test_file_vanishing_during_push_is_reported(make_site: MakeSite, monkeypatch) -> None:
    from datamover.transfer import readers

    a = await make_site("site-a")
    make_tree(a.data / "x", files=5)
    real_open = readers.open_file

    def vanish(root: readers.TreeRoot, rel: str):
        if rel.endswith("lig0002.pdbqt"):
            os.unlink(os.path.join(root.path, rel))
        return real_open(root, rel)

    monkeypatch.setattr(readers, "open_file", vanish)
    site = await a.open()
    try:
        with pytest.raises(Conflict, match=r"lig0002\.pdbqt' vanished"):
            await push(site, "/proj/x")
        assert await site.repo.latest("/proj/x") is None
    finally:
        await site.close()


async def test_unreadable_file_is_named(make_site: MakeSite, monkeypatch) -> None:
    from datamover.transfer import readers

    a = await make_site("site-a")
    make_tree(a.data / "x", files=2)
    real_open = os.open

    def refuse(path, flags, *args, **kwargs):  # root reads everything: refuse like a 0o000 file
        if str(path).endswith("ro.txt"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(readers.os, "open", refuse)
    site = await a.open()
    try:
        with pytest.raises(InvalidInput, match=r"ro\.txt'?: permission denied"):
            await push(site, "/proj/x")
        assert await site.repo.latest("/proj/x") is None
    finally:
        await site.close()


@pytest.mark.parametrize("below", [False, True], ids=["a file", "below a file"])
async def test_a_namespace_directory_that_is_a_file_is_named(
    make_site: MakeSite, below: bool
) -> None:
    # Before: stage said "File exists: '.../nsfile'" (exit 1), or "Not a directory" below
    # one; push and verify said "does not exist" below one (exit 3).
    a = await make_site("site-a")
    make_tree(a.data / "x", files=2)
    a.cli_json("push", "/proj/x")
    b = await make_site("site-b")
    nsfile = b.data.parent / "nsfile"
    nsfile.write_text("x")
    base = nsfile / "sub" if below else nsfile
    text = b.config_path.read_text()
    b.config_path.write_text(text.replace(json.dumps(str(b.data)), json.dumps(str(base))))
    says = f"{base}: is not a directory ([namespace] maps the dataset there)"
    for command in ("stage", "push"):
        fails(b, command, "/proj/x", code=2, says=says)
    checked = b.cli("verify", "/proj/x", "--json")  # a mismatch it reports, as it did
    assert checked.returncode == 1 and says in checked.stdout, checked
    assert nsfile.read_text() == "x"
