"""botocore's data loader for datamover's S3 clients: S3's data only, from a per-user cache.

Every command makes one S3 client, and botocore builds it from its JSON data: on a small
machine that cost about 80 ms of each command's start-up, of which the S3 client uses
little. `loader_for` gives a loader that reads three of those files from a cache of
smaller derivations, in the user's cache directory (`$XDG_CACHE_HOME/datamover/`, by
default `~/.cache/datamover/`):

- `endpoints.json` (1.2 MB, every service of every AWS partition) cut to S3 and the
  services botocore's credential providers call (STS for roles and web identity, SSO,
  SSO OIDC and sign-in: `_KEPT`): every partition as it is, its `services` reduced to
  those. It resolves their endpoints, regions and signing names exactly as the whole
  table does (the session has one table for all its clients).
- S3's service model (`service-2.json.gz`, 1.4 MB unpacked) with its documentation
  strings emptied: only docstrings and generated documentation read them.
- S3's endpoint rules (`endpoint-rule-set-1.json.gz`) as they are, spared the gunzip.

A cache file is named by the botocore version and its source file's size and mtime, so
that an upgraded or edited file is derived again. What is derived is reported as loaded
from botocore's own file, as the file itself would be, so botocore treats it as its
builtin data. A file found on a data path of the user's (`AWS_DATA_PATH`,
`~/.aws/models`) is loaded as it is, as botocore would. A cache file is trusted only if
it and its directory belong to this user and are writable by no one else (a cache planted
by another user could send S3 requests elsewhere); anything wrong with the cache
(unwritable, unreadable, not valid) costs the full load and nothing more.

S3 is the fast path: `list_available_services` looks for S3 alone (botocore's lists every
service directory, 872 of them, for each client), and S3's data comes from the cache. The
clients botocore's credential providers make in the same session (STS for a profile with
`role_arn` or `web_identity_token_file`, SSO for an SSO profile) get any other service's
data from botocore's own loader on the same search paths (`load_service_model`), as
without this loader.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore
import botocore.loaders

_SERVICE = "s3"
#: The services (by endpoint prefix, as the endpoint table names them) the cut endpoint
#: table keeps: S3, and those botocore's credential providers make clients of (sts,
#: sso, sso-oidc, signin).
_KEPT = frozenset({_SERVICE, "sts", "portal.sso", "oidc", "signin"})


@dataclass(frozen=True)
class _Derivation:
    """How a cached file is made from botocore's, and the top-level keys (and their
    types) a cached copy must have to be used. `tag` names the derivation in the cache
    file's name: a new one for every change to `derive`, so that no cache of an older
    derivation is read."""

    tag: str
    derive: Callable[[Any], Any]
    keys: dict[str, type]


def cut_to_s3(endpoints: Any) -> dict[str, Any]:
    """botocore's endpoint table with each partition's services reduced to S3 and the
    credential providers' services (`_KEPT`)."""
    return {
        **endpoints,
        "partitions": [
            {**p, "services": {k: v for k, v in p.get("services", {}).items() if k in _KEPT}}
            for p in endpoints["partitions"]
        ],
    }


def without_documentation(model: Any) -> Any:
    """A service model with its `documentation` strings emptied (botocore reads some of
    them by key; a member or shape *named* `documentation` has a mapping for a value, and
    stays)."""
    if isinstance(model, dict):
        return {
            k: "" if k == "documentation" and isinstance(v, str) else without_documentation(v)
            for k, v in model.items()
        }
    if isinstance(model, list):
        return [without_documentation(v) for v in model]
    return model


def _same(data: Any) -> Any:
    return data


_ENDPOINTS = _Derivation("s3creds", cut_to_s3, {"partitions": list})
_S3_FILES = {
    "service-2": _Derivation(
        "nodoc", without_documentation, {"metadata": dict, "operations": dict, "shapes": dict}
    ),
    "endpoint-rule-set-1": _Derivation("same", _same, {"parameters": dict, "rules": list}),
}


def _derivation(name: str) -> _Derivation | None:
    """How the data file `name` (`endpoints`, `s3/2006-03-01/service-2`) is cached, if it is."""
    if name == "endpoints":
        return _ENDPOINTS
    parts = name.split("/")
    return _S3_FILES.get(parts[2]) if len(parts) == 3 and parts[0] == _SERVICE else None


class S3Loader(botocore.loaders.Loader):
    """A botocore `Loader` that reads S3's data from a cache and any other service's as
    botocore's own loader does (module docstring)."""

    def __init__(self, *args: Any, cache_dir: Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cache_dir = cache_dir
        self._derived: dict[str, tuple[Any, str] | None] = {}
        self._stock: botocore.loaders.Loader | None = None

    def load_service_model(
        self, service_name: str, type_name: str, api_version: str | None = None
    ) -> Any:
        """S3's `type_name` data (from the cache where derived), or another service's from
        botocore's own loader on the same search paths (`UnknownServiceError` for a service
        it does not know either)."""
        if service_name == _SERVICE:
            return super().load_service_model(service_name, type_name, api_version)
        if self._stock is None:
            self._stock = botocore.loaders.Loader(
                extra_search_paths=list(self.search_paths), include_default_search_paths=False
            )
        return self._stock.load_service_model(service_name, type_name, api_version)

    def list_available_services(self, type_name: str) -> list[str]:
        """`["s3"]` when some search path has S3's `type_name` data, else `[]`: what
        `load_service_model` checks for S3 (other services are botocore's loader's to
        find)."""
        for base in self._potential_locations():
            try:
                versions = list(Path(base, _SERVICE).iterdir())
            except OSError:
                continue
            if any(self.file_loader.exists(str(v / type_name)) for v in versions):
                return [_SERVICE]
        return []

    def load_data_with_path(self, name: str) -> Any:
        how = _derivation(name)
        if how is not None:
            if name not in self._derived:
                self._derived[name] = self._load_derived(name, how)
            found = self._derived[name]
            if found is not None:
                return found
        return super().load_data_with_path(name)

    def _load_derived(self, name: str, how: _Derivation) -> tuple[Any, str] | None:
        """The derived data and botocore's path of its source, or None where the source
        is not botocore's own."""
        location = next(
            (p for p in self._potential_locations(name) if self.file_loader.exists(p)), None
        )
        if location is None or not self.is_builtin_path(location):
            return None
        exts = (".json", ".json.gz")
        source = next((location + e for e in exts if os.path.isfile(location + e)), None)
        if source is None:
            return None
        cache = self._cache_file(name, how.tag, source)
        if cache is not None:
            cached = _read_trusted(cache, how.keys)
            if cached is not None:
                return cached, location
        whole, _ = super().load_data_with_path(name)
        derived = how.derive(whole)
        if cache is not None and _write(cache, derived):
            _prune(cache, name.replace("/", "-") + "-")
        return derived, location

    def _cache_file(self, name: str, tag: str, source: str) -> Path | None:
        if self.cache_dir is None:
            return None
        try:
            st = os.stat(source)
        except OSError:
            return None
        stem = f"{name.replace('/', '-')}-{tag}"
        return self.cache_dir / f"{stem}-{botocore.__version__}-{st.st_size}-{st.st_mtime_ns}.json"


def default_cache_dir() -> Path | None:
    """`$XDG_CACHE_HOME/datamover`, else `~/.cache/datamover`; None without a home."""
    base = os.environ.get("XDG_CACHE_HOME")
    if base and Path(base).is_absolute():
        return Path(base, "datamover")
    try:
        home = Path.home()
    except RuntimeError:  # no HOME and no password entry
        return None
    return home / ".cache" / "datamover" if home.is_absolute() else None


@functools.cache
def loader_for(data_path: str | None) -> botocore.loaders.Loader:
    """One loader per botocore data path for the whole process: it keeps the parsed S3
    service model, endpoint rules and defaults for every client made after the first."""
    if data_path is None:
        return S3Loader(cache_dir=default_cache_dir())
    # As botocore's `create_loader` reads `data_path`.
    paths = [os.path.expanduser(os.path.expandvars(p)) for p in data_path.split(os.pathsep)]  # noqa: PTH111
    return S3Loader(extra_search_paths=paths, cache_dir=default_cache_dir())


def _owned(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _read_trusted(path: Path, keys: dict[str, type]) -> Any | None:
    """The cached data at `path`, or None if it is missing, not this user's alone, or not
    a mapping with each of `keys` of its type."""
    try:
        if not _owned(os.lstat(path.parent)):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            if not _owned(os.fstat(f.fileno())):
                return None
            data = json.loads(f.read())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and all(isinstance(data.get(k), t) for k, t in keys.items())
    return data if ok else None


def _write(path: Path, data: Any) -> bool:
    """Write `data` to `path` by a temporary name and a rename, only into a directory of
    this user's alone, never through a symlink (`O_EXCL | O_NOFOLLOW`: the temporary name
    is predictable), 0o600 whatever the umask (a group-writable file is not trusted when
    read back). True once written; any failure is ignored (False)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _owned(os.lstat(path.parent)):
            return False
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False
    return True


def _prune(kept: Path, prefix: str) -> None:
    """Remove the caches of the same file older than `kept` (another botocore version,
    source or derivation), so that upgrades do not pile them up; failures are ignored."""
    with contextlib.suppress(OSError):
        for old in kept.parent.glob(f"{prefix}*.json"):
            if old.name != kept.name:
                with contextlib.suppress(OSError):
                    old.unlink()
