"""A queued stage that another stage has already done: answered without walking the tree.

A job array's prologs ask the site daemon to stage the same dataset hundreds of times within
seconds. Transfers on one tree run one at a time, and a stage that finds nothing to do still
walks the whole tree (20,000 files: 0.5 s; a million: half a minute), so the last job would
wait for hundreds of walks. Instead, when a stage transfer X starts, it is already done if

- it asks for nothing beyond a plain stage (no `--delete`, no `--checksum`: a stage with
  either must look at every file itself);
- another stage transfer L of the same path succeeded, and *finished after X was submitted*
  (both times on the catalog's clock);
- L brought the tree to the version X asks for now: the `--version` given, or the latest
  version resolved when X starts, so a push published since L does not go unstaged;
- and the site's replica record still says that version is complete at the path this site
  maps the dataset to (no stage since then failed there or brought another version), where
  the dataset's directory still is.

Then the tree held X's version after X was asked for, which is what X promises its caller
(and what a stage run then would have found); X succeeds at once with L's counts, nothing
fetched, and `satisfied_by` naming L (when X and L are of one tenant: another tenant's ids
are not shown); its pin is taken as for any stage. What a user changed in the tree after L
ended is not repaired, as it would not be after a stage that just ended.

Such stages are answered together: when L succeeds, its worker answers every queued stage
it satisfies in one transaction (`answer_waiting`, `Transfers.answer_stages`), up to the
first transfer in queue order over the tree that is not one (a push, a `--delete` stage),
which then runs as usual. Answered one claim at a time instead, each took 60-85 ms on
SQLite, in turn, so the 1,000th prolog of a job array would wait over a minute.
A stage claimed before that (by another worker) is checked on its own (`already_staged`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from datamover.catalog.access import Access
from datamover.catalog.transfer_rows import TransferRow
from datamover.catalog.transfers import Transfers
from datamover.repo.layout import VersionDoc
from datamover.site import Site
from datamover.transfer.stage import StageResult

log = logging.getLogger(__name__)


async def already_staged(
    site: Site, transfers: Transfers, row: TransferRow
) -> dict[str, Any] | None:
    """The result of stage transfer `row` if a stage since it was submitted did its work
    (see the module docstring), else None (run it)."""
    started = time.monotonic()
    if row.options.get("delete") or row.options.get("checksum"):
        return None
    done = await transfers.stage_ended_since_asked(row)
    if done is None or not done.result:
        return None
    if not await _tree_holds(site, row.path, done.result.get("version")):
        return None
    doc = await site.repo.resolve(row.path, row.version)
    if doc.version != done.result.get("version"):
        return None
    seconds = round(time.monotonic() - started, 3)
    log.info("%s is already staged by %s, which ended after it was asked for", row.path, done.id)
    result = StageResult.of(doc, kept_files=doc.files, seconds=seconds).to_json()
    # Another tenant's transfer id is not shown (it answers 404 there: ids do not leak).
    return {**result, "satisfied_by": done.id} if done.tenant == row.tenant else result


async def answer_waiting(
    site: Site, transfers: Transfers, access: Access, done: TransferRow
) -> list[TransferRow]:
    """Answer the queued stages that `done`, a stage transfer that just succeeded, has
    already done (see the module docstring); return them. Nothing when the tree no longer
    holds its version."""
    started = time.monotonic()
    version = (done.result or {}).get("version")
    if not isinstance(version, str) or not await transfers.stage_queued(done.path):
        return []
    if not await _tree_holds(site, done.path, version):
        return []
    latest = await site.repo.resolve(done.path, None)
    doc: VersionDoc = latest
    if latest.version != version:
        doc = await site.repo.resolve(done.path, version)
    answered: list[TransferRow] = []
    while True:
        seconds = round(time.monotonic() - started, 3)
        result = StageResult.of(doc, kept_files=doc.files, seconds=seconds)
        batch = await transfers.answer_stages(
            done,
            version,
            latest.version == version,
            result.to_json(),
            pin=lambda ids: access.pins_for_transfers(ids, done.path, version),
        )
        answered += batch
        # Until one comes back empty: a batch can be short and still have more behind it
        # (a stage cancelled or claimed while it was answered).
        if not batch:
            return answered


async def _tree_holds(site: Site, dataset: str, version: object) -> bool:
    """True when this site's replica record says `version` of `dataset` is complete at the
    path the site maps it to, and that directory is there."""
    replica = await site.catalog.replica(dataset)
    root = site.config.namespace.resolve(dataset)
    return (
        replica is not None
        and replica.state == "ready"
        and replica.root == str(root)
        and replica.version == version
        and await asyncio.to_thread(root.is_dir)  # removed since: a stage puts it back
    )
