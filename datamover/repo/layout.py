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
from datamover.repo.manifest import MAX_STORED
from datamover.storage.base import MAX_KEY_BYTES

CONFIG_KEY = "config"
_HEX64 = re.compile("[0-9a-f]{64}")
_CREATED = re.compile("[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{6}Z")
_I32 = 1 << 31
_I64 = 1 << 63
DATASETS = "datasets/"
FORMAT_VERSION = 1


#: The longest key part every store takes: a file name on POSIX file systems, a path
#: segment on MinIO. A longer encoded path is cut into parts of at most this many bytes.
KEY_PART_BYTES = 255
#: A version key's bytes besides the path and the site name: `datasets/`, `/versions/` and
#: the version id's time (23 bytes), two `-` and 8 hex digits.
_KEY_BESIDES = len(DATASETS) + len("/versions/") + 23 + 2 + 8


def manifest_key(digest: bytes) -> str:
    """Key of a manifest segment or list."""
    h = digest.hex()
    return f"manifests/{h[:2]}/{h}"


def encode_dataset(path: str) -> str:
    """The key parts for a logical path (docs/format.md, "Keys"): its percent-encoding, cut
    into parts of at most `KEY_PART_BYTES` between characters, a part never starting with
    a literal `.`. An encoding of at most `KEY_PART_BYTES` is not cut (as before cutting).

    Where a cut falls depends only on the characters before it and the one after, so the
    key parts of a path prefix are a string prefix of those of every longer path."""
    whole = quote(path, safe="")
    n = len(whole)
    if n <= KEY_PART_BYTES:
        return whole
    parts: list[str] = []
    start, lead = 0, ""  # `lead`: `%2E` for a `.` that begins the part
    while n - start > KEY_PART_BYTES - len(lead):
        # The part ends at the last character boundary that fits: not inside an escape
        # (every `%` starts one) nor before an escaped UTF-8 continuation byte (0x80-0xBF;
        # `quote` writes hex in uppercase).
        end = start + KEY_PART_BYTES - len(lead)
        while "%" in whole[end - 2 : end] or (whole[end] == "%" and whole[end + 1] in "89AB"):
            end -= 1
        parts.append(lead + whole[start:end])
        # The next part may be the last and that short: it is never `.` or `..`.
        start, lead = (end + 1, "%2E") if whole[end] == "." else (end, "")
    parts.append(lead + whole[start:])
    return "/".join(parts)


def legacy_encoding(path: str) -> str:
    """The key part datamover wrote before it cut long encodings: `quote(path, safe="")`
    whole. Equal to `encode_dataset(path)` unless that is cut."""
    return quote(path, safe="")


def check_key_length(path: str, site: str) -> str:
    """Return `path` if `site` can publish a version of it, else `InvalidInput` in one line:
    its version keys, with `site`'s version ids, must fit `MAX_KEY_BYTES`."""
    size = _KEY_BESIDES + len(site) + len(encode_dataset(path))
    if size > MAX_KEY_BYTES:
        raise InvalidInput(
            f"logical path {path!r} is too long for the store: its version keys would take "
            f"{size} bytes (the path percent-encoded, and this site's version ids), more "
            f"than S3's {MAX_KEY_BYTES}-byte key limit; use a shorter path"
        )
    return path


def dataset_prefix(path_prefix: str) -> str:
    """Key prefix under which every dataset whose path starts with `path_prefix` lives."""
    return DATASETS + encode_dataset(path_prefix)


def dataset_prefixes(path_prefix: str) -> list[str]:
    """The key prefixes under which every dataset whose path starts with `path_prefix`
    lives: `dataset_prefix`, and for a long prefix the one of its uncut (legacy) keys,
    which `dataset_prefix` does not cover."""
    legacy = legacy_encoding(path_prefix)
    cut = dataset_prefix(path_prefix)
    return [cut] if len(legacy) <= KEY_PART_BYTES else [cut, DATASETS + legacy]


def tree_prefixes(dataset: str) -> list[str]:
    """The key prefixes of dataset `dataset`'s versions and of every dataset below it, in
    the order a listing reads them, which is the order of `dataset_prefixes(dataset)`'s
    listing: the keys below first (`%2F` and a cut's `/%2F` sort before `/versions/`), a
    short path's uncut keys below before its cut ones (`%2F` before `/`), a long path's
    uncut keys after its cut ones. Unlike `dataset_prefixes`, they do not cover the keys of
    datasets whose paths merely start with `dataset` (`/proj/run10`, `/proj/run1-old` for
    `/proj/run1`), but for one that goes on with `versions` right where `dataset`'s
    encoding is cut: a listing still keeps only the component-wise matches.

    `encode_dataset(dataset + "/")` is a string prefix of the key of every dataset below:
    a cut falls where it does in that longer path, so it comes before the `%2F` of the
    trailing `/` exactly when the longer path's comes there too."""
    below = dataset_prefixes(dataset + "/")  # [cut, and the uncut one where they differ]
    own = versions_prefixes(dataset)
    if len(own) == 2:  # a long path: its cut and its uncut keys are two listings
        return [below[0], own[0], below[1], own[1]]
    return [*sorted(below), *own]


def versions_prefix(dataset: str) -> str:
    """Key prefix of a dataset's version documents."""
    return f"{DATASETS}{encode_dataset(dataset)}/versions/"


def version_key(dataset: str, version: str) -> str:
    """Key of one version document."""
    return versions_prefix(dataset) + version


def versions_prefixes(dataset: str) -> list[str]:
    """The key prefixes of a dataset's version documents: `versions_prefix`, and for a long
    path `legacy_versions_prefix` after it."""
    legacy = legacy_versions_prefix(dataset)
    return [versions_prefix(dataset)] if legacy is None else [versions_prefix(dataset), legacy]


def legacy_versions_prefix(dataset: str) -> str | None:
    """Key prefix of a long dataset path's version documents as datamover wrote them before
    it cut long encodings (docs/format.md, "Keys": still read, and written for a dataset
    whose versions live there), or None when that is `versions_prefix(dataset)` itself."""
    legacy = legacy_encoding(dataset)
    return None if len(legacy) <= KEY_PART_BYTES else f"{DATASETS}{legacy}/versions/"


def resume_key(dataset: str, legacy: bool = False) -> str | None:
    """The key a listing resumes after to go on past `dataset`'s versions (under its uncut
    key with `legacy`), or None if `dataset` has no such key: every version id starts with
    a digit, and `:` sorts after the digits and before any part (`versions` of a cut path
    that goes on, say) that could follow in another dataset's key."""
    base = legacy_versions_prefix(dataset) if legacy else versions_prefix(dataset)
    return None if base is None else base + ":"


def parse_version_key(key: str) -> tuple[str, str] | None:
    """`(dataset, version)` of a version document key, or None for anything else (including
    a key that is neither `version_key(dataset, version)` nor its legacy form)."""
    if not key.startswith(DATASETS):
        return None
    # Version ids hold no `/`; a cut encoding may hold a part `versions`.
    encoded, sep, version = key[len(DATASETS) :].rpartition("/versions/")
    if not sep:
        return None
    try:
        check_version_id(version)
        dataset = check_logical_path(unquote(encoded.replace("/", ""), errors="strict"))
    except (InvalidInput, UnicodeDecodeError):
        return None
    # Only the canonical key (or a long path's uncut one): `%2fproj` or `%2Fproj/x` decode
    # to a dataset too, but its document is not there, and a reader would then fail to
    # find what it listed.
    if encoded == encode_dataset(dataset) or encoded == legacy_encoding(dataset):
        return (dataset, version)
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
            if type(doc.manifest_size) is int and doc.manifest_size > MAX_STORED:
                raise ValueError(f"manifest_size {doc.manifest_size} is more than a list takes")
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
