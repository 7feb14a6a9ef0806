"""Route handlers. Each parses its input, checks scope and path, calls the catalog or the
repository, and returns JSON; errors are raised and mapped in `api.errors`."""

from __future__ import annotations

import asyncio
import bisect
import json
from contextlib import aclosing
from dataclasses import asdict
from importlib import resources
from typing import Any

from aiohttp import web

from datamover.api.context import context, identity, reidentify, require
from datamover.api.validate import (
    check_query,
    choice,
    flag,
    json_body,
    logical_path,
    path_text,
    query_choice,
    query_int,
    query_seconds,
    query_text,
    query_transfer_id,
    string,
    timestamp,
    version,
)
from datamover.catalog.access import Identity
from datamover.catalog.transfer_rows import KeyReused, Submission, TransferRow
from datamover.datasets import iter_datasets
from datamover.domain.ids import check_version_id
from datamover.domain.paths import check_logical_path, is_under
from datamover.domain.transfers import TERMINAL, check_idempotency_key
from datamover.errors import Conflict, DatamoverError, Forbidden, InvalidInput, NotFound
from datamover.metrics import CONTENT_TYPE
from datamover.repo.layout import VersionDoc, check_key_length
from datamover.scheduler.endings import RECHECK, until
from datamover.storage.retry import RetryingStore

_OPENAPI = json.loads(resources.files("datamover.api").joinpath("openapi.json").read_text())
_TRANSFER_FIELDS = {
    "kind",
    "path",
    "version",
    "priority",
    "deadline",
    "pin",
    "delete",
    "checksum",
    "force",
}
_PAGE = frozenset({"prefix", "after", "limit"})  # the query of a listing by dataset
_LIST_TRANSFERS = _PAGE | {"state", "kind", "order"}
_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
MAX_WAIT = 60.0  # longest long poll; clients' own time-outs must be longer


def _json(data: object, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


# -- open routes --------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    """The process answers, naming its site (a client configured for another site's daemon
    learns it here: `DaemonClient.reachable`)."""
    return _json({"status": "ok", "site": context(request).site.name})


#: Seconds each readiness check may take: a probe has a timeout of its own (Kubernetes':
#: 1 s by default), and an answer after it is lost anyway.
PROBE_SECONDS = 2.0


async def readyz(request: web.Request) -> web.Response:
    """Catalog and store reachable: 200, else 503 naming what failed. Each is tried once,
    for at most `PROBE_SECONDS`: the store without its retries, which took a probe of a
    store that was down 1-2 s and logged four warnings each time (anyone may probe)."""
    ctx = context(request)
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(PROBE_SECONDS):
            await ctx.transfers.depth()
        checks["catalog"] = "ok"
    except TimeoutError:
        checks["catalog"] = f"error: no answer within {PROBE_SECONDS:g} s"
    except Exception as exc:
        checks["catalog"] = f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    store = ctx.site.store
    while isinstance(store, RetryingStore):
        store = store.inner
    try:
        async with asyncio.timeout(PROBE_SECONDS):
            await store.check()
        checks["store"] = "ok"
    except TimeoutError:
        checks["store"] = f"error: no answer within {PROBE_SECONDS:g} s"
    except DatamoverError as exc:
        checks["store"] = f"error: {exc.message}"
    ok = all(v == "ok" for v in checks.values())
    return _json({"status": "ready" if ok else "not ready", "checks": checks}, 200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition."""
    body = context(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI document."""
    return _json(_OPENAPI)


# -- transfers ----------------------------------------------------------------------------


def _may_see(who: Identity, row: TransferRow) -> bool:
    """A token sees its tenant's transfers under its prefixes (an admin token: every one)."""
    return who.allows("admin") or (row.tenant == who.tenant and who.covers(row.path))


def _visible(request: web.Request, row: TransferRow) -> TransferRow:
    if not _may_see(identity(request), row):
        raise NotFound(f"no transfer {row.id!r}")  # do not reveal other tenants' work
    return row


async def submit_transfer(request: web.Request) -> web.Response:
    """POST /v1/transfers."""
    check_query(request)
    ctx = context(request)
    body = await json_body(request, _TRANSFER_FIELDS, {"kind", "path"})
    kind = choice(body, "kind", ("push", "stage"))
    path = logical_path(body.get("path"))
    who = require(request, "write", path)
    ctx.site.config.namespace.resolve(path)  # a path this site cannot map is a bad request
    if kind == "push":
        check_key_length(path, ctx.site.name)  # it could never publish: not queued to fail
    pin = string(body, "pin", optional=True, max_len=200)
    requested = version(body.get("version"))
    if kind == "push" and (requested or pin or body.get("delete")):
        raise InvalidInput("'version', 'pin' and 'delete' apply to stage transfers only")
    options: dict[str, Any] = {k: True for k in ("delete", "checksum", "force") if flag(body, k)}
    if kind == "stage" and options.get("force") and not who.allows("admin"):
        # Over its own tenant's pins only: a token that may not release another tenant's
        # pin may not change the files under that tenant's jobs either.
        options["force"] = "tenant"
    keys = request.headers.getall("Idempotency-Key", [])
    if len(keys) > 1:  # as a repeated query parameter: which one was meant is not known
        raise InvalidInput("Idempotency-Key given more than once")
    key = keys[0] if keys else None
    if key is not None:
        check_idempotency_key(key)
    submission = Submission(
        tenant=who.tenant,
        kind=kind,
        path=path,
        version=requested,
        priority=choice(body, "priority", ("job", "interactive", "bulk"), "interactive"),
        deadline=timestamp(body.get("deadline"), "deadline"),
        pin=pin,
        options=options,
        idempotency_key=key,
    )
    try:
        row, created = await ctx.transfers.submit(submission)
    except KeyReused as exc:
        if exc.existing is not None and _may_see(who, exc.existing):
            raise Conflict(f"{exc.message} (transfer {exc.existing.id})") from None
        raise  # the key's transfer lies outside the token's prefixes: its id is not told
    if created and ctx.wake is not None:
        ctx.wake.ring()
    return _json(row.to_json(), 201 if created else 200)


async def list_transfers(request: web.Request) -> web.Response:
    """GET /v1/transfers?state=&kind=&prefix=&order=&after=&limit=: a page of the transfers
    the caller may see, oldest first (`order=newest`: newest first), and `next`, the cursor
    to pass as `after` for the following page in the same order."""
    check_query(request, _LIST_TRANSFERS)
    ctx = context(request)
    who = require(request, "read")
    prefix = query_text(request, "prefix")
    if prefix is not None and prefix != "/":
        prefix = check_logical_path(prefix)
    limit = query_int(request, "limit", 100, 1, 1000)
    admin = who.allows("admin")
    rows = await ctx.transfers.list(
        tenant=None if admin else who.tenant,
        prefixes=None if admin else list(who.prefixes),
        state=query_choice(request, "state", _STATES),
        kind=query_choice(request, "kind", ("push", "stage")),
        path_prefix=prefix,
        after=query_transfer_id(request, "after"),
        limit=limit,
        newest=query_choice(request, "order", ("oldest", "newest")) == "newest",
    )
    next_cursor = rows[-1].id if len(rows) == limit else None
    return _json({"transfers": [r.to_json() for r in rows], "next": next_cursor})


async def get_transfer(request: web.Request) -> web.Response:
    """GET /v1/transfers/{id}[?wait=S]: with `wait`, answer once the transfer is terminal or
    `S` seconds have passed, whichever comes first (a long poll; see `scheduler.endings`)."""
    check_query(request, frozenset({"wait"}))
    require(request, "read")
    ctx = context(request)
    transfer_id = path_text(request, "id")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + query_seconds(request, "wait", MAX_WAIT)
    waited = False
    while True:
        with ctx.endings.watch(transfer_id) as ended:
            row = _visible(request, await ctx.transfers.get(transfer_id))
            left = deadline - loop.time()
            if row.state in TERMINAL or left <= 0 or ctx.endings.closed or _gone(request):
                if waited:  # the token was checked when the request came, maybe a minute ago
                    await reidentify(request)
                return _json(row.to_json())
            await until(ended, min(left, RECHECK))
            waited = True


def _gone(request: web.Request) -> bool:
    """The client closed its connection. aiohttp does not cancel a handler then, so a long
    poll checks, and stops re-reading the transfer for no one (its answer goes nowhere)."""
    return request.transport is None or request.transport.is_closing()


async def cancel_transfer(request: web.Request) -> web.Response:
    """DELETE /v1/transfers/{id}."""
    check_query(request)
    ctx = context(request)
    row = _visible(request, await ctx.transfers.get(path_text(request, "id")))
    require(request, "write", row.path)
    cancelled, ended_now = await ctx.transfers.cancel(row.id)
    ctx.endings.ended(row.id)
    if ended_now:
        ctx.metrics.finished(row.kind, "cancelled", 0, {})  # no worker will count this one
    return _json(cancelled.to_json())


# -- datasets, replicas, pins -------------------------------------------------------------


async def list_datasets(request: web.Request) -> web.Response:
    """GET /v1/datasets?prefix=&after=&limit=: a page of at most `limit` datasets the caller
    may read, and `next`, the cursor to pass as `after` for the following page."""
    check_query(request, _PAGE)
    ctx = context(request)
    who = require(request, "read")
    raw = query_text(request, "prefix") or "/"
    prefix = "/" if raw == "/" else check_logical_path(raw)
    after = query_text(request, "after")
    limit = query_int(request, "limit", 1000, 1, 10_000)
    datasets: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    next_cursor: str | None = None
    readable = _readable_prefix(who, prefix)
    if readable is None:
        return _json({"datasets": datasets, "errors": errors, "next": next_cursor})
    async with aclosing(iter_datasets(ctx.site, readable, after)) as listing:
        async for info in listing:
            if not (who.allows("admin") or who.covers(info.path)):
                continue
            errors.extend(b.to_json() for b in info.bad)
            if info.versions:
                datasets.append(
                    {
                        "path": info.path,
                        "versions": len(info.versions),
                        "latest": asdict(info.versions[-1]),
                    }
                )
                if len(datasets) == limit:
                    next_cursor = info.cursor
                    break
    return _json({"datasets": datasets, "errors": errors, "next": next_cursor})


def _readable_prefix(who: Identity, prefix: str) -> str | None:
    """The narrowest prefix whose listing holds every dataset under `prefix` that `who`
    may read: `prefix` itself when `who` reads all of it, the one prefix of `who`'s below
    it, the deepest directory holding several (`/proj` for `/proj/a` and `/proj/b`), or
    None when `who` reads nothing there. A tenant's token listing `/` does not walk every
    other tenant's datasets (only those between its prefixes, when it has several)."""
    if who.allows("admin"):
        return prefix
    readable = _narrowed(prefix, list(who.prefixes))
    if not readable:
        return None
    parts = [r.strip("/").split("/") for r in readable]
    common = []
    for names in zip(*parts, strict=False):
        if any(n != names[0] for n in names):
            break
        common.append(names[0])
    return "/" + "/".join(common)


async def list_versions(request: web.Request) -> web.Response:
    """GET /v1/datasets/{path}/versions?after=&limit=: a page of at most `limit` of the
    dataset's versions, oldest first, after version `after`; `next` is the last version of
    a full page, to pass as `after`, else null. `errors` holds the unreadable versions of
    the page's span. 404 when the dataset has no version at all (whatever `after` says).

    The page bounds the answer, not the work: the dataset's whole listing is still read
    (its documents from the catalog's cache), as `iter_datasets` starts at a dataset."""
    check_query(request, frozenset({"after", "limit"}))
    ctx = context(request)
    path = logical_path("/" + request.match_info["path"].strip("/"), "path")
    require(request, "read", path)
    after = request.query.get("after") or None  # empty counts as absent, as elsewhere
    if after is not None:
        try:
            check_version_id(after)
        except InvalidInput as exc:
            raise InvalidInput(
                f"query parameter 'after' must be a version id, as 'next' gives it: {exc}"
            ) from None
    limit = query_int(request, "limit", 1000, 1, 10_000)
    found = None
    async for info in iter_datasets(ctx.site, path, only=True):
        # Only `path`'s own keys are listed (its nested datasets' versions, maybe thousands,
        # are neither listed nor read), but it may come twice (a long path's versions under
        # both spellings of its key, docs/format.md "Keys"): one answer.
        if found is None:
            found = info
        else:
            found.merge(info)
    if found is None:
        raise NotFound(f"dataset {path!r} has no published version")
    if not found.versions:
        raise found.bad[0].error
    first = 0 if after is None else bisect.bisect_right(found.versions, after, key=_version_id)
    page = found.versions[first : first + limit]
    next_cursor = page[-1].version if len(page) == limit else None
    return _json(
        {
            "path": path,
            "versions": [asdict(v) for v in page],
            "errors": [
                b.to_json()
                for b in found.bad
                if (after is None or b.version > after)
                and (next_cursor is None or b.version <= next_cursor)
            ],
            "next": next_cursor,
        }
    )


def _version_id(doc: VersionDoc) -> str:
    return doc.version


async def list_replicas(request: web.Request) -> web.Response:
    """GET /v1/replicas?prefix=&after=&limit=: a page of at most `limit` of the datasets
    materialised here that the caller may read, by dataset, with the pins of the caller's
    tenant (every pin for an admin): pins name other tenants' jobs. A pin id is a tenant's,
    so `pins_by_tenant` says whose each is (the same id of two tenants is two pins). `next`
    is the last dataset of a full page, to pass as `after`."""
    check_query(request, _PAGE)
    ctx = context(request)
    who = require(request, "read")
    admin = who.allows("admin")
    prefix = query_text(request, "prefix")
    after = query_text(request, "after")
    if after is not None:
        try:
            after = check_logical_path(after)
        except InvalidInput as exc:
            raise InvalidInput(
                f"query parameter 'after' must be a dataset path, as 'next' gives it: {exc}"
            ) from None
    limit = query_int(request, "limit", 1000, 1, 10_000)
    scopes = [] if admin else list(who.prefixes)
    if prefix is not None and prefix != "/":
        prefix = check_logical_path(prefix)
        # Under `prefix` and under one of the token's: the deeper of each pair that nests.
        scopes = [prefix] if admin else _narrowed(prefix, scopes)
    rows = await ctx.site.catalog.replicas(
        prefixes=None if admin and not scopes else scopes, after=after, limit=limit
    )
    pins: dict[str, list[str]] = {}
    by_tenant: dict[str, dict[str, list[str]]] = {}
    if rows:
        held = await ctx.access.pins(
            tenant=None if admin else who.tenant, datasets=[r.dataset for r in rows]
        )
        for p in held:
            pins.setdefault(p.dataset, []).append(p.pin)
            by_tenant.setdefault(p.dataset, {}).setdefault(p.tenant, []).append(p.pin)
    replicas = [
        {
            "dataset": r.dataset,
            "root": r.root,
            "version": r.version,
            "base_version": r.base_version,
            "state": r.state,
            "files": r.files,
            "bytes": r.bytes,
            "pins": pins.get(r.dataset, []),
            "pins_by_tenant": by_tenant.get(r.dataset, {}),
        }
        for r in rows
    ]
    next_cursor = rows[-1].dataset if len(rows) == limit else None
    return _json({"replicas": replicas, "next": next_cursor})


def _narrowed(prefix: str, scopes: list[str]) -> list[str]:
    """The prefixes under both `prefix` and one of `scopes`: for each scope nesting with
    `prefix`, the deeper of the two."""
    out: list[str] = []
    for scope in scopes:
        if is_under(prefix, scope):
            out.append(prefix)
        elif is_under(scope, prefix):
            out.append(scope)
    return sorted(set(out))


async def add_pin(request: web.Request) -> web.Response:
    """POST /v1/pins: pin `path` (at `version`, which must be one the store holds: else
    404) for the caller's tenant."""
    check_query(request)
    ctx = context(request)
    body = await json_body(request, {"pin", "path", "version"}, {"pin", "path"})
    path = logical_path(body.get("path"))
    who = require(request, "write", path)
    ctx.site.config.namespace.resolve(path)  # as for a transfer: a path this site cannot map
    pin = string(body, "pin", max_len=200)
    assert pin is not None
    pinned = version(body.get("version"))
    if pinned is not None:
        # A version the store does not have would hold a stage of every other tenant "at a
        # version another tenant's pin holds" for nothing: 404 naming it (one small read).
        await ctx.site.repo.read_version(path, pinned)
    row = await ctx.access.add_pin(pin, path, who.tenant, pinned)
    return _json(row.__dict__, 201)


async def release_pin(request: web.Request) -> web.Response:
    """DELETE /v1/pins/{pin}[?tenant=T]: release the datasets the caller's tenant holds by
    this pin under the caller's prefixes (every one for an admin, which may name another
    tenant: pin ids are the clients', so one id may be several tenants' pins)."""
    check_query(request, frozenset({"tenant"}))
    ctx = context(request)
    who = require(request, "write")
    pin = path_text(request, "pin")
    if request.query.get("tenant") == "":  # not "mine": a name that went missing on the way
        raise InvalidInput("query parameter 'tenant' is empty; leave it out for your own")
    tenant = query_text(request, "tenant", 128) or who.tenant
    if who.allows("admin"):
        released = await ctx.access.release(pin, tenant)
        return _json({"pin": pin, "released": released})
    if tenant != who.tenant:
        raise Forbidden("only an admin token may release another tenant's pin")
    # other tenants' pins are not there for this token (a 403 would tell they exist)
    held = await ctx.access.pins(pin=pin, tenant=who.tenant)
    if held and not any(who.covers(p.dataset) for p in held):
        raise Forbidden(f"pin {pin!r} holds no dataset this token may release")
    released = await ctx.access.release(pin, who.tenant, who.prefixes)
    return _json({"pin": pin, "released": released})
