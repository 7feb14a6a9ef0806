"""CLI commands around the site daemon: `serve`, `token`, `transfer ...`, `release`, and
the path by which `push`/`stage` hand their work to a configured, reachable daemon."""

from __future__ import annotations

import logging
import os
import sys
from functools import partial
from typing import Any

import click

from datamover.cli import (
    Bar,
    cli,
    common,
    counted,
    emit_json,
    human_bytes,
    run_with_catalog,
    run_with_site,
)
from datamover.config import Config, load_config
from datamover.errors import Interrupted, InvalidInput, TransientError

log = logging.getLogger(__name__)


def _client(config: Config) -> Any:
    from datamover.client import DaemonClient, load_token

    url = config.api_url
    if url is None:
        raise InvalidInput(f"{config.source}: no [api] listen or url: there is no daemon to ask")
    return DaemonClient(url, load_token(config), site=config.site.name)


def _follow(client: Any, transfer: dict[str, Any], as_json: bool) -> dict[str, Any]:
    """Wait for a transfer, with a progress bar on a terminal; return its final state."""
    with Bar(f"{transfer['kind']} {transfer['path']}", not as_json) as bar:
        seen = {"files": 0, "bytes": 0}

        def update(t: dict[str, Any]) -> None:
            bar.total(t.get("files_total"), t.get("bytes_total"))
            bar.advance(t["files_done"] - seen["files"], t["bytes_done"] - seen["bytes"])
            seen.update(files=t["files_done"], bytes=t["bytes_done"])

        # A progress bar wants an answer twice a second; a script or hook only the end.
        try:
            return client.wait(transfer["id"], update, hold=0.5 if bar.enabled else 20.0)
        except KeyboardInterrupt:
            raise Interrupted(
                f"interrupted; transfer {transfer['id']} goes on in the daemon (`datamover "
                f"transfer cancel {transfer['id']}` stops it)"
            ) from None


def _no_daemon(config: Config, option: str) -> InvalidInput:
    """The error for an option that needs the daemon, with none configured."""
    return InvalidInput(f"{config.source}: {option}, but no [api] url names a daemon")


def _unreachable(config: Config, client: Any) -> TransientError:
    """The error for a daemon that must do the work and does not answer (exit 6), with the
    cause `client.reachable()` met (refused, timed out, a server error)."""
    return TransientError(
        client.unreachable_because or f"datamover daemon at {config.api_url} unreachable"
    )


def through_daemon(
    config: Config,
    request: dict[str, Any],
    wait: bool,
    as_json: bool,
    required: bool = False,
) -> dict[str, Any] | None:
    """Run `request` on the site daemon; None when no daemon is configured or reachable,
    for the caller to run it here.

    Returns the transfer's result (as the local command would print it, plus `transfer`),
    or `{"transfer": id, "state": ...}` without `wait`; a failed transfer raises its error.
    With `required` (`--daemon`), or without `wait`, an unreachable daemon is
    `TransientError` (exit 6) instead, and no daemon configured is `InvalidInput`.
    """
    if config.api_url is None:
        if required:
            raise _no_daemon(config, "--daemon")
        if not wait:
            raise _no_daemon(config, "--no-wait")
        return None
    from datamover.client import transfer_error

    with _client(config) as client:
        if not client.reachable():
            if required or not wait:
                raise _unreachable(config, client)
            return None
        # A key of its own: the submission may then be sent again if the daemon closed the
        # kept connection under it, and is never queued twice. (`os.urandom`, as `secrets`
        # uses, which takes 5 ms to import.)
        transfer = client.submit(request, key=f"cli-{os.urandom(16).hex()}")
        if not wait:
            return {"transfer": transfer["id"], "state": transfer["state"]}
        final = _follow(client, transfer, as_json)
    if final["state"] != "succeeded":
        raise transfer_error(final)
    result = {**(final.get("result") or {}), "transfer": final["id"]}
    if final.get("pin"):  # still there: a release meanwhile takes it off the transfer
        result["pin"] = final["pin"]
    return result


async def _local_tenant(config: Config, engine: Any, *, strict: bool = False) -> str | None:
    """The tenant a command run without the daemon acts for: that of the CLI's token
    (`DATAMOVER_TOKEN` or `[api] token_file`) when this site's catalog knows it, so a pin a
    prolog recorded locally, the daemon being down, is the one its epilog releases through
    the daemon. None without a token. A token that cannot be read or is not valid here is
    a warning and None (a stage does not need it), or with `strict` `Unauthorized`: for a
    release, None means every tenant's pin, which a broken token must not widen to."""
    from datamover.catalog.access import Access
    from datamover.client import load_token
    from datamover.errors import Unauthorized

    try:
        token = load_token(config)
    except InvalidInput as exc:
        if strict:
            raise Unauthorized(exc.message) from None
        log.warning("acting for no tenant: %s", exc.message)
        return None
    if token is None:
        return None
    who = await Access(engine).identify(token)
    if who is None:
        problem = "the CLI's token is not a valid token of this catalog"
        if strict:
            raise Unauthorized(problem)
        log.warning("acting for no tenant: %s", problem)
        return None
    return who.tenant


def stage_locally(config: Config, request: dict[str, Any], as_json: bool) -> dict[str, Any]:
    """Stage in this process (no daemon); record the pin in the catalog if one is asked."""
    from datamover.catalog.access import Access
    from datamover.transfer.stage import stage

    async def work(site: Any) -> dict[str, Any]:
        tenant = None
        if request.get("pin"):
            tenant = await _local_tenant(config, site.catalog.engine) or "local"
        with Bar(f"stage {request['path']}", not as_json) as bar:
            result = await stage(
                site,
                request["path"],
                version=request.get("version"),
                delete=bool(request.get("delete")),
                checksum=bool(request.get("checksum")),
                progress=bar,
                pin=(request["pin"], tenant) if tenant is not None else None,
                force=bool(request.get("force")),
                operator=True,
            )
        done = result.to_json()
        if tenant is not None:
            await Access(site.catalog.engine).add_pin(
                request["pin"], result.dataset, tenant, result.version
            )
            done["pin"] = request["pin"]
        return done

    return run_with_site(config, work)


@cli.command()
@partial(common, json_help="")  # its log lines are JSON on stderr whatever is given
def serve(config_path: str | None, as_json: bool) -> None:
    """Run the site daemon: REST API, transfer workers, metrics (until SIGTERM). It logs
    one JSON object a line on stderr."""
    import asyncio

    from datamover.daemon import serve as run_daemon
    from datamover.logs import setup_json_logging

    config = load_config(config_path)
    setup_json_logging()
    asyncio.run(run_daemon(config))


@cli.group()
def token() -> None:
    """API tokens (run on the daemon's host, against its catalog)."""


@token.command("create")
@click.option("--tenant", required=True, help="Tenant the token acts for.")
@click.option("--prefix", "prefixes", multiple=True, required=True, help="Logical prefix (repeat).")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    type=click.Choice(["read", "write", "admin"]),
    help="Scope (repeat).",
)
@click.option(
    "--expires-in",
    metavar="DURATION",
    help="Valid for this long only: minutes, hours or days, as 90m, 12h or 30d (default: "
    "until revoked).",
)
@common
def token_create(
    tenant: str,
    prefixes: tuple[str, ...],
    scopes: tuple[str, ...],
    expires_in: str | None,
    config_path: str | None,
    as_json: bool,
) -> None:
    """Create a bearer token; the secret is printed once and stored only hashed."""
    from datetime import UTC, datetime

    from datamover.catalog.access import Access
    from datamover.domain.paths import check_logical_path

    checked = ["/" if p == "/" else check_logical_path(p) for p in prefixes]
    narrow = sorted({p for p in checked if p != "/"})
    if "admin" in scopes and narrow:
        # An admin token covers every path whatever its prefixes: granting it silently
        # for every path when asked for a few is the surprise this refuses.
        raise InvalidInput(
            f"--scope admin covers every path, not only {', '.join(narrow)}: "
            "give it --prefix / alone, or a narrower --scope"
        )
    _check_tenant(tenant)
    lifetime = None if expires_in is None else _duration(expires_in, "--expires-in")
    expires_at = None if lifetime is None else datetime.now(UTC) + lifetime

    async def work(engine: Any) -> tuple[str, Any]:
        return await Access(engine).create_token(tenant, checked, list(scopes), expires_at)

    secret, who = run_with_catalog(config_path, work)
    until = None if expires_at is None else expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    info = {
        "token": secret,
        "id": who.token_id,
        "tenant": who.tenant,
        "prefixes": list(who.prefixes),
        "scopes": sorted(who.scopes),
        "expires_at": until,
    }
    if as_json:
        emit_json(info)
    else:
        click.echo(secret)
        click.echo(
            f"(token {who.token_id} for tenant {tenant}: {', '.join(sorted(who.scopes))} "
            f"on {', '.join(who.prefixes)}; {'expires ' + until if until else 'until revoked'}"
            "; shown once)",
            err=True,
        )


def _check_tenant(tenant: str) -> None:
    """`InvalidInput` unless `--tenant` is a tenant a token could have: not blank, at most
    128 characters, no control characters (`check_text`); every command taking it checks
    it so."""
    from datamover.domain.transfers import check_text

    if not tenant.strip():
        raise InvalidInput("--tenant must not be blank")
    check_text(tenant, "--tenant", 128)


#: Units `--expires-in` takes, in seconds.
_UNITS = {"m": 60, "h": 3600, "d": 86400}
#: The longest lifetime a token may be given (ten years).
_MAX_LIFETIME = 3650 * 86400


def _duration(text: str, what: str) -> Any:
    """`text` (a positive whole number of minutes, hours or days: `90m`, `12h`, `30d`) as a
    `timedelta`, at most ten years, else `InvalidInput` naming `what`."""
    from datetime import timedelta

    value = text.strip()
    number, unit = value[:-1], value[-1:].lower()
    text = text if len(text) <= 20 else text[:20] + "..."  # as it is shown
    if unit not in _UNITS or not (number.isascii() and number.isdigit()) or not number.strip("0"):
        raise InvalidInput(
            f"{what} {text!r}: give a whole number of minutes, hours or days, as 90m, 12h or 30d"
        )
    if len(number.lstrip("0")) > 8 or int(number) * _UNITS[unit] > _MAX_LIFETIME:
        raise InvalidInput(f"{what} {text!r} is more than ten years")
    return timedelta(seconds=int(number) * _UNITS[unit])


@token.command("list")
@click.option("--tenant", metavar="TENANT", help="Only this tenant's tokens.")
@click.option("--all", "everyone", is_flag=True, help="Revoked and expired tokens too.")
@common
def token_list(tenant: str | None, everyone: bool, config_path: str | None, as_json: bool) -> None:
    """List the tokens still valid (id, tenant, scopes, prefixes, expiry), oldest first, for
    `datamover token revoke ID`. Secrets are never shown: the catalog holds them hashed."""
    import dataclasses
    from datetime import UTC, datetime

    from datamover.catalog.access import Access

    if tenant is not None:
        _check_tenant(tenant)

    async def work(engine: Any) -> list[Any]:
        return await Access(engine).tokens(tenant, everyone)

    found = run_with_catalog(config_path, work)
    if as_json:
        emit_json({"tokens": [dataclasses.asdict(t) for t in found]})
        return
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for t in found:
        if t.revoked_at:
            state = f"revoked {t.revoked_at}"
        elif t.expires_at:
            state = f"{'expired' if t.expires_at <= now else 'expires'} {t.expires_at}"
        else:
            state = "until revoked"
        click.echo(
            f"{t.id}  tenant {t.tenant}  {','.join(t.scopes)} on {','.join(t.prefixes)}  "
            f"created {t.created_at}  {state}"
        )
    if not found:
        click.echo("no tokens", err=True)


@token.command("revoke")
@click.argument("token_id")
@common
def token_revoke(token_id: str, config_path: str | None, as_json: bool) -> None:
    """Revoke a token by its id."""
    from datamover.catalog.access import Access
    from datamover.errors import NotFound

    async def work(engine: Any) -> bool:
        return await Access(engine).revoke_token(token_id)

    if not run_with_catalog(config_path, work):
        raise NotFound(f"no active token {token_id!r}")
    if as_json:
        emit_json({"revoked": token_id})
    else:
        click.echo(f"revoked {token_id}")


@cli.group()
def transfer() -> None:
    """Transfers on the site daemon."""


def _call(config_path: str | None, method: str, path: str, **kw: Any) -> Any:
    with _client(load_config(config_path)) as client:
        return client.call(method, path, **kw)


def _describe(t: dict[str, Any]) -> str:
    total = t.get("bytes_total")
    progress = f"{human_bytes(t['bytes_done'])}" + (f"/{human_bytes(total)}" if total else "")
    line = f"{t['id']}  {t['state']:<9} {t['kind']:<5} {t['path']}  {progress}"
    if t.get("error"):
        line += f"  ({t['error']['code']}: {t['error']['message']})"
    return line


@transfer.command("submit")
@click.argument("kind", type=click.Choice(["push", "stage"]))
@click.argument("logical_path")
@click.option("--version", "version", metavar="ID")
@click.option(
    "--priority",
    type=click.Choice(["job", "interactive", "bulk"]),
    default="interactive",
    show_default=True,
)
@click.option("--deadline", metavar="TIME", help="RFC 3339; without an offset, local time")
@click.option("--pin", metavar="ID")
@click.option("--delete", is_flag=True)
@click.option("--checksum", is_flag=True)
@click.option(
    "--idempotency-key", metavar="KEY", help="Makes a retried submit return the same transfer."
)
@common
def transfer_submit(
    kind: str,
    logical_path: str,
    version: str | None,
    priority: str,
    deadline: str | None,
    pin: str | None,
    delete: bool,
    checksum: bool,
    idempotency_key: str | None,
    config_path: str | None,
    as_json: bool,
) -> None:
    """Queue a push or stage on the daemon; print the transfer."""
    from datamover.client import TRANSFER
    from datamover.domain.transfers import check_idempotency_key, check_text, with_offset

    if pin is not None:
        check_text(pin, "--pin")
    if deadline is not None:
        deadline = with_offset(deadline, "--deadline")
    if idempotency_key is not None:
        check_idempotency_key(idempotency_key)
    body: dict[str, Any] = {"kind": kind, "path": logical_path, "priority": priority}
    for key, value in (("version", version), ("deadline", deadline), ("pin", pin)):
        if value is not None:
            body[key] = value
    for key, on in (("delete", delete), ("checksum", checksum)):
        if on:
            body[key] = True
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    t = _call(config_path, "POST", "/v1/transfers", body=body, headers=headers, expect=TRANSFER)
    emit_json(t) if as_json else click.echo(_describe(t))


@transfer.command("list")
@click.option(
    "--state", type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"])
)
@click.option("--kind", type=click.Choice(["push", "stage"]))
@click.option("--prefix", metavar="PATH")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--after", metavar="ID", help="Start after this transfer (a page's last).")
@click.option("--newest", is_flag=True, help="Newest first (default: oldest, queue order).")
@common
def transfer_list(
    state: str | None,
    kind: str | None,
    prefix: str | None,
    limit: int,
    after: str | None,
    newest: bool,
    config_path: str | None,
    as_json: bool,
) -> None:
    """List transfers, oldest first (`--newest`: newest first), a page at a time (`--after`
    the last one shown)."""
    if prefix is not None and prefix != "/":  # as the daemon checks it, before it is sent:
        from datamover.domain.paths import check_logical_path  # a long one was cut at 8 KiB

        check_logical_path(prefix)
    params = {k: v for k, v in (("state", state), ("kind", kind), ("prefix", prefix)) if v}
    params["limit"] = str(limit)
    if after is not None:
        params["after"] = after
    if newest:
        params["order"] = "newest"
    page = _call(config_path, "GET", "/v1/transfers", params=params, expect=("transfers",))
    if as_json:
        emit_json(page)
        return
    for t in page["transfers"]:
        click.echo(_describe(t))
    if page.get("next"):  # the list had been cut at --limit without a word
        import shlex

        # The same filters again: the next page of what was asked, not of every transfer.
        words = ["datamover", "transfer", "list"]
        for option, value in (("--state", state), ("--kind", kind), ("--prefix", prefix)):
            if value:
                words += [option, value]
        if limit != 100:
            words += ["--limit", str(limit)]
        if newest:
            words.append("--newest")
        if config_path:
            words += ["--config", config_path]
        words += ["--after", page["next"]]
        click.echo(f"more: {shlex.join(words)}", err=True)


@transfer.command("show")
@click.argument("transfer_id")
@common
def transfer_show(transfer_id: str, config_path: str | None, as_json: bool) -> None:
    """Show one transfer."""
    from datamover.client import TRANSFER, segment

    t = _call(config_path, "GET", f"/v1/transfers/{segment(transfer_id)}", expect=TRANSFER)
    emit_json(t) if as_json else click.echo(_describe(t))


@transfer.command("cancel")
@click.argument("transfer_id")
@common
def transfer_cancel(transfer_id: str, config_path: str | None, as_json: bool) -> None:
    """Cancel a transfer."""
    from datamover.client import TRANSFER, segment

    t = _call(config_path, "DELETE", f"/v1/transfers/{segment(transfer_id)}", expect=TRANSFER)
    emit_json(t) if as_json else click.echo(_describe(t))


@transfer.command("watch")
@click.argument("transfer_id")
@common
def transfer_watch(transfer_id: str, config_path: str | None, as_json: bool) -> None:
    """Follow a transfer with a progress bar; exit 0 only if it succeeds."""
    from datamover.client import transfer_error

    with _client(load_config(config_path)) as client:
        final = _follow(client, client.get(transfer_id), as_json)
    emit_json(final) if as_json else click.echo(_describe(final))
    if final["state"] != "succeeded":
        exc = transfer_error(final)
        if not as_json:
            click.echo(f"datamover: error: {exc.message}", err=True)
        sys.exit(exc.exit_code)


async def _check_local_tenant(config: Config, engine: Any, tenant: str) -> None:
    """Allow `release --tenant TENANT` without the daemon only as the API would: a CLI token
    must be valid in this catalog and be an admin token or one of `tenant`. Without a token
    (an operator on the daemon's host, who may drop the pin of every tenant) it is allowed."""
    from datamover.catalog.access import Access
    from datamover.client import load_token
    from datamover.errors import Forbidden, Unauthorized

    token = load_token(config)
    if token is None:
        return
    who = await Access(engine).identify(token)
    if who is None:
        raise Unauthorized("--tenant: the CLI's token is not a valid token of this catalog")
    if who.tenant != tenant and not who.allows("admin"):
        raise Forbidden("only an admin token may release another tenant's pin")


@cli.command()
@click.option("--pin", required=True, metavar="ID", help="The pin to release (a job id).")
@click.option(
    "--tenant",
    metavar="TENANT",
    help="Whose pin (default: the token's tenant); another tenant's needs an admin token.",
)
@click.option("--local", is_flag=True, help="Release in this site's catalog, not via the daemon.")
@click.option(
    "--daemon",
    "daemon_only",
    is_flag=True,
    help="Only through the site daemon: if it does not answer, exit 6 (try again later).",
)
@common
def release(
    pin: str,
    tenant: str | None,
    local: bool,
    daemon_only: bool,
    config_path: str | None,
    as_json: bool,
) -> None:
    """Release every replica held by a pin (the Slurm epilog half of the hook pair)."""
    from datamover.client import segment
    from datamover.domain.transfers import check_text

    check_text(pin, "--pin")
    if tenant is not None:  # blank would mean "mine" to the API
        _check_tenant(tenant)
    if local and daemon_only:
        raise click.UsageError("--local releases here and --daemon only through the daemon")
    config = load_config(config_path)
    released = None
    if daemon_only and config.api_url is None:
        raise _no_daemon(config, "--daemon")
    if not local and config.api_url is not None:
        with _client(config) as client:
            up = client.reachable()
            if not up and daemon_only:
                raise _unreachable(config, client)
            if up:
                params = {"tenant": tenant} if tenant is not None else None
                answer = client.call(
                    "DELETE", f"/v1/pins/{segment(pin)}", params=params, expect=("released",)
                )
                released = int(answer["released"])
    if released is None:
        from datamover.catalog.access import Access

        async def work(engine: Any) -> int:
            if tenant is None:
                owner = await _local_tenant(config, engine, strict=True)
            else:
                await _check_local_tenant(config, engine, tenant)
                owner = tenant
            return await Access(engine).release(pin, owner)

        released = run_with_catalog(config, work)
    if as_json:
        emit_json({"pin": pin, "released": released})
    else:
        click.echo(f"released {counted(released, 'replica')} held by {pin}")


@cli.command()
@click.argument("prefix", default="/", metavar="[PREFIX]")
@click.option("--tenant", metavar="TENANT", help="Only this tenant's pins.")
@common
def pins(prefix: str, tenant: str | None, config_path: str | None, as_json: bool) -> None:
    """List the pins held in this site's catalog on datasets under PREFIX: which job (pin
    id) of which tenant holds which dataset at which version, for `datamover release --pin
    ID --tenant TENANT`. Read from the catalog here (its operator's view: every tenant's)."""
    import dataclasses

    from datamover.catalog.access import Access
    from datamover.domain.paths import check_logical_path, is_under

    prefix = "/" if prefix == "/" else check_logical_path(prefix)
    if tenant is not None:  # a typo is named, not answered with an empty list
        _check_tenant(tenant)
    config = load_config(config_path)

    async def work(engine: Any) -> list[Any]:
        found = await Access(engine).pins(tenant=tenant)
        return [p for p in found if is_under(p.dataset, prefix)]

    held = run_with_catalog(config, work)
    if as_json:
        emit_json({"prefix": prefix, "pins": [dataclasses.asdict(p) for p in held]})
        return
    for p in held:
        click.echo(
            f"{p.pin}  {p.dataset}  tenant {p.tenant}  version {p.version or '(as staged)'}  "
            f"since {p.created_at}"
        )
    if not held:
        click.echo(f"no pins under {prefix}", err=True)
