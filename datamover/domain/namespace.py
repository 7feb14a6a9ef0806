"""Path-preserving namespace mapping: logical prefixes to this site's local directories.

Every site maps the same logical paths (`/proj/...`) to its own local directories, so a
program finds its data at the same relative place wherever it runs. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from datamover.domain.paths import check_logical_path, is_under
from datamover.errors import InvalidInput


@dataclass(frozen=True)
class Namespace:
    """An immutable map from logical prefixes to absolute local directories."""

    prefixes: tuple[tuple[str, Path], ...]

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str | Path], source: str = "config") -> Namespace:
        """Build from `{logical prefix: local dir}`; raise `InvalidInput` naming a bad entry."""
        items: list[tuple[str, Path]] = []
        for logical, local in mapping.items():
            try:
                prefix = check_logical_path(logical)
            except InvalidInput as exc:
                raise InvalidInput(f"{source}: [namespace] key {logical!r}: {exc}") from None
            path = Path(local)
            if not path.is_absolute():
                raise InvalidInput(
                    f"{source}: [namespace] {logical!r} maps to {str(local)!r}, "
                    "which is not an absolute path"
                )
            items.append((prefix, path))
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
