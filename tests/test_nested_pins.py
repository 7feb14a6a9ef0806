"""A stage does not change files that jobs pinning a nested dataset read (`transfer.pins`).

`/proj/ds` and `/proj/ds/sub` share one tree: a stage of either can change what a job
reading the other sees. Before, pins on nested datasets were not looked at, and a stage of
`/proj/ds` rewrote `sub/f` under a running job that had pinned `/proj/ds/sub`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from datamover.catalog.access import Access
from datamover.domain.manifest import ChunkRef, Entry, Kind
from datamover.errors import Pinned
from datamover.repo.manifest import SegmentRef
from datamover.site import Site
from datamover.transfer.pins import _covering, _first_change
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from tests.fixtures_sites import MakeSite, SiteEnv

# -- the comparison ------------------------------------------------------------------------


def _file(path: str, digest: bytes = b"a", mode: int = 0o644, mtime: int = 1) -> Entry:
    ref = ChunkRef(digest * 32, b"p" * 32, 0, 1, 1, 0)
    return Entry(path, Kind.FILE, mode, mtime, 1, None, (ref,))


def _dir(path: str, mode: int = 0o755) -> Entry:
    return Entry(path, Kind.DIR, mode, 1)


def _change(new: list[Entry], held: list[Entry], delete: bool = False) -> str | None:
    return _first_change(iter(new), iter(held), delete)


def test_the_first_change_is_found_in_manifest_order() -> None:
    held = [_dir("d"), _file("d/f"), _file("g")]
    assert _change(held, held) is None
    # Times and directory modes are no change a reader sees.
    assert _change([_dir("d", 0o700), _file("d/f", mtime=9), _file("g")], held) is None
    assert _change([_dir("d"), _file("d/f", b"b"), _file("g")], held) == "d/f"  # content
    assert _change([_dir("d"), _file("d/f", mode=0o600), _file("g")], held) == "d/f"
    assert _change([*held, _file("h")], held) == "h"  # added
    assert _change([_dir("d"), _file("d/f")], held) is None  # "g" stays without --delete
    assert _change([_dir("d"), _file("d/f")], held, delete=True) == "g"
    link = Entry("d/f", Kind.SYMLINK, 0o777, 1, 1, "x")
    assert _change([_dir("d"), link, _file("g")], held) == "d/f"  # kind
    # "d/f" sorts before "d.x" component-wise although "/" > "." as characters.
    assert _change([_dir("d"), _file("d/f"), _file("d.x")], [_dir("d"), _file("d/f")]) == "d.x"


def _ref(first: str, last: str) -> SegmentRef:
    return SegmentRef(b"s" * 32, 1, 1, first, last, 0)


def test_only_the_segments_covering_a_subtree_are_chosen() -> None:
    refs = [_ref("a", "ds/a"), _ref("ds/b", "ds/sub/f"), _ref("ds/sub/g", "ds/z"), _ref("e", "f")]
    assert _covering(refs, "ds/sub") == refs[1:3]
    assert _covering(refs, "ds") == refs[0:3]
    assert _covering(refs, "nope") == []


# -- stages ---------------------------------------------------------------------------------


async def _two_sites(make_site: MakeSite) -> tuple[SiteEnv, SiteEnv, Site, Site]:
    """Site A with `ds/sub/f`, `ds/sub/g` and `ds/top`; site B to stage at."""
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds" / "sub").mkdir(parents=True)
    (a.data / "ds" / "sub" / "f").write_text("f 1\n")
    (a.data / "ds" / "sub" / "g").write_text("g 1\n")
    (a.data / "ds" / "top").write_text("top 1\n")
    return a, b, await a.open(), await b.open()


def _read(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


async def test_a_parents_stage_does_not_change_a_pinned_childs_files(
    make_site: MakeSite,
) -> None:
    a, b, site_a, site_b = await _two_sites(make_site)
    try:
        child = (await push(site_a, "/proj/ds/sub")).version
        await stage(site_b, "/proj/ds/sub", pin=("slurm-101", "t"))
        await Access(site_b.catalog.engine).add_pin("slurm-101", "/proj/ds/sub", "t", child)
        await push(site_a, "/proj/ds")
        # The parent holds the same files below sub/: nothing changes under the job.
        await stage(site_b, "/proj/ds", pin=("slurm-104", "t"))
        (a.data / "ds" / "top").write_text("top 2\n")
        await push(site_a, "/proj/ds")
        await stage(site_b, "/proj/ds", pin=("slurm-104", "t"))  # a change outside sub/
        assert (b.data / "ds" / "top").read_text() == "top 2\n"
        before = _read(b.data / "ds")

        (a.data / "ds" / "sub" / "f").write_text("f 2, changed\n")
        v3 = (await push(site_a, "/proj/ds")).version
        with pytest.raises(Pinned, match=r"'/proj/ds/sub' is held at .* by pin 'slurm-101'"):
            await stage(site_b, "/proj/ds", pin=("slurm-104", "t"))
        with pytest.raises(Pinned, match=r"would change '/proj/ds/sub/f' under the jobs"):
            await stage(site_b, "/proj/ds", pin=("slurm-104", "t"))
        with pytest.raises(Pinned, match="another tenant's pin"):
            await stage(site_b, "/proj/ds", pin=("slurm-104", "other"))
        assert _read(b.data / "ds") == before  # nothing written
        # The pin's own job goes ahead, as does --force; released, anyone.
        assert (await stage(site_b, "/proj/ds", pin=("slurm-101", "t"))).version == v3
        assert (b.data / "ds" / "sub" / "f").read_text() == "f 2, changed\n"
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_parent_without_a_childs_file_removes_it_only_with_delete(
    make_site: MakeSite,
) -> None:
    a, b, site_a, site_b = await _two_sites(make_site)
    try:
        child = (await push(site_a, "/proj/ds/sub")).version
        await stage(site_b, "/proj/ds/sub")
        await Access(site_b.catalog.engine).add_pin("slurm-101", "/proj/ds/sub", "t", child)
        (a.data / "ds" / "sub" / "g").unlink()
        await push(site_a, "/proj/ds")
        await stage(site_b, "/proj/ds")  # without --delete, sub/g stays: no change
        assert (b.data / "ds" / "sub" / "g").read_text() == "g 1\n"
        with pytest.raises(Pinned, match=r"would change '/proj/ds/sub/g'"):
            await stage(site_b, "/proj/ds", delete=True)
        assert (b.data / "ds" / "sub" / "g").read_text() == "g 1\n"
        await stage(site_b, "/proj/ds", delete=True, force=True)
        assert not (b.data / "ds" / "sub" / "g").exists()
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_childs_stage_does_not_change_a_pinned_parents_files(make_site: MakeSite) -> None:
    a, b, site_a, site_b = await _two_sites(make_site)
    try:
        parent = (await push(site_a, "/proj/ds")).version
        await stage(site_b, "/proj/ds")
        await Access(site_b.catalog.engine).add_pin("slurm-101", "/proj/ds", "t", parent)
        await push(site_a, "/proj/ds/sub")
        await stage(site_b, "/proj/ds/sub", pin=("slurm-104", "t"))  # the same files
        (a.data / "ds" / "sub" / "h").write_text("new\n")
        await push(site_a, "/proj/ds/sub")
        with pytest.raises(Pinned, match=r"'/proj/ds' is held .* change '/proj/ds/sub/h'"):
            await stage(site_b, "/proj/ds/sub", pin=("slurm-104", "t"))
        assert not (b.data / "ds" / "sub" / "h").exists()
        # The pinned parent's restage of its own version is no change either way.
        assert (await stage(site_b, "/proj/ds", version=parent)).version == parent
        await Access(site_b.catalog.engine).release("slurm-101", "t")
        await stage(site_b, "/proj/ds/sub")
        assert (b.data / "ds" / "sub" / "h").read_text() == "new\n"
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_restage_of_the_parent_over_a_pinned_childs_newer_files_is_refused(
    make_site: MakeSite,
) -> None:
    # The parent's record says its version is there, but the job's child version put other
    # files below sub/: a restage of the parent's version would put the old ones back.
    a, b, site_a, site_b = await _two_sites(make_site)
    try:
        parent = (await push(site_a, "/proj/ds")).version
        await stage(site_b, "/proj/ds")
        (a.data / "ds" / "sub" / "f").write_text("f 2\n")
        child = (await push(site_a, "/proj/ds/sub")).version
        await stage(site_b, "/proj/ds/sub")
        await Access(site_b.catalog.engine).add_pin("slurm-7", "/proj/ds/sub", "t", child)
        with pytest.raises(Pinned, match=r"would change '/proj/ds/sub/f'"):
            await stage(site_b, "/proj/ds", version=parent)
        assert (b.data / "ds" / "sub" / "f").read_text() == "f 2\n"
    finally:
        await site_a.close()
        await site_b.close()


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_a_nested_prefix_mapped_elsewhere_is_another_tree(make_site: MakeSite) -> None:
    a, b, site_a, site_b = await _two_sites(make_site)
    await site_b.close()
    elsewhere = b.data.parent / "elsewhere"
    elsewhere.mkdir()  # a mapped directory is the operator's to make, stage makes none
    text = b.config_path.read_text()
    b.config_path.write_text(
        text.replace("[namespace]\n", f'[namespace]\n"/proj/ds/sub" = "{elsewhere}"\n')
    )
    site_b = await b.open()
    try:
        child = (await push(site_a, "/proj/ds/sub")).version
        await stage(site_b, "/proj/ds/sub")
        assert (elsewhere / "f").read_text() == "f 1\n"
        await Access(site_b.catalog.engine).add_pin("slurm-101", "/proj/ds/sub", "t", child)
        (a.data / "ds" / "sub" / "f").write_text("f 2\n")
        await push(site_a, "/proj/ds")
        await stage(site_b, "/proj/ds")  # its sub/ is another directory than the child's
        assert (b.data / "ds" / "sub" / "f").read_text() == "f 2\n"
        assert (elsewhere / "f").read_text() == "f 1\n"
    finally:
        await site_a.close()
        await site_b.close()


def _lines(text: str) -> Iterator[str]:
    return iter(text.strip().splitlines())


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_the_cli_says_pinned_in_one_line_and_exits_11(make_site: MakeSite) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds" / "sub").mkdir(parents=True)
    (a.data / "ds" / "sub" / "f").write_text("f 1\n")
    assert a.cli("push", "/proj/ds/sub").returncode == 0
    assert b.cli("stage", "/proj/ds/sub", "--pin", "slurm-101").returncode == 0
    (a.data / "ds" / "sub" / "f").write_text("f 2\n")
    assert a.cli("push", "/proj/ds").returncode == 0
    proc = b.cli("stage", "/proj/ds", "--pin", "slurm-104")
    assert proc.returncode == 11, proc.stderr
    assert len(list(_lines(proc.stderr))) == 1 and "pin 'slurm-101'" in proc.stderr
    assert (b.data / "ds" / "sub" / "f").read_text() == "f 1\n"
    assert b.cli("stage", "/proj/ds", "--force").returncode == 0
    assert (b.data / "ds" / "sub" / "f").read_text() == "f 2\n"


# -- a parent's stage over a nested dataset's newer files ------------------------------------


async def _par_child(make_site: MakeSite, text: str) -> tuple[SiteEnv, SiteEnv]:
    """Sites A and B, A holding `par/child/f` with `text`."""
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "par" / "child").mkdir(parents=True)
    (a.data / "par" / "child" / "f").write_text(text)
    return a, b


async def test_a_parents_stage_over_a_childs_newer_files_stops_the_childs_push(
    make_site: MakeSite,
) -> None:
    # Before: the parent's stage put its older `child/f` back, the child's record still
    # said its newer version was there, and the child's push published the older file as
    # its latest, for every site to stage.
    from datamover.errors import Conflict
    from datamover.scheduler.satisfied import _tree_holds

    a, b = await _par_child(make_site, "v1\n")
    (a.data / "par" / "g").write_text("g\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/par")
        (a.data / "par" / "child" / "f").write_text("v2, the child's\n")
        child = (await push(site_a, "/proj/par/child")).version
        await stage(site_b, "/proj/par")
        await stage(site_b, "/proj/par/child")
        assert (b.data / "par" / "child" / "f").read_text() == "v2, the child's\n"

        await stage(site_b, "/proj/par")  # its own version again: the older child/f back
        assert (b.data / "par" / "child" / "f").read_text() == "v1\n"
        record = await site_b.catalog.replica("/proj/par/child")
        assert record is not None and (record.state, record.version) == ("overwritten", child)
        assert not await _tree_holds(site_b, "/proj/par/child", child)  # not "satisfied"
        with pytest.raises(Conflict, match="a stage of a dataset above it changed files"):
            await push(site_b, "/proj/par/child")
        assert (await site_b.repo.latest("/proj/par/child")) == child  # nothing published
        # The parent's own push is not held up by it.
        assert (await push(site_b, "/proj/par")).unchanged
        # Staging the child again brings its files back and its record to ready.
        await stage(site_b, "/proj/par/child")
        assert (b.data / "par" / "child" / "f").read_text() == "v2, the child's\n"
        pushed = await push(site_b, "/proj/par/child")
        assert pushed.unchanged and pushed.version == child
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_parents_stage_that_leaves_a_childs_files_as_they_are_marks_nothing(
    make_site: MakeSite,
) -> None:
    a, b = await _par_child(make_site, "same\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/par/child")
        await stage(site_b, "/proj/par/child")
        (a.data / "par" / "g").write_text("new outside the child\n")
        await push(site_a, "/proj/par")
        await stage(site_b, "/proj/par")
        record = await site_b.catalog.replica("/proj/par/child")
        assert record is not None and record.state == "ready"
        assert (await push(site_b, "/proj/par/child")).unchanged
    finally:
        await site_a.close()
        await site_b.close()


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_the_cli_refuses_the_overwritten_childs_push_and_force_publishes(
    make_site: MakeSite,
) -> None:
    a, b = await _par_child(make_site, "v1\n")
    assert a.cli("push", "/proj/par").returncode == 0
    (a.data / "par" / "child" / "f").write_text("v2\n")
    assert a.cli("push", "/proj/par/child").returncode == 0
    assert b.cli("stage", "/proj/par/child").returncode == 0
    assert b.cli("stage", "/proj/par").returncode == 0
    proc = b.cli("push", "/proj/par/child")
    assert proc.returncode == 4, proc.stderr
    assert len(list(_lines(proc.stderr))) == 1 and "stage it again" in proc.stderr
    assert b.cli("push", "/proj/par/child", "--force").returncode == 0


# -- after review: a file where the nested tree is, a failure before writing, corruption ------


async def test_a_parent_with_a_file_where_a_pinned_childs_tree_is_is_refused(
    make_site: MakeSite,
) -> None:
    # Before: only the entries below `sub/` were compared; a parent holding `sub` as a file
    # (or a symlink, or a file at a directory above it) moved the child's tree to the trash.
    a, b, site_a, site_b = await _two_sites(make_site)
    try:
        child = (await push(site_a, "/proj/ds/sub")).version
        await stage(site_b, "/proj/ds/sub")
        await Access(site_b.catalog.engine).add_pin("slurm-1", "/proj/ds/sub", "t", child)
        sub = a.data / "ds" / "sub"
        for name in ("f", "g"):
            (sub / name).unlink()
        sub.rmdir()
        sub.write_text("now a file\n")
        await push(site_a, "/proj/ds")
        with pytest.raises(Pinned, match=r"would change '/proj/ds/sub' under the jobs"):
            await stage(site_b, "/proj/ds")
        sub.unlink()
        sub.symlink_to("top")
        await push(site_a, "/proj/ds")
        with pytest.raises(Pinned, match=r"would change '/proj/ds/sub' under the jobs"):
            await stage(site_b, "/proj/ds")
        assert (b.data / "ds" / "sub" / "f").read_text() == "f 1\n"
        # Unpinned, the stage goes ahead and the child's record says its tree is gone.
        await Access(site_b.catalog.engine).release("slurm-1", "t")
        await stage(site_b, "/proj/ds")
        record = await site_b.catalog.replica("/proj/ds/sub")
        assert record is not None and record.state == "overwritten"
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_file_at_a_directory_above_a_pinned_child_is_a_change(
    make_site: MakeSite,
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds" / "mid" / "sub").mkdir(parents=True)
    (a.data / "ds" / "mid" / "sub" / "f").write_text("f\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        child = (await push(site_a, "/proj/ds/mid/sub")).version
        await stage(site_b, "/proj/ds/mid/sub")
        await Access(site_b.catalog.engine).add_pin("slurm-1", "/proj/ds/mid/sub", "t", child)
        (a.data / "ds" / "mid" / "sub" / "f").unlink()
        (a.data / "ds" / "mid" / "sub").rmdir()
        (a.data / "ds" / "mid").rmdir()
        (a.data / "ds" / "mid").write_text("a file\n")
        await push(site_a, "/proj/ds")
        with pytest.raises(Pinned, match=r"would change '/proj/ds/mid' under the jobs"):
            await stage(site_b, "/proj/ds")
        assert (b.data / "ds" / "mid" / "sub" / "f").read_text() == "f\n"
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_parents_stage_that_fails_before_writing_unmarks_the_child(
    make_site: MakeSite,
) -> None:
    a, b = await _par_child(make_site, "v1\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/par/child")
        await stage(site_b, "/proj/par/child")
        (a.data / "par" / "child" / "new").write_text("new\n")
        await push(site_a, "/proj/par")
        packs = [o.key async for o in site_a.store.list("packs/")]
        for key in packs:
            await site_a.store.delete(key)
        with pytest.raises(Exception, match="missing from the store"):
            await stage(site_b, "/proj/par")
        assert not (b.data / "par" / "child" / "new").exists()
        record = await site_b.catalog.replica("/proj/par/child")
        assert record is not None and record.state == "ready"  # nothing was changed
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_pinned_version_that_is_corrupt_counts_as_a_change(make_site: MakeSite) -> None:
    from datamover.repo.layout import version_key

    _, _, site_a, site_b = await _two_sites(make_site)
    try:
        child = (await push(site_a, "/proj/ds/sub")).version
        await stage(site_b, "/proj/ds/sub")
        await Access(site_b.catalog.engine).add_pin("slurm-1", "/proj/ds/sub", "t", child)
        await push(site_a, "/proj/ds")  # the same files below sub/
        await site_a.store.put(version_key("/proj/ds/sub", child), b"{not a version")
        with pytest.raises(Pinned, match=r"would change '/proj/ds/sub' under the jobs"):
            await stage(site_b, "/proj/ds")  # it was a Corrupt error, exit 5
    finally:
        await site_a.close()
        await site_b.close()
