"""Names, relative and logical paths, symlink targets, component order."""

from __future__ import annotations

from pathlib import Path

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
    nfc,
    plain_names,
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
    long = "/p/" + "/".join(["x" * 254] * 4)  # 1,022 bytes
    assert check_logical_path(long + "/y") == long + "/y"
    with pytest.raises(InvalidInput, match=r"1025 bytes long, more than 1024$"):
        check_logical_path(long + "/é")  # 1,025 bytes in UTF-8
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
        ("a", "/etc/passwd", True),
        ("d/a", "/usr/bin/python3", True),
        ("a", "/x/\x01", False),
        ("a", "/" + "x" * 4094, True),
        ("a", "/" + "x" * 4095, False),
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


@pytest.mark.parametrize(
    ("link", "target", "message"),
    [
        ("l", "a\nb", "symlink 'l' has a target with a control character U+000A"),
        ("l", "bad\udcff", "symlink 'l' has a target with bytes that are not valid UTF-8"),
        ("x\udcff", "\x01", "symlink 'x\\xff' has a target with a control character U+0001"),
    ],
)
def test_a_bad_symlink_target_is_named_in_plain_words(link: str, target: str, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_symlink_target(link, target)
    assert str(caught.value) == message


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


SITE_A = Namespace.from_mapping(
    {
        "/proj": "/public/home/dp/proj",
        "/proj/big": "/scratch/big",  # elsewhere: shadows /public/home/dp/proj/big
        "/proj/ref": "/public/home/dp/proj/ref",  # nested where /proj has it anyway
    }
)
SITE_B = Namespace.from_mapping({"/proj": "/gpfs/proj"})


@pytest.mark.parametrize(
    ("local_a", "stored", "local_b"),
    [
        # into a mapped directory: stored logical, written as each site's local path
        ("/public/home/dp/proj/run5/out", "/proj/run5/out", "/gpfs/proj/run5/out"),
        ("/public/home/dp/proj", "/proj", "/gpfs/proj"),
        ("/public/home/dp/proj/", "/proj/", "/gpfs/proj/"),
        ("/public/home/dp/proj/run5/", "/proj/run5/", "/gpfs/proj/run5/"),
        ("/scratch/big/traj.bin", "/proj/big/traj.bin", "/gpfs/proj/big/traj.bin"),
        ("/public/home/dp/proj/ref/x", "/proj/ref/x", "/gpfs/proj/ref/x"),
        # outside every mapped directory, not a plain path below one, or in a directory a
        # deeper prefix shadows (site A would write /proj/big/x as /scratch/big/x): verbatim
        ("/usr/bin/python3", "/usr/bin/python3", "/usr/bin/python3"),
        ("/public/home/dp/project", "/public/home/dp/project", "/public/home/dp/project"),
        (
            "/public/home/dp/proj/../etc",
            "/public/home/dp/proj/../etc",
            "/public/home/dp/proj/../etc",
        ),
        ("/public/home/dp/proj//x", "/public/home/dp/proj//x", "/public/home/dp/proj//x"),
        ("/public/home/dp/proj/big/x", "/public/home/dp/proj/big/x", "/public/home/dp/proj/big/x"),
        # relative targets are never rewritten
        ("../run5", "../run5", "../run5"),
    ],
)
def test_symlink_targets_follow_the_namespace(local_a: str, stored: str, local_b: str) -> None:
    assert SITE_A.link_to_logical(local_a) == stored
    assert SITE_B.link_to_local(stored) == local_b
    assert SITE_A.link_to_local(stored) == local_a  # back where it came from
    assert SITE_B.link_to_logical(local_b) == (stored if local_b != local_a else local_a)


def test_a_logical_absolute_target_is_mapped_even_if_written_logically() -> None:
    # `/proj/x` is not under a local directory of site A, but it is a logical path: stored
    # as is and read as logical everywhere.
    assert SITE_A.link_to_logical("/proj/x") == "/proj/x"
    assert SITE_B.link_to_local("/proj/x") == "/gpfs/proj/x"
    # a logical prefix of another site's namespace that this site lacks stays verbatim
    assert Namespace.from_mapping({"/other": "/o"}).link_to_local("/proj/x") == "/proj/x"


def test_a_link_to_a_logical_path_is_the_same_link_in_either_form() -> None:
    # site A has a link to `/proj/x` itself (say /proj is an alias of its local directory):
    # stored as is, staged as each site's local path, and either form counts as that link
    stored = SITE_A.link_to_logical("/proj/x")
    assert SITE_A.same_link("/proj/x", stored)  # the pushing site's own link is kept
    assert SITE_A.same_link(SITE_A.link_to_local(stored), stored)  # and what stage writes
    assert SITE_B.same_link("/gpfs/proj/x", stored) and SITE_B.same_link("/proj/x", stored)
    assert not SITE_A.same_link("/proj/y", stored)
    assert not SITE_B.same_link("/public/home/dp/proj/x", stored)  # site A's local path
    assert SITE_B.same_link("/usr/bin/python3", "/usr/bin/python3")
    assert not SITE_B.same_link("/usr/bin/python", "/usr/bin/python3")
    assert SITE_B.same_link("../run5", "../run5") and not SITE_B.same_link("run5", "../run5")


def test_a_link_whose_logical_form_would_be_too_long_is_kept_verbatim() -> None:
    ns = Namespace.from_mapping({"/a/very/long/logical/prefix": "/g"})
    target = "/g/" + "x" * 4090  # a target Linux stores; its logical form would not fit
    assert ns.link_to_logical(target) == target
    check_symlink_target("l", ns.link_to_logical(target))
    assert ns.link_to_logical("/g/x") == "/a/very/long/logical/prefix/x"


def test_namespace_directories_with_dot_components_are_refused() -> None:
    # `/gpfs/x/../a/b` would give the files below /gpfs/a/b a second logical path
    with pytest.raises(InvalidInput, match="without '\\.' or"):
        Namespace.from_mapping({"/a": "/gpfs/a", "/b": "/gpfs/x/../a/b"})
    with pytest.raises(InvalidInput, match="without '\\.' or"):
        Namespace.from_mapping({"/a": "/gpfs/./a"})


@pytest.mark.parametrize(
    "mapping",
    [
        {"/proj": "/d", "/alias": "/d"},
        {"/proj": "/public/home/dp/proj", "/ref": "/public/home/dp/proj/ref"},
        {"/proj": "/", "/ref": "/data/ref"},
    ],
)
def test_one_local_directory_cannot_have_two_logical_paths(mapping: dict[str, str]) -> None:
    with pytest.raises(InvalidInput, match="cannot have two logical paths"):
        Namespace.from_mapping(mapping)


def test_nested_directories_where_the_outer_prefix_has_them_are_fine() -> None:
    ns = Namespace.from_mapping({"/proj": "/gpfs/proj", "/proj/a": "/gpfs/proj/a"})
    assert ns.resolve("/proj/a/x") == Path("/gpfs/proj/a/x")
    assert ns.link_to_logical("/gpfs/proj/a/x") == "/proj/a/x"
    assert Namespace.from_mapping({"/proj": "/"}).link_to_logical("/") == "/proj"


def test_a_name_that_is_not_utf8_is_shown_as_its_bytes() -> None:
    # As `ls -b` shows it; `\udcff` (Python's surrogate escape) means nothing to a user.
    with pytest.raises(InvalidInput) as caught:
        check_name("bad\udcff.txt", "d/e\udc80")
    message = str(caught.value)
    assert r"'bad\xff.txt'" in message and r"'d/e\x80'" in message
    assert "udc" not in message


_ASCII_OR_ANY = st.one_of(st.text(st.characters(max_codepoint=127), max_size=300), st.text())


@given(st.lists(_ASCII_OR_ANY, max_size=8))
def test_plain_names_only_vouches_for_names_check_name_accepts(names: list[str]) -> None:
    """`plain_names` is the walk's shortcut for a whole listing: when it says yes, every
    name passes `check_name` and is its own NFC form (so none collide)."""
    if plain_names(names):
        for name in names:
            assert check_name(name) == name
            assert nfc(name) == name


@pytest.mark.parametrize(
    "names",
    [["a", "b/c"], ["a", ""], ["."], [".."], ["x" * 256], ["ok", "tab\there"], ["caf\u00e9"]],
)
def test_plain_names_refuses_what_needs_a_closer_look(names: list[str]) -> None:
    assert not plain_names(names)


def test_plain_names_takes_ordinary_listings() -> None:
    assert plain_names([])
    assert plain_names(["lig0001.pdbqt", "run 2", "x" * 255, ".hidden", "a-b_c.d~"])
