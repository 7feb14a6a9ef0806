"""Names, relative and logical paths, symlink targets, component order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datamover.domain.ids import check_version_id, new_version_id, version_time
from datamover.domain.namespace import Namespace
from datamover.domain.paths import (
    check_logical_path,
    check_name,
    check_relpath,
    check_symlink_target,
    is_under,
    sort_key,
)
from datamover.errors import InvalidInput


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a/b", "tab\there", "nl\n", "del\x7f", "c1\x85", "bad\udcff", "x" * 256]
)
def test_bad_names_are_rejected(name: str) -> None:
    with pytest.raises(InvalidInput):
        check_name(name)


@pytest.mark.parametrize("name", ["a", "lig0001.pdbqt", "é", "名前", ".hidden", "x" * 255, "a b"])
def test_good_names_pass(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("rel", ["/etc/passwd", "a/../b", "..", "a//b", "a/./b", ""])
def test_bad_relative_paths(rel: str) -> None:
    with pytest.raises(InvalidInput):
        check_relpath(rel)


def test_logical_paths() -> None:
    assert check_logical_path("/proj/x/") == "/proj/x"
    for bad in ["proj/x", "/", "/proj/../etc", "/proj//x", "/proj/./x", "", "/p\x00"]:
        with pytest.raises(InvalidInput):
            check_logical_path(bad)
    assert is_under("/proj/a/b", "/proj/a")
    assert is_under("/proj/a", "/proj/a")
    assert not is_under("/proj/ab", "/proj/a")


@pytest.mark.parametrize(
    ("link", "target", "ok"),
    [
        ("a", "b", True),
        ("d/a", "../b", True),
        ("d/e/a", "../../b/c", True),
        ("a", "../b", False),
        ("d/a", "../../b", False),
        ("a", "/etc/passwd", False),
        ("a", "b/../../x", False),
        ("a", "r/..", False),
        ("a", ".", True),
        ("a", "", False),
        ("a", "b//c", False),
    ],
)
def test_symlink_targets(link: str, target: str, ok: bool) -> None:
    if ok:
        assert check_symlink_target(link, target) == target
    else:
        with pytest.raises(InvalidInput):
            check_symlink_target(link, target)


def test_component_order_differs_from_string_order() -> None:
    paths = ["a.b", "a/b", "a", "a-b", "a/b/c", "b"]
    assert sorted(paths, key=sort_key) == ["a", "a/b", "a/b/c", "a-b", "a.b", "b"]
    assert sorted(paths) != sorted(paths, key=sort_key)


@given(st.lists(st.lists(st.sampled_from(["a", "b", "a.b", "a-b", "é"]), min_size=1, max_size=4)))
def test_sort_key_orders_parents_before_children(parts: list[list[str]]) -> None:
    paths = sorted({"/".join(p) for p in parts}, key=sort_key)
    for i, p in enumerate(paths):
        for q in paths[i + 1 :]:
            assert not p.startswith(q + "/"), "a child sorted before its parent"


def test_namespace_longest_prefix_wins(tmp_path) -> None:
    ns = Namespace.from_mapping({"/proj": str(tmp_path / "p"), "/proj/a": str(tmp_path / "a")})
    assert ns.resolve("/proj/a/x") == tmp_path / "a" / "x"
    assert ns.resolve("/proj/b") == tmp_path / "p" / "b"
    assert ns.resolve("/proj") == tmp_path / "p"
    assert ns.split("/proj/b/c") == (tmp_path / "p", ("b", "c"))
    with pytest.raises(InvalidInput, match="outside every namespace prefix"):
        ns.resolve("/other/x")
    with pytest.raises(InvalidInput):
        ns.resolve("/proj/../etc")
    with pytest.raises(InvalidInput, match="not an absolute path"):
        Namespace.from_mapping({"/proj": "relative/dir"})


def test_version_ids_sort_after_their_parent() -> None:
    first = new_version_id("hpc-a")
    assert check_version_id(first) == first
    later = new_version_id("cloud-b", after=first, now=version_time(first).replace(year=2000))
    assert later > first
    with pytest.raises(InvalidInput):
        check_version_id("20261129T181500Z-../etc")
    with pytest.raises(InvalidInput):
        new_version_id("Bad_Site")
