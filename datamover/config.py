"""Site configuration: frozen settings from a TOML file, overridable from the environment.

Every scalar key `[section] key` can be overridden by `DATAMOVER_<SECTION>_<KEY>` (upper
case), e.g. `DATAMOVER_STORE_ENDPOINT`. The namespace map can be replaced as a whole with
`DATAMOVER_NAMESPACE="/proj=/data/proj,/scratch=/tmp/scratch"`. Store credentials fall back to
the usual `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` when absent from both. A variable set
to the empty string counts as not set (as systemd's `X=` and most tools read it), so the
file's value stays: an empty `DATAMOVER_SITE_CATALOG` does not swap a site's catalog for a
default one.

A bad file or value raises `InvalidInput` with one line naming the file and the key, or the
variable that set it, and what is wrong; unknown keys are errors too, because a typo silently
ignored is a setting not applied.

Relative paths in a file (`[site] state_dir`, a `sqlite:///` catalog, `[api] token_file`) are
relative to the file's directory, so every process reading it, whatever its working
directory, finds the same catalog and state; from the environment they are relative to the
current directory, as the shell that set them sees them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import stat
import tomllib
from collections.abc import Container, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from datamover.domain.ids import check_site_name
from datamover.domain.namespace import Namespace
from datamover.errors import InvalidInput
from datamover.storage.s3_settings import check_endpoint, check_key_setting

MiB = 1 << 20
#: Most `[transfer] read_workers` / `write_workers`: each is a process of its own, and past a
#: few per core they only contend for the file system; a fixed bound (not one per core) so
#: one config file means the same on every host that reads it.
MAX_WORKERS = 256

#: Upper bounds of counts whose every unit costs memory, a socket or a process (and of ones
#: that a catalog column or a date must hold), and of times, sizes and rates past which a
#: value can only be a typo (or overflows the clock or socket arithmetic it feeds), with what
#: a unit is: a typo (100000 for 10) is refused by name instead of exhausting the host, or
#: failing as an internal error, at the first transfer. Fixed numbers, like `MAX_WORKERS`, so one
#: config file means the same on every host.
LIMITS: dict[tuple[str, str], tuple[int, str]] = {
    ("store", "max_connections"): (1024, "sockets to the store, each a file descriptor"),
    ("transfer", "upload_concurrency"): (256, "packs uploaded at once, each held in memory"),
    ("transfer", "download_concurrency"): (256, "requests at once, each range held in memory"),
    ("transfer", "read_workers"): (MAX_WORKERS, "processes; 0: one or two per core"),
    ("transfer", "write_workers"): (MAX_WORKERS, "processes; 0: one or two per core"),
    ("transfer", "segment_entries"): (1 << 16, "entries of a manifest segment, held in memory"),
    ("transfer", "batch_bytes"): (
        1024 * MiB,
        "1 GiB; stage holds files of up to a quarter of it in memory",
    ),
    ("api", "workers"): (64, "transfers at once, each with its own processes and connections"),
    # Not a resource: every transfer row stores it in a 32-bit column, so from 2**31 each
    # submission failed as an internal error; a thousand tries are already days of retrying.
    ("api", "max_attempts"): (1000, "tries of a transfer, up to 5 minutes apart"),
    # Seconds: from about 2.5e11 a lease's expiry is past the year 9999 (every claim failed
    # with OverflowError), from about 9.2e9 a timeout no longer fits a socket's; an hour of
    # silence is a hung connection already, a day a long wait for a dead worker's transfer.
    ("api", "lease_seconds"): (86400, "seconds before a dead worker's transfer is taken over"),
    ("store", "connect_timeout"): (3600, "seconds to wait for the store to accept a connection"),
    ("store", "read_timeout"): (3600, "seconds a request waits on a silent connection"),
    ("store", "retry_attempts"): (
        100,
        "tries of a store call, up to 5 s apart; then the transfer's own retries take over",
    ),
    ("transfer", "max_request"): (1024 * MiB, "1 GiB; each ranged read is held in memory"),
    ("transfer", "coalesce_gap"): (1024 * MiB, "1 GiB of unwanted bytes read to save a request"),
    ("transfer", "bandwidth_limit"): (1 << 40, "bytes per second, 1 TiB/s; 0: unlimited"),
    ("transfer", "lookup_threads"): (256, "threads looking names up on a slow file system"),
    # Not a resource either: keeping them longer is keeping them for ever, which 0 says; and
    # a typo of a million days reaches back before the year 1, so every prune would fail.
    ("api", "history_days"): (3650, "ten years; 0 keeps finished transfers for ever"),
    ("api", "reindex_minutes"): (10080, "a week; 0: the daemon never indexes the store's packs"),
    ("api", "trash_days"): (3650, "ten years; 0: the daemon never empties the trash"),
}

#: The shortest `[api] history_days` but 0: an hour. A client that waits for a transfer
#: (`stage --wait` rides out a daemon restart for 3 minutes) or retries its submission must
#: still find the record when it asks again, not a 404 or a second transfer.
MIN_HISTORY_DAYS = 1 / 24


@dataclass(frozen=True)
class SiteSettings:
    """`[site]`: who we are and where our state lives."""

    name: str = ""
    catalog: str = ""  # SQLAlchemy URL; default: sqlite file in state_dir
    state_dir: str = ""  # manifest cache, trash, partial files; default: XDG state dir


@dataclass(frozen=True)
class StoreSettings:
    """`[store]`: the shared S3-compatible bucket."""

    endpoint: str = ""  # empty: AWS default endpoint resolution
    bucket: str = ""
    region: str = "us-east-1"
    access_key: str = ""
    secret_key: str = ""
    session_token: str = ""  # temporary credentials' token (with access_key, secret_key)
    max_connections: int = 64
    retry_attempts: int = 5
    connect_timeout: float = 5.0
    read_timeout: float = 120.0


@dataclass(frozen=True)
class TransferSettings:
    """`[transfer]`: tuning knobs; the defaults suit a 2-core client on a fast network."""

    pack_size: int = 32 * MiB
    upload_concurrency: int = 4
    # processes reading and hashing small files on push, and finding a re-push's unchanged
    # segments ahead of its walk (`segcheck`); 0: two per core
    read_workers: int = 0
    write_workers: int = 0  # processes writing small files on stage; 0: one per core; -1: none
    download_concurrency: int = 8
    zstd_level: int = 3
    compression: str = "auto"  # auto: zstd when it saves space; never: store raw
    # Most entries in a manifest segment; cuts are content-defined, and a segment also ends
    # at `manifest_writer.SEGMENT_CHUNKS` chunk references.
    segment_entries: int = 8192
    coalesce_gap: int = 256 * 1024
    max_request: int = 16 * MiB
    batch_bytes: int = 64 * MiB
    bandwidth_limit: int = 0  # bytes per second, each direction; 0: unlimited
    fsync: bool = False  # stage: syncfs() the cache before a replica is marked ready
    sparse: bool = True  # stage: all-zero chunks of 64 KiB or more are left as holes
    # Threads a walk uses to look up names ahead once `lstat` proves slow (a network or
    # parallel file system: `transfer.statahead`); 1: never.
    lookup_threads: int = 16


@dataclass(frozen=True)
class ApiSettings:
    """`[api]`: the site daemon (`datamover serve`) and how the CLI reaches it."""

    listen: str = ""  # host:port; empty: no daemon, the CLI works directly
    url: str = ""  # how clients reach the daemon; default http://<listen>
    token_file: str = ""  # the CLI's token (else DATAMOVER_TOKEN)
    workers: int = 2  # transfers run at once by one serve process
    lease_seconds: float = 30.0  # a dead worker's transfer is taken over after this
    max_attempts: int = 5  # tries for transient failures before a transfer fails
    open_metrics: bool = True  # /metrics without a token (/healthz, /readyz always open)
    history_days: float = 30.0  # ended transfers are deleted after this; 0: kept for ever
    reindex_minutes: float = 0.0  # index other sites' new packs this often; 0: never
    trash_days: int = 0  # the daemon empties trash runs older than this, hourly; 0: never


@dataclass(frozen=True)
class Config:
    """The whole site configuration. Build it with `load_config`."""

    site: SiteSettings
    store: StoreSettings
    namespace: Namespace
    transfer: TransferSettings = field(default_factory=TransferSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    source: str = "<defaults>"
    #: The `DATAMOVER_<SECTION>_<KEY>` variables that set a value, so a value found bad only
    #: when it is used (a state directory that cannot be created) is blamed on its variable.
    overrides: frozenset[str] = frozenset()

    def origin(self, section: str, key: str) -> str:
        """`[section] key` for messages, as where its value came from: the variable that
        overrides it, else the file (`source`)."""
        return _origin(self.source, self.overrides, section, key)

    @property
    def state_dir(self) -> Path:
        """Absolute path of the site's state directory."""
        return Path(self.site.state_dir)

    @property
    def api_url(self) -> str | None:
        """Where the site daemon answers, or None when no daemon is configured."""
        if self.api.url:
            return self.api.url.rstrip("/")
        return f"http://{self.api.listen}" if self.api.listen else None

    @property
    def catalog_url(self) -> str:
        """SQLAlchemy URL of the catalog (an async driver is chosen by `catalog.engine`)."""
        return self.site.catalog

    @property
    def sqlite_file(self) -> str | None:
        """The absolute path of a `sqlite:///` catalog's database file; None for PostgreSQL
        or an in-memory database."""
        return _sqlite_file(self.site.catalog)


_SECTIONS: dict[str, type] = {
    "site": SiteSettings,
    "store": StoreSettings,
    "transfer": TransferSettings,
    "api": ApiSettings,
}


def _origin(source: str, overrides: Container[str], section: str, key: str) -> str:
    """`environment: DATAMOVER_<SECTION>_<KEY>` when that variable is in `overrides`, else
    `<source>: [section] key`."""
    name = f"DATAMOVER_{section.upper()}_{key.upper()}"
    return f"environment: {name}" if name in overrides else f"{source}: [{section}] {key}"


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def _coerce(source: str, where: str, raw: Any, kind: Any) -> Any:
    """`raw` (a TOML value, or a string from the environment) as `kind`, else `InvalidInput`.

    Strict, because a value silently bent is a setting not applied: an int must be a TOML
    integer or an integer string (`3.9` is refused, not truncated), a float must be finite
    and never a boolean (`true` is not 1.0); a bool is `true`/`false` (from the environment
    also 1/0, yes/no, on/off, in any case, around spaces)."""
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.strip().lower() in _BOOL_WORDS:
                return _BOOL_WORDS[raw.strip().lower()]
            raise ValueError
        if kind is int:
            if isinstance(raw, int) and not isinstance(raw, bool):
                return raw
            if isinstance(raw, str):
                return int(raw.strip())
            raise ValueError
        if kind is float:
            if isinstance(raw, bool) or not isinstance(raw, int | float | str):
                raise ValueError
            value = float(raw)  # a TOML integer past 1e308 raises OverflowError
            if not math.isfinite(value):
                raise ValueError
            return value
        if kind is str:
            if not isinstance(raw, str):
                raise ValueError
            bad = _CONTROL.search(raw)
            if bad is not None:
                # No setting holds one (a path with NUL cannot be opened; a region with a
                # newline was cut mid-string in botocore's message): say which setting and
                # which character, not the value, which may be a secret.
                what = (
                    "a NUL character"
                    if bad.group() == "\0"
                    else f"a control character (U+{ord(bad.group()):04X})"
                )
                raise InvalidInput(f"{source}: {where} contains {what}")
            return raw
    except (TypeError, ValueError, OverflowError):
        pass
    what = "finite number" if kind is float else kind.__name__
    shown = repr(raw)
    if len(shown) > 40:  # a 400-digit number is one line still, and a readable one
        shown = f"{shown[:20]}... ({len(shown)} characters)"
    raise InvalidInput(f"{source}: {where} = {shown} is not a valid {what}")


#: The spellings of a boolean a variable may use, case aside: each true word has its false
#: one (`yes` and `no`, `on` and `off`), as systemd and most tools read them.
_BOOL_WORDS = {
    **dict.fromkeys(("1", "true", "yes", "on"), True),
    **dict.fromkeys(("0", "false", "no", "off"), False),
}


def _section(source: str, name: str, table: Mapping[str, Any], env: Mapping[str, str]) -> Any:
    cls = _SECTIONS[name]
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise InvalidInput(f"{source}: unknown key [{name}] {unknown[0]!r}")
    values: dict[str, Any] = {}
    for key in known:
        env_name = f"DATAMOVER_{name.upper()}_{key.upper()}"
        if env_name in env:
            values[key] = _coerce("environment", env_name, env[env_name], hints[key])
        elif key in table:
            values[key] = _coerce(source, f"[{name}] {key}", table[key], hints[key])
    return cls(**values)


def _check_environment(env: Mapping[str, str]) -> None:
    """Refuse `DATAMOVER_<SECTION>_<KEY>` for a key the section does not have: a misspelt
    override (`DATAMOVER_STORE_ENDPIONT`) is a setting silently not applied, as an unknown key
    in the file would be. `DATAMOVER_NAMESPACE_<KEY>` too: a namespace's key is a path, which
    no variable name can spell. Other `DATAMOVER_*` variables (`DATAMOVER_CONFIG`,
    `DATAMOVER_TOKEN`, ...) are not settings of a section and are left alone."""
    for name in sorted(env):
        if name.startswith("DATAMOVER_NAMESPACE_"):
            raise InvalidInput(
                f"environment: {name} is not a setting: namespaces are set in the config "
                "file's [namespace] table (or all at once by "
                "DATAMOVER_NAMESPACE=/logical=/local/dir,...)"
            )
        for section, cls in _SECTIONS.items():
            prefix = f"DATAMOVER_{section.upper()}_"
            if name.startswith(prefix):
                known = {f"{prefix}{f.name.upper()}" for f in fields(cls)}
                if name not in known:
                    raise InvalidInput(
                        f"environment: {name} is not a setting (the [{section}] keys are "
                        f"{', '.join(sorted(f.name for f in fields(cls)))})"
                    )


def _namespace(source: str, table: Mapping[str, Any], env: Mapping[str, str]) -> Namespace:
    mapping: dict[str, str] = {}
    if "DATAMOVER_NAMESPACE" in env:
        source = "environment DATAMOVER_NAMESPACE"
        for item in filter(None, (i.strip() for i in env["DATAMOVER_NAMESPACE"].split(","))):
            logical, sep, local = item.partition("=")
            if not sep:
                raise InvalidInput(f"{source}: {item!r} is not of the form /logical=/local/dir")
            if logical.strip() in mapping:  # as a key twice in the file is a TOML error
                raise InvalidInput(
                    f"{source}: prefix {logical.strip()!r} is mapped twice "
                    f"({mapping[logical.strip()]!r} and {local.strip()!r}); keep one"
                )
            mapping[logical.strip()] = local.strip()
        if not mapping:  # "," or " ": not a map, and not the empty value that leaves the file's
            raise InvalidInput(
                f"{source} = {env['DATAMOVER_NAMESPACE']!r} names no /logical=/local/dir pair "
                "(unset it, or set it empty, to keep the file's [namespace])"
            )
    else:
        for logical, local in table.items():
            if not isinstance(local, str):
                raise InvalidInput(f"{source}: [namespace] {logical!r} must map to a path string")
            mapping[logical] = local
    return Namespace.from_mapping(mapping, source)


def _default_state_dir(source: str, site: str, env: Mapping[str, str]) -> str:
    """`$XDG_STATE_HOME/datamover/<site>`, else under `~/.local/state`; `InvalidInput` naming
    `source` when there is no home directory either (HOME unset and a uid with no passwd
    entry, as in a container run as a made-up user: `Path.home` raises RuntimeError)."""
    base = env.get("XDG_STATE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".local" / "state")
        except RuntimeError:
            raise InvalidInput(
                f"{source}: [site] state_dir is not set and there is no home directory for its "
                "default (HOME is unset and this user has no passwd entry): set [site] "
                "state_dir or XDG_STATE_HOME"
            ) from None
    return str(Path(base) / "datamover" / site)


_PORT = re.compile(r"[0-9]{1,5}")


def listen_address(listen: str) -> tuple[str, int]:
    """`[api] listen` (`host:port`) as the host and port to bind: an IPv6 address is written
    in brackets, as in a URL (`[::1]:8080`, `[::]:8080`), and returned without them (the
    brackets are no part of the address `getaddrinfo` takes). Raises `ValueError` for
    anything else: no port, a port outside 1..65535 or not in ASCII digits, an IPv6
    address without brackets (`::1:8080` reads as several), brackets around no IPv6
    address."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise ValueError(listen)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)  # a ValueError for anything but an IPv6 address
    elif any(c in host for c in ":[]"):
        raise ValueError(listen)
    return host, int(port)


#: A SQLite URL with a relative database path: `sqlite:///catalog.db` (three slashes, then
#: no fourth).
_RELATIVE_SQLITE = re.compile(r"^(sqlite(?:\+\w+)?:///)(?!/)(?!:memory:)([^?]+)(\?.*)?$")


def _absolute(path: str, base: Path) -> str:
    """`path` made absolute against `base` (and normalised, as `Path.resolve` does)."""
    return str((base / path).resolve()) if path and not Path(path).is_absolute() else path


def _absolute_catalog(url: str, base: Path) -> str:
    """A `sqlite:///relative` catalog URL with its path made absolute against `base`."""
    found = _RELATIVE_SQLITE.match(url)
    if found is None:
        return url
    scheme, path, query = found.groups()
    return f"{scheme}{_absolute(path, base)}{query or ''}"


#: A SQLite URL's database file (absolute once `_absolute_catalog` has run).
_SQLITE_FILE = re.compile(r"^sqlite(?:\+\w+)?:///([^?]+)(?:\?.*)?$")


def _sqlite_file(url: str) -> str | None:
    """The database file of a `sqlite:///` catalog URL; None for another database, an
    in-memory one or a relative path."""
    found = _SQLITE_FILE.match(url)
    if found is None or found.group(1) == ":memory:" or not found.group(1).startswith("/"):
        return None
    return found.group(1)


def _check_outside_trees(
    namespace: Namespace,
    path: str,
    what: str,
    source: str,
    env: Mapping[str, str],
    holds: bool = False,
) -> None:
    """Refuse `path` (the state directory or the catalog's file, set where `what` says)
    inside a directory the namespace maps, or with `holds` (a directory) holding one: every
    `stage --delete` of that tree would try to move it into the trash (its own trash, for
    the state directory: that failed for ever), a push would publish it; and a tree inside
    the state directory shares it with the trash, the caches and the locks. Compared as
    written, normalised (`..` and `//` folded), as the namespace's own aliases are: symbolic
    links are not followed."""
    mine = Path(os.path.normpath(path))
    if str(mine).startswith("//"):  # POSIX leaves a leading `//` alone; Linux reads `/`
        mine = Path("/" + str(mine).lstrip("/"))
    trash = "its own trash" if holds else "the trash"
    if "DATAMOVER_NAMESPACE" in env:
        mapped = "DATAMOVER_NAMESPACE's"
    elif what.startswith(f"{source}: "):
        mapped = "[namespace]"
    else:  # `what` is a variable's: say which file the map is in
        mapped = f"{source}: [namespace]"
    for prefix, local in namespace.prefixes:
        if mine.is_relative_to(local):
            relation = "is inside"
            why = f"a push would publish it and a stage --delete move it to {trash}"
        elif holds and local.is_relative_to(mine):
            relation = "holds"
            why = "datamover's trash, caches and locks there could land in the tree"
        else:
            continue
        raise InvalidInput(
            f"{what} {str(mine)!r} {relation} the tree of {mapped} {prefix!r} = "
            f"{str(local)!r} ({why}): keep them apart (set it outside every mapped tree)"
        )


def parse_config(
    data: Mapping[str, Any],
    source: str,
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> Config:
    """Validate a parsed TOML document (plus environment overrides) into a `Config`.

    Relative paths from the document are taken relative to `base_dir` (the file's directory;
    default: the current directory), relative paths from the environment relative to the
    current directory."""
    given = os.environ if env is None else env
    # An empty variable is not set: it leaves the file's value (or the default) in place.
    emptied = frozenset(name for name, value in given.items() if value == "")
    env = {name: value for name, value in given.items() if value != ""}
    here = Path.cwd()
    base = here if base_dir is None else base_dir

    def where(key: str) -> Path:
        return here if key in env else base

    def origin(section: str, key: str) -> str:
        """`[section] key` for messages, as where its value came from: the variable that
        overrides it, else the file."""
        return _origin(source, env, section, key)

    def required(section: str, key: str) -> InvalidInput:
        name = f"DATAMOVER_{section.upper()}_{key.upper()}"
        if name in emptied:
            return InvalidInput(
                f"{source}: [{section}] {key} is required (environment: {name} is empty, "
                "which counts as not set)"
            )
        return InvalidInput(f"{source}: [{section}] {key} is required")

    unknown = sorted(set(data) - {*_SECTIONS, "namespace"})
    if unknown:
        raise InvalidInput(f"{source}: unknown section [{unknown[0]}]")
    _check_environment(given)  # an empty variable's name is checked all the same
    for name in (*_SECTIONS, "namespace"):
        if name in data and not isinstance(data[name], Mapping):
            raise InvalidInput(f"{source}: [{name}] must be a table")
    sections = {name: _section(source, name, data.get(name, {}), env) for name in _SECTIONS}
    site: SiteSettings = sections["site"]
    site_given = site
    if not site.name:
        raise required("site", "name")
    try:
        check_site_name(site.name)
    except InvalidInput as exc:
        raise InvalidInput(f"{origin('site', 'name')}: {exc}") from None
    state_dir = _absolute(
        site.state_dir or _default_state_dir(source, site.name, env),
        where("DATAMOVER_SITE_STATE_DIR"),
    )
    catalog = site.catalog or f"sqlite:///{Path(state_dir) / 'catalog.db'}"
    catalog = _absolute_catalog(catalog, where("DATAMOVER_SITE_CATALOG"))
    site = dataclasses.replace(site, state_dir=state_dir, catalog=catalog)

    store: StoreSettings = sections["store"]
    if not store.bucket:
        raise required("store", "bucket")
    if store.endpoint:
        check_endpoint(store.endpoint, origin("store", "endpoint"))
    # The session token goes with the key it was issued for: taken from AWS_SESSION_TOKEN
    # only with a key taken from the environment (temporary credentials exported by `aws sts
    # assume-role`, a CI step); botocore, given the pair, reads no token itself.
    env_key = not store.access_key and bool(env.get("AWS_ACCESS_KEY_ID"))
    fallbacks = [("access_key", "AWS_ACCESS_KEY_ID"), ("secret_key", "AWS_SECRET_ACCESS_KEY")]
    if env_key:
        fallbacks.append(("session_token", "AWS_SESSION_TOKEN"))
    came: dict[str, str] = {}  # where each key was found, for the message below
    for key, fallback in fallbacks:
        if getattr(store, key):
            came[key] = origin("store", key)
            check_key_setting(getattr(store, key), came[key])
        elif env.get(fallback):
            came[key] = f"environment: {fallback}"
            check_key_setting(env[fallback], came[key])
            store = dataclasses.replace(store, **{key: env[fallback]})
    if bool(store.access_key) != bool(store.secret_key):  # botocore: "Partial credentials"
        have, lack = ("access_key", "secret_key")[:: 1 if store.access_key else -1]
        variable = dict(fallbacks[:2])[lack]
        raise InvalidInput(
            f"{came[have]} gives an S3 {have.replace('_', ' ')} but no {lack.replace('_', ' ')} "
            f"is set ([store] {lack} in {source}, DATAMOVER_STORE_{lack.upper()} or "
            f"{variable}): give both, or neither to use AWS's own credential chain (a "
            "profile, a role)"
        )
    for key in ("connect_timeout", "read_timeout"):
        if getattr(store, key) <= 0:
            raise InvalidInput(f"{origin('store', key)} must be more than 0 seconds")
    for key in ("max_connections", "retry_attempts"):
        if getattr(store, key) < 1:
            raise InvalidInput(f"{origin('store', key)} must be at least 1")
    transfer: TransferSettings = sections["transfer"]
    if transfer.compression not in ("auto", "never"):
        raise InvalidInput(f"{origin('transfer', 'compression')} must be 'auto' or 'never'")
    if not 1 * MiB <= transfer.pack_size <= 1024 * MiB:
        raise InvalidInput(f"{origin('transfer', 'pack_size')} must be between 1 MiB and 1 GiB")
    for key in (
        "upload_concurrency",
        "download_concurrency",
        "segment_entries",
        "max_request",
        "batch_bytes",
        "lookup_threads",
    ):
        if getattr(transfer, key) < 1:
            raise InvalidInput(f"{origin('transfer', key)} must be at least 1")
    for key in ("read_workers", "coalesce_gap", "bandwidth_limit"):
        if getattr(transfer, key) < 0:
            raise InvalidInput(f"{origin('transfer', key)} must not be negative")
    if transfer.write_workers < -1:
        raise InvalidInput(f"{origin('transfer', 'write_workers')} must be -1 (none), 0 or more")
    if not 1 <= transfer.zstd_level <= 22:
        raise InvalidInput(f"{origin('transfer', 'zstd_level')} must be between 1 and 22")
    api: ApiSettings = sections["api"]
    api = dataclasses.replace(
        api, token_file=_absolute(api.token_file, where("DATAMOVER_API_TOKEN_FILE"))
    )
    if api.listen:
        try:
            listen_address(api.listen)
        except ValueError:
            raise InvalidInput(
                f"{origin('api', 'listen')} must be host:port (an IPv6 address in brackets: "
                f"[::1]:8080), not {api.listen!r}"
            ) from None
    for key in ("workers", "lease_seconds", "max_attempts"):
        if getattr(api, key) < 1:
            raise InvalidInput(f"{origin('api', key)} must be at least 1")
    if api.history_days < 0 or 0 < api.history_days < MIN_HISTORY_DAYS:
        raise InvalidInput(
            f"{origin('api', 'history_days')} must be 0 (keep finished transfers for ever) "
            "or at least 1/24 (an hour)"
        )
    if api.reindex_minutes < 0 or 0 < api.reindex_minutes < 1:
        raise InvalidInput(
            f"{origin('api', 'reindex_minutes')} must be 0 (never) or at least 1 (a minute)"
        )
    if api.trash_days < 0:
        raise InvalidInput(
            f"{origin('api', 'trash_days')} must be 0 (never empty the trash) or at least 1 (a day)"
        )
    checked = {"store": store, "transfer": transfer, "api": api}
    for (section, key), (most, unit) in LIMITS.items():
        if getattr(checked[section], key) > most:
            raise InvalidInput(f"{origin(section, key)} must be at most {most} ({unit})")
    namespace = _namespace(source, data.get("namespace", {}), env)
    if site_given.state_dir:
        # Only one set by hand: the default under a home directory a namespace maps (`/home`)
        # refused every command, those of a daemon's clients too, which never use it. Push
        # and stage refuse a dataset whose tree holds the state directory, whatever set it.
        _check_outside_trees(
            namespace, state_dir, origin("site", "state_dir"), source, env, holds=True
        )
    database = _sqlite_file(catalog) if site_given.catalog else None
    if database is not None:
        # The default lies in the default state directory: as that, left to push and stage.
        _check_outside_trees(namespace, database, origin("site", "catalog"), source, env)
    if api.token_file:  # a secret: published with a tree, every site's store would hold it
        _check_outside_trees(namespace, api.token_file, origin("api", "token_file"), source, env)
    return Config(
        site=site,
        store=store,
        namespace=namespace,
        transfer=transfer,
        api=api,
        source=source,
        overrides=frozenset(
            name
            for section, cls in _SECTIONS.items()
            for f in fields(cls)
            if (name := f"DATAMOVER_{section.upper()}_{f.name.upper()}") in env
        ),
    )


def read_regular_file(path: str | Path, what: str) -> bytes:
    """The bytes of `path`, which must be a regular file: `InvalidInput` naming `what`
    otherwise, since a FIFO would block the reader until someone writes to it and a device
    may never end. Opened without blocking, so a FIFO is refused, not waited on; other
    `OSError`s are the caller's to name."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise InvalidInput(f"{what} is a directory")
        if not stat.S_ISREG(mode):
            raise InvalidInput(f"{what} is not a regular file (a FIFO, a socket or a device)")
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        return handle.read()


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Load the config named by `path`, else by `DATAMOVER_CONFIG`; raise `InvalidInput`."""
    env = os.environ if env is None else env
    chosen = path or env.get("DATAMOVER_CONFIG")
    if not chosen:
        raise InvalidInput("no configuration: pass --config FILE or set DATAMOVER_CONFIG")
    file = Path(chosen)
    try:
        # A byte-order mark (which Windows editors write) is no TOML: read past it.
        raw = read_regular_file(file, f"config file {str(file)!r}").decode()
        data = tomllib.loads(raw.removeprefix("\ufeff"))
    except FileNotFoundError:
        raise InvalidInput(f"config file {str(file)!r} does not exist") from None
    except PermissionError:
        raise InvalidInput(f"config file {str(file)!r} is not readable") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"config file {str(file)!r} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"config file {str(file)!r} is not UTF-8 text") from None
    except ValueError:  # tomllib's int() of a number longer than Python converts (4300 digits)
        raise InvalidInput(
            f"config file {str(file)!r} is not valid TOML: it holds a number too long to read"
        ) from None
    except RecursionError:  # tomllib recurses at each level of nested arrays and tables
        raise InvalidInput(
            f"config file {str(file)!r} is not valid TOML: it nests arrays or tables too "
            "deeply to read"
        ) from None
    except OSError as exc:
        raise InvalidInput(
            f"config file {str(file)!r} cannot be read: {exc.strerror or exc}"
        ) from None
    return parse_config(data, str(file), env, base_dir=file.absolute().parent)
