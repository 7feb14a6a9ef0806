"""Push refuses to publish a tree that would undo what others published: one behind the
latest version, one emptied (an unmounted file system), one a nested stage changed while it
was read. `--force` publishes the tree as it is. Each test here once failed on the code
before its fix."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest

from datamover.errors import Conflict
from datamover.repo.layout import manifest_key
from datamover.transfer import push as push_module
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from tests.fixtures_sites import MakeSite, SiteEnv


def _latest(env: SiteEnv, dataset: str) -> str:
    listed = env.cli_json("ls", dataset)["datasets"][0]["versions"]
    return max(v["version"] for v in listed)


def _refused(env: SiteEnv, *args: str, says: str) -> str:
    proc = env.cli("push", *args)
    assert proc.returncode == 4, (proc.returncode, proc.stderr)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("datamover: error: ")]
    assert len(lines) == 1 and says in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


async def _pushed(make_site: MakeSite, name: str, files: dict[str, str]) -> tuple[SiteEnv, str]:
    """Site A with `files` (relative paths, text) under `/proj/<name>`, pushed; the site
    and the version."""
    a = await make_site("site-a")
    for rel, text in files.items():
        path = a.data / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return a, a.cli_json("push", f"/proj/{name}")["version"]


async def test_a_tree_staged_at_an_older_version_is_not_pushed_over_the_latest(
    make_site: MakeSite,
) -> None:
    # Before: B's push, with nothing changed at B, published v1's files as the latest,
    # undoing A's v2 (`f` back to its old content, `h` gone), and a stage with --delete
    # then carried that to every site.
    a, b = await make_site("site-a"), await make_site("site-b")
    src = a.data / "lu"
    src.mkdir()
    (src / "f").write_text("version one\n")
    (src / "g").write_text("the same\n")
    v1 = a.cli_json("push", "/proj/lu")["version"]
    b.cli_json("stage", "/proj/lu")
    (src / "f").write_text("version two\n")
    (src / "h").write_text("added in two\n")
    v2 = a.cli_json("push", "/proj/lu")["version"]
    line = _refused(b, "/proj/lu", says="the tree here holds version")
    assert v1 in line and v2 in line and "'site-a'" in line and "--force" in line
    assert _latest(a, "/proj/lu") == v2  # nothing published
    # Brought up to date, B's tree is the latest: nothing to publish.
    b.cli_json("stage", "/proj/lu")
    assert b.cli_json("push", "/proj/lu")["unchanged"] is True
    # A change made at B on top of the latest is published, and then A is behind.
    (b.data / "lu" / "g").write_text("changed at b\n")
    v3 = b.cli_json("push", "/proj/lu")["version"]
    _refused(a, "/proj/lu", says="the tree here holds version")  # A pushed v2: recorded
    a.cli_json("stage", "/proj/lu")
    assert (src / "g").read_text() == "changed at b\n"
    assert a.cli_json("push", "/proj/lu")["version"] == v3  # unchanged
    # --force publishes the tree as it is.
    (b.data / "lu" / "g").write_text("older work at b\n")
    (a.data / "lu" / "f").write_text("version four\n")
    v4 = a.cli_json("push", "/proj/lu")["version"]
    forced = b.cli_json("push", "/proj/lu", "--force")
    assert forced["version"] > v4 and forced["parent"] == v4


async def test_an_emptied_tree_is_not_published_over_a_full_one(make_site: MakeSite) -> None:
    # Before: an unmounted file system's empty mount point was published as the latest.
    a, v1 = await _pushed(make_site, "mnt", {"sub/f": "data\n"})
    src = a.data / "mnt"
    shutil.rmtree(src / "sub")
    line = _refused(a, "/proj/mnt", says="the tree is empty")
    assert "holds 1 file and 1 directory;" in line and "mounted" in line
    assert _latest(a, "/proj/mnt") == v1
    emptied = a.cli_json("push", "/proj/mnt", "--force")
    assert emptied["files"] == 0 and emptied["version"] > v1
    assert a.cli_json("push", "/proj/mnt")["unchanged"] is True  # empty after empty: fine


async def test_an_empty_tree_over_an_unreadable_parent_is_not_unchanged(
    make_site: MakeSite,
) -> None:
    # Before: the parent's manifest lost, the push compared with nothing, found nothing,
    # and answered "unchanged" with the broken parent as the latest, for good.
    a, v1 = await _pushed(make_site, "em", {"keep": "x\n"})
    site = await a.open()
    try:
        doc = await site.repo.read_version("/proj/em", v1)
        for ref in await site.repo.segments(doc):
            await site.store.delete(manifest_key(ref.digest))
        shutil.rmtree(site.repo.cache_dir, ignore_errors=True)
    finally:
        await site.close()
    (a.data / "em" / "keep").unlink()
    _refused(a, "/proj/em", says="the tree is empty")
    forced = a.cli_json("push", "/proj/em", "--force")
    assert forced["unchanged"] is False and forced["version"] > v1 and forced["files"] == 0


async def test_a_nested_stage_while_the_tree_is_read_stops_the_publish(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the nested datasets' records were looked at only when the push began; a
    # stage of /proj/n/b run meanwhile (its lock is not /proj/n's) got into the version,
    # part of b/ one version and part the other.
    a = await make_site("site-a")
    (a.data / "n" / "b").mkdir(parents=True)
    (a.data / "n" / "b" / "f").write_text("b one\n")
    (a.data / "n" / "top").write_text("top\n")
    site = await a.open()
    try:
        vb1 = (await push(site, "/proj/n/b")).version
        (a.data / "n" / "b" / "f").write_text("b two, longer\n")
        await push(site, "/proj/n/b")
        build = push_module._build
        ran: list[str] = []

        async def build_then_stage(*args: Any, **kwargs: Any) -> Any:
            built = await build(*args, **kwargs)
            if not ran:  # once the tree is read, a stage of the nested dataset runs
                ran.append((await stage(site, "/proj/n/b", version=vb1)).version)
            return built

        monkeypatch.setattr(push_module, "_build", build_then_stage)
        with pytest.raises(Conflict, match="'/proj/n/b', which shares files with this tree"):
            await push(site, "/proj/n")
        assert ran == [vb1]
        assert await site.repo.latest("/proj/n") is None  # nothing published
        monkeypatch.setattr(push_module, "_build", build)
        again = await push(site, "/proj/n")  # read again, as the tree is now
        assert again.files == 2 and not again.unchanged
    finally:
        await site.close()


async def test_a_staged_large_file_changed_here_uploads_only_its_new_chunks(
    make_site: MakeSite,
) -> None:
    # Before: the site's chunk index knows only what it pushed, not what it staged, so a
    # one-byte edit of a staged 20 MB file uploaded all of it again (16 chunks, 20 MB).
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "big").mkdir()
    data = bytearray(os.urandom(20 << 20))
    (a.data / "big" / "f").write_bytes(data)
    first = a.cli_json("push", "/proj/big")
    assert first["new_chunks"] > 4
    b.cli_json("stage", "/proj/big")
    data[10 << 20] ^= 0xFF
    (b.data / "big" / "f").write_bytes(data)
    pushed = b.cli_json("push", "/proj/big")
    assert pushed["files_read"] == 1 and pushed["new_chunks"] <= 2, pushed
    assert pushed["uploaded_bytes"] < 5 << 20, pushed
    a.cli_json("stage", "/proj/big")  # the version reads back whole, byte for byte
    assert (a.data / "big" / "f").read_bytes() == bytes(data)
    # A chunk of the previous version whose pack is gone from the store is uploaded again.
    site = await b.open()
    try:
        packs = [o.key async for o in site.store.list("packs/")]
        for key in packs:
            await site.store.delete(key)
    finally:
        await site.close()
    data[1 << 20] ^= 0xFF
    (b.data / "big" / "f").write_bytes(data)
    healed = b.cli_json("push", "/proj/big")
    assert healed["uploaded_bytes"] > 19 << 20, healed
    a.cli_json("stage", "/proj/big")
    assert (a.data / "big" / "f").read_bytes() == bytes(data)


async def test_several_large_files_edited_upload_only_their_new_chunks(
    make_site: MakeSite,
) -> None:
    # Before: a batch of pieces that ended one large file and began the next looked all
    # its chunks up in the next file's previous chunks only: the end of the first was
    # uploaded again (11 chunks, 12.4 MiB for three one-byte edits).
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "big").mkdir()
    datas = []
    for name in ("f1", "f2", "f3"):
        data = bytearray(os.urandom(12 << 20))
        (a.data / "big" / name).write_bytes(data)
        datas.append(data)
    a.cli_json("push", "/proj/big")
    b.cli_json("stage", "/proj/big")
    for name, data in zip(("f1", "f2", "f3"), datas, strict=True):
        data[1 << 20] ^= 0xFF
        (b.data / "big" / name).write_bytes(data)
    pushed = b.cli_json("push", "/proj/big")
    assert pushed["files_read"] == 3 and pushed["new_chunks"] <= 6, pushed
    assert pushed["uploaded_bytes"] < 8 << 20, pushed


async def test_a_rolled_back_tree_is_behind_even_after_this_sites_own_push(
    make_site: MakeSite,
) -> None:
    # Before: a latest version published by this site was taken for this tree's, so a
    # push after `stage --version v1` here published v1's files over this site's own v2.
    a, v1 = await _pushed(make_site, "rb", {"f": "one\n"})
    (a.data / "rb" / "h").write_text("added in two\n")
    v2 = a.cli_json("push", "/proj/rb")["version"]
    a.cli_json("stage", "/proj/rb", "--version", v1, "--delete")
    assert not (a.data / "rb" / "h").exists()
    line = _refused(a, "/proj/rb", says="the tree here holds version")
    assert v1 in line and v2 in line
    assert _latest(a, "/proj/rb") == v2
    a.cli_json("stage", "/proj/rb")
    assert a.cli_json("push", "/proj/rb")["version"] == v2  # unchanged


async def test_a_restage_of_the_same_nested_version_while_the_tree_is_read_is_no_change(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: any nested record touched while the tree was read refused the push, so a
    # job's prolog restaging the nested dataset it had kept failing a long push each time.
    a = await make_site("site-a")
    (a.data / "n" / "b").mkdir(parents=True)
    (a.data / "n" / "b" / "f").write_text("b one\n")
    site = await a.open()
    try:
        vb = (await push(site, "/proj/n/b")).version
        build = push_module._build

        async def build_then_restage(*args: Any, **kwargs: Any) -> Any:
            built = await build(*args, **kwargs)
            assert (await stage(site, "/proj/n/b", version=vb)).version == vb
            return built

        monkeypatch.setattr(push_module, "_build", build_then_restage)
        pushed = await push(site, "/proj/n")
        assert pushed.files == 1 and not pushed.unchanged
    finally:
        await site.close()


async def test_a_nested_push_while_the_tree_is_read_is_named_as_a_push_too(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: a push of /proj/n/b while /proj/n was read refused /proj/n saying "a stage
    # of '/proj/n/b' ... ran", though no stage had run.
    a = await make_site("site-a")
    (a.data / "n" / "b").mkdir(parents=True)
    (a.data / "n" / "b" / "f").write_text("b one\n")
    site = await a.open()
    try:
        await push(site, "/proj/n/b")
        build = push_module._build
        pushed: list[str] = []

        async def build_then_push(*args: Any, **kwargs: Any) -> Any:
            built = await build(*args, **kwargs)
            if not pushed:  # the nested push's own build passes straight through
                pushed.append("")
                (a.data / "n" / "b" / "f").write_text("b two, longer\n")
                pushed[0] = (await push(site, "/proj/n/b")).version
            return built

        monkeypatch.setattr(push_module, "_build", build_then_push)
        with pytest.raises(Conflict) as refused:
            await push(site, "/proj/n")
        message = str(refused.value)
        assert "'/proj/n/b', which shares files with this tree, was staged or pushed " in message
        assert pushed[0] in message and "a stage of" not in message
        assert await site.repo.latest("/proj/n") is None
    finally:
        await site.close()
