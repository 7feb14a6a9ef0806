"""Store keys and the version document (docs/format.md, "Keys" and "Version documents")."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote, unquote

from datamover.domain.ids import check_site_name, check_version_id
from datamover.domain.paths import check_logical_path
from datamover.errors import Corrupt, InvalidInput

CONFIG_KEY = "config"
DATASETS = "datasets/"
FORMAT_VERSION = 1


def manifest_key(digest: bytes) -> str:
    """Key of a manifest segment or list."""
    h = digest.hex()
    return f"manifests/{h[:2]}/{h}"


def encode_dataset(path: str) -> str:
    """The key part for a logical path (prefix-preserving percent-encoding)."""
    return quote(path, safe="")


def dataset_prefix(path_prefix: str) -> str:
    """Key prefix under which every dataset whose path starts with `path_prefix` lives."""
    return DATASETS + encode_dataset(path_prefix)


def versions_prefix(dataset: str) -> str:
    """Key prefix of a dataset's version documents."""
    return f"{DATASETS}{encode_dataset(dataset)}/versions/"


def version_key(dataset: str, version: str) -> str:
    """Key of one version document."""
    return versions_prefix(dataset) + version


def parse_version_key(key: str) -> tuple[str, str] | None:
    """`(dataset, version)` of a version document key, or None for anything else."""
    if not key.startswith(DATASETS):
        return None
    encoded, sep, version = key[len(DATASETS) :].partition("/versions/")
    if not sep:
        return None
    try:
        return check_logical_path(unquote(encoded, errors="strict")), check_version_id(version)
    except (InvalidInput, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class VersionDoc:
    """A published version: the manifest it names and its totals."""

    dataset: str
    version: str
    parent: str | None
    site: str
    created: str
    manifest: str
    manifest_size: int
    segments: int
    files: int
    dirs: int
    symlinks: int
    bytes: int
    format: int = FORMAT_VERSION

    @property
    def manifest_digest(self) -> bytes:
        """The manifest list's digest as bytes."""
        return bytes.fromhex(self.manifest)

    def to_bytes(self) -> bytes:
        """The stored JSON form."""
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, what: str) -> VersionDoc:
        """Parse and validate a stored version document; raise `Corrupt` naming `what`."""
        try:
            raw: Any = json.loads(data)
            if not isinstance(raw, dict) or raw.get("format") != FORMAT_VERSION:
                raise ValueError("unknown format")
            doc = cls(**raw)
            check_logical_path(doc.dataset)
            check_version_id(doc.version)
            if doc.parent is not None:
                check_version_id(doc.parent)
            check_site_name(doc.site)
            if len(bytes.fromhex(doc.manifest)) != 32:
                raise ValueError("bad manifest digest")
            for name in ("manifest_size", "segments", "files", "dirs", "symlinks", "bytes"):
                value = getattr(doc, name)
                if type(value) is not int or value < 0:
                    raise ValueError(f"bad {name}")
            if not isinstance(doc.created, str):
                raise ValueError("bad created")
        except RecursionError:  # JSON nested deeper than the parser's stack allows
            raise Corrupt(f"{what} is malformed: nested too deeply") from None
        except (ValueError, TypeError, InvalidInput) as exc:
            raise Corrupt(f"{what} is malformed: {exc}") from None
        return doc
