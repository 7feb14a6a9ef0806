"""Path-preserving namespace mapping: logical prefixes to this site's local directories.

Every site maps the same logical paths (`/proj/...`) to its own local directories, so a
program finds its data at the same relative place wherever it runs. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from datamover.domain.paths import MAX_LINK_TARGET, check_logical_path, is_under
from datamover.errors import InvalidInput


@dataclass(frozen=True)
class Namespace:
    """An immutable map from logical prefixes to absolute local directories."""

    prefixes: tuple[tuple[str, Path], ...]

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str | Path], source: str = "config") -> Namespace:
        """Build from `{logical prefix: local dir}`; raise `InvalidInput` naming a bad entry.

        Two keys that name one prefix (`/proj` and `/proj/`, distinct keys to TOML) are
        refused: only one of them could be used, and which one would be an accident. A local
        directory's empty components and trailing slash are dropped, and so is the second
        slash of a leading `//` (POSIX lets it mean something else; Linux reads it as `/`):
        `//gpfs//proj/` is `/gpfs/proj`. Its `.` and `..` components are refused, since only
        the file system can say where they lead."""
        items: list[tuple[str, Path]] = []
        keys: dict[str, str] = {}
        for logical, local in mapping.items():
            try:
                prefix = check_logical_path(logical)
            except InvalidInput as exc:
                raise InvalidInput(f"{source}: [namespace] key {logical!r}: {exc}") from None
            if prefix in keys:
                raise InvalidInput(
                    f"{source}: [namespace] keys {keys[prefix]!r} and {logical!r} both name "
                    f"{prefix!r}; keep one"
                )
            keys[prefix] = logical
            if "\0" in str(local):
                raise InvalidInput(
                    f"{source}: [namespace] {logical!r} maps to a path with a NUL character"
                )
            path = Path(local)
            if not path.is_absolute():
                raise InvalidInput(
                    f"{source}: [namespace] {logical!r} maps to {str(local)!r}, "
                    "which is not an absolute path"
                )
            if any(part in (".", "..") for part in str(local).split("/")):
                raise InvalidInput(
                    f"{source}: [namespace] {logical!r} maps to {str(local)!r}: write the "
                    "directory without '.' or '..' components"
                )
            # `Path` keeps a leading `//`, so `//gpfs/proj` would not hold `/gpfs/proj/ref`
            # for the alias check, nor a link's target `/gpfs/proj/x` for `link_to_logical`.
            items.append((prefix, Path("/").joinpath(*path.parts[1:])))
        _check_aliases(items, source)
        # Longest prefix first, so `/proj/a` wins over `/proj` for `/proj/a/x`.
        items.sort(key=lambda item: -item[0].count("/"))
        return cls(tuple(items))

    def resolve(self, logical: str) -> Path:
        """Return the local directory of logical path `logical` at this site.

        Raises `InvalidInput` when the path is malformed or lies outside every prefix.
        """
        base, parts = self.split(logical)
        return base.joinpath(*parts)

    def split(self, logical: str) -> tuple[Path, tuple[str, ...]]:
        """`(configured local base, components below it)` for `logical`.

        The base is site configuration and trusted; the components come from the user and
        are opened without following symlinks when written to.
        """
        path = check_logical_path(logical)
        for prefix, local in self.prefixes:
            if is_under(path, prefix):
                rest = path[len(prefix) :].lstrip("/")
                return local, tuple(rest.split("/")) if rest else ()
        known = ", ".join(p for p, _ in self.prefixes) or "none configured"
        raise InvalidInput(
            f"logical path {path!r} is outside every namespace prefix of this site ({known})"
        )

    # -- symlink targets --------------------------------------------------------------------
    #
    # An absolute symlink target that points into a mapped local directory is stored as the
    # logical path it points at, and written at every site as that site's local path for it,
    # so a link into the namespace keeps pointing at the same data wherever it is staged. Any
    # other absolute target (`/usr/bin/python3`, a site's software tree) is kept verbatim,
    # as tar and rsync keep it; relative targets are never rewritten. Kept verbatim too: a
    # target whose part below the directory is not a plain path (`.`, `..` or empty
    # components: lexically, it may leave it), one this site would not write back as it is
    # (a directory shadowed by a deeper prefix mapped elsewhere), and one whose logical form
    # would be longer than a symlink target may be.
    #
    # A verbatim target that lies under a logical prefix (a link to `/proj/x` where `/proj`
    # maps to `/gpfs/proj`) cannot be told from a logical one: it is read as the logical path
    # it names, so stage writes `/gpfs/proj/x`. `same_link` accepts either form on disk as
    # the stored link, so such a link is neither rewritten by stage nor reported by verify.

    def link_to_logical(self, target: str) -> str:
        """The stored form of a symlink target read at this site (see the comment above)."""
        if not target.startswith("/"):
            return target
        found = [
            (len(str(local)), prefix, rest)
            for prefix, local in self.prefixes
            if (rest := _below(target, str(local))) is not None
        ]
        if not found:
            return target
        _, prefix, rest = max(found)  # the deepest local directory holding it
        logical = _join(prefix, rest)
        if len(logical.encode("utf-8", "surrogateescape")) > MAX_LINK_TARGET:
            return target
        return logical if self.link_to_local(logical) == target else target

    def link_to_local(self, target: str) -> str:
        """The target to write at this site for a stored symlink target: a logical path under
        a prefix becomes this site's local path; anything else is returned unchanged."""
        if not target.startswith("/"):
            return target
        for prefix, local in self.prefixes:  # longest prefix first
            rest = _below(target, prefix)
            if rest is not None:
                return _join(str(local), rest)
        return target

    def same_link(self, local: str, stored: str) -> bool:
        """True if a link on disk pointing at `local` is the stored link `stored` at this
        site: what stage writes for it, or a target this site reads as `stored`."""
        return local == self.link_to_local(stored) or self.link_to_logical(local) == stored


def _check_aliases(items: list[tuple[str, Path]], source: str) -> None:
    """Refuse a map that gives one local directory two logical paths.

    A prefix's directory may lie inside another's only where the outer prefix would put it
    anyway (`/proj` -> `/gpfs/proj` with `/proj/a` -> `/gpfs/proj/a`). Otherwise the same
    files would be two datasets' trees at once: transfers of both could run together, and
    a symlink into them would have no single logical path.
    """
    for outer, outer_dir in items:
        for inner, inner_dir in items:
            if inner == outer or not inner_dir.is_relative_to(outer_dir):
                continue
            rel = inner_dir.relative_to(outer_dir).as_posix()
            expected = outer if rel == "." else f"{outer}/{rel}"
            if inner != expected:
                raise InvalidInput(
                    f"{source}: [namespace] {inner!r} maps to {str(inner_dir)!r}, which "
                    f"{outer!r} already maps as {expected!r} (one local directory cannot have "
                    "two logical paths)"
                )


def _below(path: str, base: str) -> str | None:
    """What follows directory `base` in `path`: "" for `base` itself, else the rest with its
    leading slash (a trailing slash is kept); None if `path` is not below `base` or the rest
    is not a plain path."""
    if path == base:
        return ""
    if not is_under(path, base):
        return None
    rest = path if base == "/" else path[len(base) :]
    plain = rest[1:-1] if rest.endswith("/") else rest[1:]
    if plain and any(part in ("", ".", "..") for part in plain.split("/")):
        return None
    return rest


def _join(base: str, rest: str) -> str:
    """`base` followed by a `_below` remainder."""
    return (base.rstrip("/") + rest) or "/"
