"""Stage planning: the three-way merge of local tree, target version and base version."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datamover.domain.manifest import ChunkRef, Entry, Kind
from datamover.transfer.fetch import plan_ranges
from datamover.transfer.plan import Op, StagePlanner, children_first
from datamover.transfer.walk import Walker

D = bytes(32)


def file_entry(path: str, size: int, mtime: int, mode: int = 0o644) -> Entry:
    chunks = (ChunkRef(D, D, 0, size, size, 0),) if size else ()
    return Entry(path, Kind.FILE, mode, mtime, size, None, chunks)


def write(root: Path, rel: str, data: bytes, mtime: int, mode: int = 0o644) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    os.utime(path, ns=(mtime, mtime))


def plan(root: Path, target: list[Entry], base: list[Entry] | None = None, delete: bool = False):
    planner = StagePlanner(
        Walker(str(root), strict=False),
        iter(target),
        iter(base) if base is not None else None,
        delete,
    )
    return [(a.op, a.path) for a in planner if a.op is not Op.KEEP or a.entry.kind != Kind.DIR]


def test_empty_target_directory_creates_everything(tmp_path: Path) -> None:
    target = [
        Entry("d", Kind.DIR, 0o755, 1),
        file_entry("d/f", 3, 5),
        Entry("d/l", Kind.SYMLINK, 0o777, 1, 1, "f"),
    ]
    assert plan(tmp_path, target) == [(Op.MKDIR, "d"), (Op.FETCH, "d/f"), (Op.LINK, "d/l")]


def test_unchanged_and_mode_only_changes(tmp_path: Path) -> None:
    write(tmp_path, "a", b"abc", 5)
    write(tmp_path, "b", b"abc", 5, mode=0o600)
    target = [file_entry("a", 3, 5), file_entry("b", 3, 5)]
    assert plan(tmp_path, target) == [(Op.KEEP, "a"), (Op.ATTR, "b")]


def test_file_written_by_us_is_replaced_and_user_change_is_trashed(tmp_path: Path) -> None:
    write(tmp_path, "ours", b"old", 5)
    write(tmp_path, "theirs", b"edited!", 9)
    base = [file_entry("ours", 3, 5), file_entry("theirs", 3, 5)]
    target = [file_entry("ours", 4, 7), file_entry("theirs", 4, 7)]
    assert plan(tmp_path, target, base) == [
        (Op.FETCH, "ours"),
        (Op.TRASH, "theirs"),
        (Op.FETCH, "theirs"),
    ]


def test_directory_in_the_way_is_trashed_whole_and_not_walked(tmp_path: Path) -> None:
    write(tmp_path, "x/inner/deep", b"keep me", 1)
    target = [file_entry("x", 3, 5), file_entry("y", 1, 1)]
    assert plan(tmp_path, target) == [(Op.TRASH, "x"), (Op.FETCH, "x"), (Op.FETCH, "y")]


def test_planted_symlink_where_a_directory_belongs(tmp_path: Path) -> None:
    (tmp_path / "lig0000").symlink_to("/etc")
    target = [Entry("lig0000", Kind.DIR, 0o755, 1), file_entry("lig0000/passwd", 3, 1)]
    assert plan(tmp_path, target) == [
        (Op.TRASH, "lig0000"),
        (Op.MKDIR, "lig0000"),
        (Op.FETCH, "lig0000/passwd"),
    ]


def test_local_only_entries_and_delete(tmp_path: Path) -> None:
    write(tmp_path, "extra_ours", b"1", 1)
    write(tmp_path, "extra_user", b"2", 2)
    write(tmp_path, "extra_dir/f", b"3", 3)
    write(tmp_path, ".dm-0123456789abcdef.part", b"partial", 4)
    base = [file_entry("extra_ours", 1, 1)]
    assert plan(tmp_path, [], base) == [(Op.STALE, ".dm-0123456789abcdef.part")]
    assert plan(tmp_path, [], base, delete=True) == [
        (Op.STALE, ".dm-0123456789abcdef.part"),
        (Op.TRASH, "extra_dir"),
        (Op.REMOVE, "extra_ours"),
        (Op.TRASH, "extra_user"),
    ]


def test_ranges_are_coalesced_per_pack_and_deduplicated() -> None:
    p1, p2 = b"\x01" * 32, b"\x02" * 32

    def ref(pack: bytes, off: int, n: int) -> ChunkRef:
        return ChunkRef(off.to_bytes(32, "big"), pack, off, n, n, 0)

    refs = [
        ref(p1, 0, 100),
        ref(p1, 100, 50),
        ref(p1, 100, 50),
        ref(p1, 1000, 10),
        ref(p1, 5000, 10),
        ref(p2, 0, 10),
    ]
    ranges = plan_ranges(refs, gap=900, max_request=2000)
    got = sorted((r.pack, r.start, r.end, len(r.refs)) for r in ranges)
    assert got == [(p1, 0, 1010, 3), (p1, 5000, 5010, 1), (p2, 0, 10, 1)]
    capped = plan_ranges(refs, gap=10_000, max_request=150)
    assert all(r.end - r.start <= 150 or len(r.refs) == 1 for r in capped)


def test_directory_attributes_go_children_first() -> None:
    # "a-b" sorts after "a"'s subtree in tree order; "a/x" is not below "a/x-y".
    order = ["a", "a/x", "a/x/1", "a/x/2", "a/x-y", "a-b", "b", "b/c/d"]
    dirs = [Entry(p, Kind.DIR, 0o755, 0) for p in order]
    done = [e.path for e in children_first(iter(dirs))]
    assert sorted(done) == sorted(order)
    for path in order:
        below = [p for p in order if p.startswith(path + "/")]
        assert all(done.index(p) < done.index(path) for p in below), (path, done)


def _seconds(ns: int) -> int:
    """A file system with 1 s timestamps (ext4 with 128-byte inodes, FAT, some Lustre)."""
    return ns - ns % 1_000_000_000


def test_a_file_rewritten_within_one_second_is_fetched_on_a_one_second_file_system(
    tmp_path: Path,
) -> None:
    # Versions 1 and 2 of a file of one size, written 0.6 s apart in one second, look alike
    # where mtimes are whole seconds: the tree held version 1's bytes, which datamover
    # wrote, and the stage of version 2 kept them and reported success.
    t = 1_764_583_200_000_000_000  # a whole second
    write(tmp_path, "status", b"state=AAAA\n", t)  # version 1, as the file system stored it
    v1 = Entry(
        "status", Kind.FILE, 0o644, t + 200_000_000, 11, None, (ChunkRef(D, D, 0, 11, 11, 0),)
    )
    v2_digest = b"\x01" * 32
    v2 = Entry(
        "status",
        Kind.FILE,
        0o644,
        t + 800_000_000,
        11,
        None,
        (ChunkRef(v2_digest, D, 0, 11, 11, 0),),
    )

    def actions(
        base: list[Entry] | None, interrupted: list[Entry] | None = None
    ) -> list[tuple[Op, str]]:
        return _actions(
            tmp_path, v2, base, interrupted=_maybe_iter(interrupted), stored_mtime=_seconds
        )

    assert actions([v1]) == [(Op.FETCH, "status")]
    assert actions(None, [v1]) == [(Op.FETCH, "status")]  # a killed stage of version 1
    assert actions([v2]) == [(Op.KEEP, "status")]  # a restage of the version it holds
    assert actions(None) == [(Op.KEEP, "status")]  # nothing to tell it apart from
    same_bytes = Entry("status", Kind.FILE, 0o644, v1.mtime_ns, 11, None, v2.chunks)
    assert actions([same_bytes]) == [(Op.KEEP, "status")]  # only the mtime changed


def test_a_file_changed_under_its_old_size_and_mtime_is_fetched(tmp_path: Path) -> None:
    # Version 2 holds other bytes of the file under version 1's size and mtime (pushed from
    # a `cp -p` of another file): the tree holds version 1's bytes, which datamover wrote,
    # and the stage of version 2 used to keep them, as only mtimes cut by the file system
    # were compared with the base.
    t = 1_764_583_200_123_456_789
    write(tmp_path, "status", b"state=AAAA\n", t)
    v1 = Entry("status", Kind.FILE, 0o644, t, 11, None, (ChunkRef(D, D, 0, 11, 11, 0),))
    v2 = Entry("status", Kind.FILE, 0o644, t, 11, None, (ChunkRef(b"\x01" * 32, D, 0, 11, 11, 0),))

    def actions(
        base: list[Entry] | None, changed_base: list[Entry] | None = None
    ) -> list[tuple[Op, str]]:
        return _actions(tmp_path, v2, base, changed_base=_maybe_iter(changed_base))

    assert actions([v1]) == [(Op.FETCH, "status")]
    assert actions([v1], [v1]) == [(Op.FETCH, "status")]
    # The stage gives only the base's entries outside the segments the target shares: none
    # of them is at this path, so nothing is told apart (the target's entry is the base's).
    assert actions([v1], []) == [(Op.KEEP, "status")]
    assert actions([v2]) == [(Op.KEEP, "status")]  # a restage of the version it holds


def _maybe_iter(entries: list[Entry] | None) -> Iterator[Entry] | None:
    return iter(entries) if entries is not None else None


def _actions(
    root: Path, target: Entry, base: list[Entry] | None, **options: Any
) -> list[tuple[Op, str]]:
    """The actions a planner gives for a target of the one `target` entry over `base`."""
    planner = StagePlanner(
        Walker(str(root), strict=False), iter([target]), _maybe_iter(base), False, **options
    )
    return [(a.op, a.path) for a in planner]


def test_a_symlink_left_under_a_temporary_name_is_removed(tmp_path: Path) -> None:
    # A stage killed between making a link under its temporary name and renaming it left
    # the link there: verify then failed on every later run, and --delete trashed it as a
    # user's change.
    write(tmp_path, "f", b"abc", 5)
    (tmp_path / ".dm-279815d400000000.part").symlink_to("f")
    (tmp_path / ".dm-279815d4.part").symlink_to("f")  # not the reserved form: a user's
    target = [file_entry("f", 3, 5)]
    assert plan(tmp_path, target) == [
        (Op.STALE, ".dm-279815d400000000.part"),
        (Op.KEEP, "f"),
    ]
