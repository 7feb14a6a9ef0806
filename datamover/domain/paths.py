"""Logical paths, tree-relative paths and names: validation and ordering. Pure, no I/O.

A *logical path* names a dataset the same way at every site (`/proj/docking/run42`). A
*relative path* names an entry inside a dataset's tree (`d001/lig0001.pdbqt`), always with `/`
separators, never absolute, never containing `.` or `..`. Everything that comes from a user
or from the store passes through these checks before it touches a file system.

Trees are ordered by path *components*, not by the joined string: `a` < `a/b` < `a.b`, which is
exactly the order of a depth-first walk that visits each directory's names sorted. Push and
stage rely on that to merge sorted streams without holding a tree in memory.
"""

from __future__ import annotations

import re
import unicodedata

from datamover.errors import InvalidInput

#: Stage's temporary and partial files (`transfer.fsops.partial_name`); never user data:
#: push skips them, stage removes leftovers of them, and a manifest naming one is
#: corrupt. `\Z`, not `$`: `$` also matches before a final newline, and a user's
#: `.dm-<16 hex>.part\n` would be skipped by push and removed by stage as a leftover.
PARTIAL_RE = re.compile(r"\A\.dm-[0-9a-f]{16}\.part\Z")

NAME_MAX_BYTES = 255
# A logical path's limit, UTF-8 encoded. No longer path can be pushed (its version keys,
# percent-encoded, must fit S3's 1,024-byte key limit: `layout.check_key_length`), and the
# catalog indexes paths (PostgreSQL's B-tree index rows hold at most 2,704 bytes).
LOGICAL_PATH_MAX_BYTES = 1024


_BAD = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _bad_char(text: str) -> str | None:
    found = _BAD.search(text)  # one C-level scan: every name of every tree passes here
    if found is None:
        return None
    o = ord(found.group())
    if 0xD800 <= o <= 0xDFFF:
        return "bytes that are not valid UTF-8"
    return f"control character U+{o:04X}"


_SURROGATES = re.compile("[\udc80-\udcff]")


def shown(text: str) -> str:
    """`repr(text)` for messages; a name holding bytes that are not valid UTF-8 (surrogate
    escapes from `os.fsdecode`) is shown as its bytes, `'bad\\xff'` as `ls -b` shows it,
    not `'bad\\udcff'`."""
    if _SURROGATES.search(text) is None:
        return repr(text)
    return repr(text.encode("utf-8", "surrogateescape"))[1:]


def printable(text: str) -> str:
    """`text` as it is when every character prints, else `shown(text)`: a local name in a
    listing cannot move the cursor or recolour a terminal."""
    return text if text.isprintable() else shown(text)


def check_name(name: str, where: str = "") -> str:
    """Return `name` if it is a valid single path component, else raise `InvalidInput`.

    Valid: non-empty, not `.`/`..`, no `/`, no control characters, valid UTF-8 (no surrogate
    escapes from undecodable bytes), at most 255 bytes encoded.
    """
    if name in ("", ".", ".."):
        raise InvalidInput(f"invalid name {name!r}{_in(where)}: empty, '.' or '..'")
    if "/" in name:
        raise InvalidInput(f"invalid name {shown(name)}{_in(where)}: contains '/'")
    problem = _bad_char(name)
    if problem:
        raise InvalidInput(f"invalid name {shown(name)}{_in(where)}: {problem}")
    if len(name.encode("utf-8")) > NAME_MAX_BYTES:
        raise InvalidInput(f"invalid name {name[:40]!r}...{_in(where)}: longer than 255 bytes")
    return name


def _in(where: str) -> str:
    return f" in {shown(where)}" if where else ""


def plain_names(names: list[str]) -> bool:
    """True if every one of `names` is a valid name (`check_name`) in ASCII, so that none
    can collide with another under Unicode normalisation; False says nothing (check each).

    A few C-level passes over the listing instead of a Python call per name: the walk of
    a directory of 4 KiB files spent about a tenth of a no-op push's time checking names.
    """
    if not names:
        return True
    joined = "/".join(names)
    return (
        joined.isascii()
        and joined.count("/") == len(names) - 1
        and _BAD.search(joined) is None
        and len(max(names, key=len)) <= NAME_MAX_BYTES
        and "" not in names
        and "." not in names
        and ".." not in names
    )


def check_relpath(rel: str) -> str:
    """Return `rel` if it is a valid tree-relative path, else raise `InvalidInput`."""
    if not rel:
        raise InvalidInput("invalid relative path: empty")
    if rel.startswith("/"):
        raise InvalidInput(f"invalid relative path {rel!r}: absolute")
    for part in rel.split("/"):
        if part == "..":
            raise InvalidInput(f"invalid relative path {rel!r}: contains '..'")
        check_name(part, rel)
    return rel


def check_logical_path(path: str) -> str:
    """Return the canonical form of a logical dataset path, else raise `InvalidInput`.

    Canonical: starts with `/`, no trailing `/`, no empty, `.` or `..` components, at most
    `LOGICAL_PATH_MAX_BYTES` long. A single trailing slash is forgiven (`/proj/x/` is
    `/proj/x`); anything else is an error, because silently rewriting `..` would make a typo
    address a different dataset.
    """
    if not isinstance(path, str) or not path:
        raise InvalidInput("invalid logical path: empty")
    if not path.startswith("/"):
        raise InvalidInput(f"invalid logical path {path!r}: must start with '/'")
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    if path == "/":
        raise InvalidInput("invalid logical path '/': the root is not a dataset")
    size = len(path.encode("utf-8", "surrogatepass"))
    if size > LOGICAL_PATH_MAX_BYTES:  # first: the messages below show the whole path
        raise InvalidInput(
            f"invalid logical path {shown(path[:60])}...: {size} bytes long, more than "
            f"{LOGICAL_PATH_MAX_BYTES}"
        )
    for part in path[1:].split("/"):
        if part in ("", ".", ".."):
            raise InvalidInput(f"invalid logical path {path!r}: empty, '.' or '..' component")
        check_name(part, path)
    return path


def is_under(path: str, prefix: str) -> bool:
    """True when logical `path` equals `prefix` or lies below it (component-wise)."""
    if prefix == "/":
        return True
    return path == prefix or path.startswith(prefix + "/")


def sort_key(rel: str) -> tuple[str, ...]:
    """The ordering key of a relative path: its components (see the module docstring)."""
    return tuple(rel.split("/"))


def nfc(name: str) -> str:
    """NFC form of `name`; two names in one directory with equal NFC forms collide."""
    if name.isascii():
        return name  # ASCII is always normalised; most names are
    return unicodedata.normalize("NFC", name)


#: The longest symlink target Linux stores (PATH_MAX less the terminating NUL).
MAX_LINK_TARGET = 4095


def check_symlink_target(link: str, target: str) -> str:
    """Return `target` if it is an acceptable target for the symlink at relative path `link`.

    Any target: not empty, no control characters, at most `MAX_LINK_TARGET` bytes. Absolute
    targets are accepted (a logical one is mapped to each site's local path when staged, see
    `Namespace.link_to_local`); relative ones must stay inside the tree, because the same
    tree appears at different local paths on every site, so a link climbing out of it would
    point at something else after staging.
    """
    if not target:
        raise InvalidInput(f"symlink {link!r} has an empty target")
    problem = _bad_char(target)
    if problem:
        article = "a " if problem.startswith("control") else ""
        raise InvalidInput(f"symlink {shown(link)} has a target with {article}{problem}")
    if len(target.encode()) > MAX_LINK_TARGET:
        raise InvalidInput(f"symlink {link!r} has a target longer than {MAX_LINK_TARGET} bytes")
    if target.startswith("/"):
        return target
    parts = target.split("/")
    climbs = 0
    while climbs < len(parts) and parts[climbs] == "..":
        climbs += 1
    rest = parts[climbs:]
    if any(p in ("", "..") for p in rest):
        # `..` after a normal component could climb out of a symlinked directory; a
        # lexical check cannot see that, so only leading `..` are allowed.
        raise InvalidInput(
            f"symlink {link!r} -> {target!r}: only leading '..' and no empty components allowed"
        )
    depth = link.count("/")
    if climbs > depth:
        raise InvalidInput(
            f"symlink {link!r} -> {target!r} points outside the dataset (a relative link must "
            "stay inside it; an absolute one into the namespace is mapped at every site)"
        )
    return target
