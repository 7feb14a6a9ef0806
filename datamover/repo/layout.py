"""Store keys and the version document (docs/format.md, "Keys" and "Version documents")."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote, unquote

from datamover.domain.ids import check_site_name, check_version_id
from datamover.domain.paths import check_logical_path
from datamover.errors import Corrupt, InvalidInput

CONFIG_KEY = "config"
_HEX64 = re.compile("[0-9a-f]{64}")
_CREATED = re.compile("[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{6}Z")
_I32 = 1 << 31
_I64 = 1 << 63
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
    """`(dataset, version)` of a version document key, or None for anything else (including
    a key that is not exactly `version_key(dataset, version)`)."""
    if not key.startswith(DATASETS):
        return None
    encoded, sep, version = key[len(DATASETS) :].partition("/versions/")
    if not sep:
        return None
    try:
        dataset = check_logical_path(unquote(encoded, errors="strict"))
        check_version_id(version)
    except (InvalidInput, UnicodeDecodeError):
        return None
    # Only the canonical key: `%2fproj` or `%2Fproj/x` decode to a dataset too, but its
    # document is not there, and a reader would then fail to find what it listed.
    return (dataset, version) if encode_dataset(dataset) == encoded else None


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
        """Parse and validate a stored version document; raise `Corrupt` naming `what`.

        Checks every field against docs/format.md ("Version documents"): types exactly
        (`true` is not `1`), the dataset canonical, ids well formed, the parent older than
        the version (so parents cannot form a cycle), the site the one in the id, the
        manifest digest lowercase hex, counts within 64 bits (segments within 31: what the
        catalog's columns hold), `created` a UTC time, and no entries without segments.
        """
        try:
            raw: Any = json.loads(data)
            if not isinstance(raw, dict) or raw.get("format") != FORMAT_VERSION:
                raise ValueError("unknown format")
            doc = cls(**raw)
            if type(doc.format) is not int:
                raise ValueError("unknown format")
            if check_logical_path(doc.dataset) != doc.dataset:
                raise ValueError("dataset path is not canonical")
            check_version_id(doc.version)
            if doc.parent is not None and check_version_id(doc.parent) >= doc.version:
                raise ValueError(f"parent {doc.parent} is not older than the version")
            if check_site_name(doc.site) != doc.version[24:-9]:
                raise ValueError(f"site {doc.site!r} is not the one in the version id")
            if not isinstance(doc.manifest, str) or not _HEX64.fullmatch(doc.manifest):
                raise ValueError("bad manifest digest")
            for name in ("manifest_size", "segments", "files", "dirs", "symlinks", "bytes"):
                value = getattr(doc, name)
                if type(value) is not int or not 0 <= value < (
                    _I32 if name == "segments" else _I64
                ):
                    raise ValueError(f"bad {name}")
            if doc.segments == 0 and doc.files + doc.dirs + doc.symlinks + doc.bytes:
                raise ValueError("entries without segments")
            if not isinstance(doc.created, str) or not _CREATED.fullmatch(doc.created):
                raise ValueError("bad created")
            datetime.strptime(doc.created, "%Y-%m-%dT%H:%M:%S.%fZ")
        except RecursionError:  # JSON nested deeper than the parser's stack allows
            raise Corrupt(f"{what} is malformed: nested too deeply") from None
        except (ValueError, TypeError, InvalidInput) as exc:
            raise Corrupt(f"{what} is malformed: {exc}") from None
        return doc
