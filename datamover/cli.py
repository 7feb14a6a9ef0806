"""The `datamover` command: parse, load config, call a service, print. No logic lives here.

Every command takes `--config FILE` (or `DATAMOVER_CONFIG`, or `--config` before the
command) and `--json`. Anything a user
can cause ends as one line on stderr (`datamover: error: ...`) and the error's exit code;
with `--json` the same error is also printed as `{"error": {"code", "message"}}` on stdout.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from datamover import gctune, proclimits
from datamover.console import Bar, counted, emit_json, error_line, human_bytes
from datamover.errors import Corrupt, DatamoverError, Interrupted, PermanentError

T = TypeVar("T")


def common(fn: Callable[..., Any], json_help: str | None = None) -> Callable[..., Any]:
    """Add `--config` and `--json` to a command (`json_help` None: one JSON object on
    stdout; "" hides the option, for a command that prints no result)."""
    fn = click.option(
        "--json",
        "as_json",
        is_flag=True,
        hidden=json_help == "",
        help=json_help or "Print one JSON object on stdout.",
    )(fn)
    return click.option(
        "--config",
        "config_path",
        envvar="DATAMOVER_CONFIG",
        metavar="FILE",
        help="Site configuration (TOML). Default: $DATAMOVER_CONFIG.",
    )(fn)


def run_with_site(config: Any, work: Callable[[Any], Awaitable[T]]) -> T:
    """Open the site of `config` (a `Config`, or a path to load), run `work(site)`, close it."""
    import asyncio

    from datamover.config import load_config
    from datamover.site import Site

    if config is None or isinstance(config, str):
        config = load_config(config)

    async def main() -> T:
        site = await Site.open(config)
        try:
            return await work(site)
        finally:
            await site.close()

    return asyncio.run(main())


def run_with_catalog(config: Any, work: Callable[[Any], Awaitable[T]]) -> T:
    """Open only the catalog of `config` (a `Config`, or a path to load), run `work(engine)`
    with its `AsyncEngine`, close it. For the commands that need nothing else (tokens, pins,
    a local release): they neither import nor configure the store client, which takes a
    third of a second off each (a Slurm epilog's release among them), and they work while
    the store is unreachable or misconfigured."""
    import asyncio

    from datamover.catalog.engine import open_engine
    from datamover.config import load_config
    from datamover.site import make_state_dir

    if config is None or isinstance(config, str):
        config = load_config(config)

    async def main() -> T:
        make_state_dir(config)
        engine = await open_engine(config.catalog_url, config.site.name)
        try:
            return await work(engine)
        finally:
            await engine.dispose()

    return asyncio.run(main())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="datamover")
@click.option(
    "--config",
    "config_path",
    metavar="FILE",
    help="Site configuration for the command that follows (as its own --config, which wins).",
)
def cli(config_path: str | None) -> None:
    """Deduplicated, packed, path-preserving data movement between sites and one S3 store."""
    # Given before the command (`datamover --config F ls`, as rclone takes it), it stands
    # in for DATAMOVER_CONFIG: the command's own --config still comes first.
    if config_path is not None:
        os.environ["DATAMOVER_CONFIG"] = config_path


def daemon_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options of commands that the site daemon can run for us."""
    fn = click.option(
        "--local", is_flag=True, help="Run in this process even if a site daemon is configured."
    )(fn)
    fn = click.option(
        "--daemon",
        "daemon_only",
        is_flag=True,
        help="Only through the site daemon: if it does not answer, exit 6 (try again later) "
        "instead of running in this process (what job hooks want).",
    )(fn)
    fn = click.option(
        "--no-wait", is_flag=True, help="Submit to the daemon and return the transfer id."
    )(fn)
    fn = click.option(
        "--wait", is_flag=True, help="Wait until the transfer has ended (the default)."
    )(fn)
    return click.option(
        "--priority",
        type=click.Choice(["job", "interactive", "bulk"]),
        default="interactive",
        show_default=True,
        help="Queue priority (daemon only).",
    )(fn)


def _local_or_no_wait(local: bool, no_wait: bool, wait: bool, daemon_only: bool = False) -> None:
    if local and daemon_only:
        raise click.UsageError("--local runs here and --daemon only through the daemon: choose one")
    if local and no_wait:
        raise click.UsageError(
            "--no-wait submits to the daemon and --local runs here, waiting: choose one"
        )
    if wait and no_wait:
        raise click.UsageError("--wait and --no-wait contradict each other: choose one")


@cli.command()
@click.argument("logical_path")
@click.option("--checksum", is_flag=True, help="Re-read every file instead of trusting size+mtime.")
@click.option(
    "--force",
    is_flag=True,
    help=(
        "Publish the tree as it is where push refuses it: a stage of it did not finish "
        "here, it holds an older version than the latest, or it is empty and the latest "
        "is not."
    ),
)
@daemon_options
@common
def push(
    logical_path: str,
    checksum: bool,
    force: bool,
    local: bool,
    daemon_only: bool,
    wait: bool,
    no_wait: bool,
    priority: str,
    config_path: str | None,
    as_json: bool,
) -> None:
    """Publish the local tree of LOGICAL_PATH as a new version."""
    from datamover.cli_daemon import through_daemon
    from datamover.config import load_config

    _local_or_no_wait(local, no_wait, wait, daemon_only)
    config = load_config(config_path)
    request = {"kind": "push", "path": logical_path, "priority": priority}
    for key, on in (("checksum", checksum), ("force", force)):
        if on:
            request[key] = True
    result = None if local else through_daemon(config, request, not no_wait, as_json, daemon_only)
    if result is None:
        # Imported only here: through the daemon, the command needs none of it (SQLAlchemy,
        # botocore: most of a second of start-up on a small machine).
        from datamover.transfer.push import push as do_push

        with Bar(f"push {logical_path}", not as_json) as bar:
            result = run_with_site(
                config,
                lambda site: do_push(
                    site, logical_path, checksum=checksum, force=force, progress=bar
                ),
            ).to_json()
    if as_json:
        emit_json(result)
        return
    if "version" not in result:  # submitted without waiting
        click.echo(f"submitted transfer {result['transfer']}")
        return
    state = "unchanged, still" if result["unchanged"] else "published"
    click.echo(
        f"{result['dataset']}: {state} version {result['version']}: "
        f"{counted(result['files'], 'file')}, {human_bytes(result['bytes'])}; read "
        f"{counted(result['files_read'], 'file')}, uploaded "
        f"{human_bytes(result['uploaded_bytes'])} in {result['seconds']:.2f} s"
    )
    _name_skipped(result.get("skipped_special", []), result.get("skipped_special_count", 0))
    _name_partials(result.get("skipped_partial", []), result.get("skipped_partial_count", 0))


def _name_partials(paths: list[str], count: int) -> None:
    """Name the first ten files a push passed over because stage keeps its partial files
    under such names (a killed stage's leftovers, or a user's file so named), and count
    the rest."""
    from datamover.domain.paths import printable

    count = max(count, len(paths))
    for path in paths[:10]:
        click.echo(
            f"  skipped {printable(path)}: named as stage's partial files "
            "(.dm-<16 hex>.part), which no version holds",
            err=True,
        )
    if count > 10:
        click.echo(f"  and {count - 10} more named as stage's partial files", err=True)


def _name_skipped(paths: list[str], count: int) -> None:
    """Name the first ten special files a push or verify skipped on stderr, and count the
    rest."""
    from datamover.domain.paths import printable

    count = max(count, len(paths))  # a daemon of an older release sends no count
    for path in paths[:10]:
        click.echo(f"  skipped special file {printable(path)}", err=True)
    if count > 10:
        click.echo(f"  and {count - 10} more special files (sockets, FIFOs, devices)", err=True)


@cli.command()
@click.argument("logical_path")
@click.option("--version", "version", metavar="ID", help="Version to stage (default: latest).")
@click.option("--delete", is_flag=True, help="Remove local files the version does not have.")
@click.option(
    "--checksum", is_flag=True, help="Re-hash local files instead of trusting size+mtime."
)
@click.option("--pin", metavar="ID", help="Pin the replica under ID once ready (a job id).")
@click.option(
    "--force",
    is_flag=True,
    help="Stage even while other jobs' pins hold the replica at another version (their "
    "files change under them).",
)
@click.option(
    "--deadline",
    metavar="TIME",
    help="When the data is needed (RFC 3339; without an offset, local time).",
)
@daemon_options
@common
def stage(
    logical_path: str,
    version: str | None,
    delete: bool,
    checksum: bool,
    pin: str | None,
    force: bool,
    deadline: str | None,
    local: bool,
    daemon_only: bool,
    wait: bool,
    no_wait: bool,
    priority: str,
    config_path: str | None,
    as_json: bool,
) -> None:
    """Materialise a version of LOGICAL_PATH at this site's mapped path.

    Exits 0 only when the replica is complete and every chunk verified. With a site daemon
    configured and reachable, the daemon does the work (the CLI waits and shows progress).
    """
    from datamover.cli_daemon import stage_locally, through_daemon
    from datamover.config import load_config
    from datamover.domain.ids import check_version_id
    from datamover.domain.transfers import check_text, with_offset

    if version is not None:
        check_version_id(version)
    if pin is not None:  # the same checks as the daemon's, also when staging locally
        check_text(pin, "--pin")
    if deadline is not None:
        deadline = with_offset(deadline, "--deadline")
    if wait and no_wait:
        raise click.UsageError("--wait and --no-wait contradict each other")
    _local_or_no_wait(local, no_wait, wait, daemon_only)
    config = load_config(config_path)
    request: dict[str, Any] = {"kind": "stage", "path": logical_path, "priority": priority}
    for key, value in (("version", version), ("pin", pin), ("deadline", deadline)):
        if value is not None:
            request[key] = value
    for key, on in (("delete", delete), ("checksum", checksum), ("force", force)):
        if on:
            request[key] = True
    result = None if local else through_daemon(config, request, not no_wait, as_json, daemon_only)
    if result is None:
        result = stage_locally(config, request, as_json)
    if as_json:
        emit_json(result)
        return
    if "version" not in result:
        click.echo(f"submitted transfer {result['transfer']}")
        return
    click.echo(
        f"{result['dataset']}: version {result['version']} ready: "
        f"{counted(result['files'], 'file')}, {human_bytes(result['bytes'])}; fetched "
        f"{counted(result['fetched_files'], 'file')}, downloaded "
        f"{human_bytes(result['downloaded_bytes'])} in {result['seconds']:.2f} s"
        + (f"; pinned as {pin}" if pin else "")
    )
    if result.get("trashed_count"):
        click.echo(
            f"  moved {result['trashed_count']} local "
            f"{'entry' if result['trashed_count'] == 1 else 'entries'} (changed here, or "
            f"not in the version) to {result['trash_dir']}",
            err=True,
        )


@cli.command()
@click.argument("logical_path")
@click.option(
    "--version",
    "version",
    metavar="ID",
    help="Version to compare with (default: the version staged here, else the latest).",
)
@click.option("--allow-extra", is_flag=True, help="Ignore local files the version lacks.")
@common
def verify(
    logical_path: str,
    version: str | None,
    allow_extra: bool,
    config_path: str | None,
    as_json: bool,
) -> None:
    """Exit 0 only if the local tree of LOGICAL_PATH matches the version exactly."""
    from datamover.domain.ids import check_version_id
    from datamover.transfer.verify import verify as do_verify

    if version is not None:
        check_version_id(version)
    result = run_with_site(
        config_path,
        lambda site: do_verify(site, logical_path, version=version, allow_extra=allow_extra),
    )
    if as_json:
        emit_json(result.to_json())
    else:
        verdict = (
            "matches" if result.ok else f"differs ({counted(result.problem_count, 'problem')})"
        )
        click.echo(
            f"{result.dataset}: local tree {verdict} version {result.version} "
            f"({counted(result.files_checked, 'file')}, "
            f"{human_bytes(result.bytes_checked)} checked)"
        )
        for problem in result.problems:
            click.echo(f"  {problem}")
        _name_skipped(result.skipped_special, result.skipped_special_count)
        if result.newer is not None:
            click.echo(
                f"note: a newer version, {result.newer}, is published; "
                f"`datamover stage {result.dataset}` brings this tree to it once no job's "
                "pin holds it (`datamover pins`)"
            )
    if not result.ok:
        sys.exit(1)


@cli.command(name="ls")
@click.argument("prefix", default="/")
@common
def ls(prefix: str, config_path: str | None, as_json: bool) -> None:
    """List datasets under PREFIX and their versions.

    Printed one dataset at a time as the store lists them; none is one line on stderr
    ("no datasets under PREFIX"), exit 0. A corrupt version document is
    one warning line on stderr (and an entry of "errors" with --json); the others are still
    listed, and the command then exits 5.
    """
    from datamover.datasets import BadVersion, iter_datasets

    bad: list[BadVersion] = []

    def close_json(error: DatamoverError | None = None) -> None:
        tail: dict[str, Any] = {"errors": [b.to_json() for b in bad], "prefix": prefix}
        if error is not None:
            tail["error"] = {"code": error.code, "message": error.message}
        sys.stdout.write("], " + json.dumps(tail, sort_keys=True)[1:] + "\n")
        sys.stdout.flush()

    started = listed = False  # JSON begun; a dataset printed as text

    async def work(site: Any) -> None:
        nonlocal started, listed
        async for info in iter_datasets(site, prefix):
            for b in info.bad:
                bad.append(b)
                click.echo(f"datamover: warning: {b.error.message}", err=True)
            if not info.versions:
                continue
            if as_json:
                # The same bytes as one `emit_json` of the whole listing ("datasets" sorts
                # first), without holding it.
                sys.stdout.write(", " if started else '{"datasets": [')
                sys.stdout.write(json.dumps(info.to_json(), sort_keys=True))
                started = True
                continue
            listed = True
            click.echo(info.path)
            for v in info.versions:
                files = f"{v.files:>10} {'file ' if v.files == 1 else 'files'}"
                click.echo(f"  {v.version}  {files}  {human_bytes(v.bytes):>10}  from {v.site}")

    try:
        run_with_site(config_path, work)
    except KeyboardInterrupt:
        if not started:
            raise
        close_json(Interrupted("interrupted"))  # part of the object is out: end it
        error_line("interrupted")
        _leave(Interrupted.exit_code)
    except Exception as exc:
        error = exc if isinstance(exc, DatamoverError) else _expected(exc)
        if not started or error is None:
            raise
        # Part of the object is out: end it, with the error in it, so stdout stays one object.
        close_json(error)
        error_line(error.message)
        _leave(error.exit_code)
    if as_json:
        if not started:
            sys.stdout.write('{"datasets": [')
        close_json()
    elif not listed and not bad:  # a typo'd prefix listed nothing, silently
        click.echo(f"no datasets under {prefix}", err=True)
    if bad:
        sys.exit(Corrupt.exit_code)


@cli.group()
def db() -> None:
    """Catalog maintenance."""


@db.command()
@common
def upgrade(config_path: str | None, as_json: bool) -> None:
    """Migrate the catalog to the newest schema."""
    import asyncio

    from datamover.catalog.engine import create_engine_for
    from datamover.catalog.engine import upgrade as do_upgrade
    from datamover.config import load_config
    from datamover.site import make_state_dir

    config = load_config(config_path)

    async def main() -> tuple[str | None, str]:
        make_state_dir(config)
        engine = create_engine_for(config.catalog_url)
        try:
            return await do_upgrade(engine)
        finally:
            await engine.dispose()

    before, after = _catalog_call(config.catalog_url, lambda: asyncio.run(main()))
    if as_json:
        emit_json({"before": before, "after": after})
    else:
        click.echo(f"catalog at schema revision {after} (was {before or 'empty'})")


@db.command()
@click.option(
    "--read-data",
    is_flag=True,
    help="Also read each new pack's data: every chunk must match its digest, the pack its "
    "name (packs already known are not read again).",
)
@common
def rebuild(read_data: bool, config_path: str | None, as_json: bool) -> None:
    """Index the chunks of every pack in the store this catalog does not know yet.

    Run it at a site new to a bucket that already holds data, or after losing the catalog:
    pushes here then send no chunk that is already stored, whoever stored it. Incremental
    (a rerun reads only packs still unknown) and safe while the daemon runs. A pack whose
    index is corrupt is named and skipped; the command then exits 5.
    """
    from datamover.repo.reindex import reindex

    async def work(site: Any) -> Any:
        with Bar("indexing packs", not as_json) as bar:
            return await reindex(
                site.store,
                site.catalog,
                concurrency=site.config.transfer.download_concurrency,
                read_data=read_data,
                progress=bar,
            )

    result = run_with_site(config_path, work)
    if as_json:
        emit_json(result.to_json())
    else:
        click.echo(
            f"{counted(result.packs, 'pack')} in the store: {result.packs_indexed} indexed "
            f"now ({counted(result.chunks_indexed, 'chunk')}, "
            f"{human_bytes(result.bytes_read)} read), {result.packs_known} known before, "
            f"in {result.seconds:.1f} s"
        )
        if result.vanished:
            click.echo(f"{counted(result.vanished, 'pack')} gone before they were read")
        if result.foreign_keys:
            click.echo(
                f"{counted(result.foreign_keys, 'object')} among the packs name no pack, ignored"
            )
    # On stderr with --json too, as every command's warnings are: a script that reads only
    # the exit code (5) has the reason in its log.
    for key, reason in result.corrupt:
        click.echo(f"datamover: warning: {key}: corrupt, not indexed: {reason}", err=True)
    more = result.corrupt_count - len(result.corrupt)
    if more:
        click.echo(f"datamover: warning: and {counted(more, 'more corrupt pack')}", err=True)
    if not result.ok:
        sys.exit(Corrupt.exit_code)


def _catalog_call(url: str, call: Callable[[], T]) -> T:
    from sqlalchemy.exc import SQLAlchemyError

    from datamover.catalog.engine import cannot_open, describe_url

    try:
        return call()
    except (SQLAlchemyError, OSError) as exc:
        raise cannot_open(f"catalog {describe_url(url)} cannot be upgraded", exc) from None


@cli.command()
@click.option(
    "--older-than",
    "older_than",
    type=click.IntRange(min=0, max=36500),  # a century; timedelta's own limit is a traceback
    default=None,
    metavar="DAYS",
    help="Only runs last moved into more than DAYS days ago (with --empty: required, >= 1; "
    "at most 36500).",
)
@click.option("--empty", is_flag=True, help="Remove those runs (what stage moved aside).")
@common
def trash(older_than: int | None, empty: bool, config_path: str | None, as_json: bool) -> None:
    """List the trash: what stage runs moved aside (users' changes), by run; or empty it.

    Only this command and a daemon with `[api] trash_days` empty the trash. `--empty
    --older-than DAYS` removes the runs whose last move was more than DAYS days ago (at
    least 1: a stage that moved something in the last day may still write into its run).
    """
    from datetime import timedelta

    from datamover.config import load_config
    from datamover.transfer import trash as trash_runs

    config = load_config(config_path)
    if empty:
        if older_than is None:
            raise click.UsageError("--empty needs --older-than DAYS (at least 1)")
        listed = trash_runs.empty(config.state_dir, older_than)
    else:
        listed = list(trash_runs.runs(config.state_dir, timedelta(days=older_than or 0)))
    files, nbytes = sum(r.files for r in listed), sum(r.bytes for r in listed)
    if as_json:
        emit_json(
            {
                "trash": str(trash_runs.trash_root(config.state_dir)),
                "emptied": empty,
                "runs": [r.to_json() for r in listed],
                "files": files,
                "bytes": nbytes,
            }
        )
        return
    for run in listed:
        started = run.started.strftime("%Y-%m-%d %H:%M:%SZ")
        click.echo(f"{run.name}  {started}  {counted(run.files, 'file')}, {human_bytes(run.bytes)}")
    what = "removed" if empty else "in"
    click.echo(
        f"{counted(len(listed), 'run')} {what} {trash_runs.trash_root(config.state_dir)}: "
        f"{counted(files, 'file')}, {human_bytes(nbytes)}"
    )


@cli.command()
@click.option(
    "--files",
    type=click.IntRange(min=0),
    default=2000,
    show_default=True,
    help="Small files to generate.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def demo(files: int, as_json: bool) -> None:
    """Push a generated tree at site A and stage it at site B through an embedded SeaweedFS."""
    from datamover.demo import run_demo

    summary = run_demo(files, quiet=as_json)
    if as_json:
        emit_json(summary)


@cli.command()
@click.option(
    "--dir",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where its data lives (kept between runs). Default: "
    "$XDG_DATA_HOME/datamover/sandbox or ~/.local/share/datamover/sandbox.",
)
@click.option(
    "--port",
    type=click.IntRange(1024, 55535),
    default=8333,
    show_default=True,
    help="S3 port on 127.0.0.1 (its gRPC port is 10000 above).",
)
@click.option("--bucket", default="datamover", show_default=True, help="Bucket to create.")
def sandbox(data_dir: Path | None, port: int, bucket: str) -> None:
    """Run a local S3 server (SeaweedFS) until Ctrl-C, to try datamover with your own site
    config: config/workstation.toml works with it as it is. Loopback only, fixed keys: not
    a store for data that matters."""
    from datamover.sandbox import default_dir, run_sandbox

    run_sandbox(data_dir or default_dir(), port, bucket, click.echo)


import datamover.cli_daemon  # noqa: E402, F401  (registers the daemon commands)


def _leave(status: int) -> NoReturn:
    """Flush what was printed and end the process at once.

    Everything the command owns (store connections, the catalog, worker processes) is closed
    by the time this runs; skipping the interpreter's teardown of every imported module saves
    about a tenth of a second per command, which scripts calling datamover in loops notice.
    """
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: nothing more can be said
        status = status or 1
    logging.shutdown()
    _remove_mp_tempdir()
    os._exit(status)


def _remove_mp_tempdir() -> None:
    """Remove the `pymp-*` directory `multiprocessing` made for this process (the fork
    server's socket), which its exit handler would have removed: `os._exit` skips it, and
    every command with worker processes left one in $TMPDIR."""
    mp_process = sys.modules.get("multiprocessing.process")
    if mp_process is None:
        return
    tempdir = mp_process.current_process()._config.get("tempdir")
    if tempdir:
        import shutil

        shutil.rmtree(tempdir, ignore_errors=True)


def _expected(exc: Exception) -> DatamoverError | None:
    """The error a user or the environment caused, behind an exception that is not a
    `DatamoverError`: a catalog outage (transient, exit 6), or an OS error (a directory
    that cannot be written, a full disk), named by its reason and file. Else None."""
    if "sqlalchemy" in sys.modules:  # only then can it be a database error
        from datamover.catalog.engine import catalog_outage

        outage = catalog_outage(exc)
        if outage is not None:
            return outage
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        files = [repr(f) for f in (exc.filename, exc.filename2) if f is not None]
        said = f"{reason}: {' -> '.join(files)}" if files else reason
        if exc.errno == errno.EACCES and exc.filename is not None:
            # Exit 7, as the README gives a local directory this user may not write (it
            # had been exit 1, which `verify` gives to a tree that differs). Not EPERM:
            # an immutable file is the system refusing, exit 1.
            return PermanentError(f"{said} (check its owner and mode)")
        return DatamoverError(said)
    return None


def _fail(exc: DatamoverError, as_json: bool) -> NoReturn:
    error_line(exc.message)
    if as_json:
        emit_json({"error": {"code": exc.code, "message": exc.message}})
    _leave(exc.exit_code)


def _debug() -> bool:
    """Whether `DATAMOVER_DEBUG` asks for debug logs and tracebacks (`0`, `false`, `no`,
    `off` and empty do not)."""
    value = os.environ.get("DATAMOVER_DEBUG", "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def main() -> None:
    """Entry point: run the CLI, turning every expected failure into one line and an exit code."""
    gctune.tune()
    proclimits.raise_open_files()
    as_json = "--json" in sys.argv[1:]
    logging.basicConfig(
        level=logging.DEBUG if _debug() else logging.WARNING,
        format="datamover: %(levelname)s: %(message)s",
    )
    if not _debug():
        # botocore's warnings come with a traceback (a failed credential refresh), and the
        # failure they warn of reaches the user anyway, as the one line of its error.
        for library in ("botocore", "aiobotocore"):
            logging.getLogger(library).setLevel(logging.ERROR)
    try:
        status = cli.main(standalone_mode=False)
        _leave(status if isinstance(status, int) else 0)
    except click.exceptions.Exit as exc:
        _leave(exc.exit_code)
    except click.ClickException as exc:
        # One line: Click lists a choice's values one to a line ("Choose from:\n\tread,").
        # Only the line breaks go: a value the user gave keeps its spaces.
        message = re.sub(r"\s*\n\s*", " ", exc.format_message().strip())
        if isinstance(exc, click.NoSuchOption) and exc.option_name == "--config":
            # Given between a group and its command (`datamover db --config F upgrade`).
            message += (
                " Give it before the command or at its end: datamover --config FILE db "
                "upgrade, or datamover db upgrade --config FILE."
            )
        error_line(message)
        if as_json:
            emit_json({"error": {"code": "usage", "message": message}})
        _leave(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _fail(Interrupted("interrupted"), as_json)  # one JSON object with --json, as ever
    except DatamoverError as exc:
        _fail(exc, as_json)
    except Exception as exc:  # the last line of defence: no tracebacks
        if _debug():
            raise
        expected = _expected(exc)
        if expected is not None:
            _fail(expected, as_json)
        said = (str(exc).strip().splitlines() or [""])[0]  # a library's text may run on
        error_line(
            f"internal error ({type(exc).__name__}: {said}); "
            "set DATAMOVER_DEBUG=1 for a traceback and report it"
        )
        if as_json:
            emit_json({"error": {"code": "internal", "message": said}})
        _leave(70)
