"""Benchmark the site daemon (`datamover serve`) on one local SeaweedFS: what a stage costs
when submitted over REST rather than run by the CLI in-process, and how many transfers per
second the queue completes on SQLite and PostgreSQL catalogs.

    python bench/daemon.py [--repeat N] [--transfers 1000] [--markdown FILE] [--json FILE]
                           [--workdir DIR]

Prints an API-overhead table, a queue-throughput table and PASS/FAIL per target (see
bench/README.md, "The daemon benchmark"). Daemon logs are kept under the work directory.
Exit status: 0 when every target passes, 1 when one fails, 2 when the store cannot start.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import random
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
from harness import FULL, QUICK, Bench, log, remove_tree, run_parts
from measure import Sample, run_measured
from report import TARGET_COLUMNS, markdown_table, raw_json, target_rows, text_table
from results import Step, Target
from s3admin import S3Target
from serving import (
    TERMINAL,
    BenchError,
    Postgres,
    RestClient,
    RestError,
    ServeProcess,
    client_session,
    create_catalog,
    create_token,
    daemon_config,
    epoch,
    free_listens,
)
from tools import SiteFiles
from treegen import pdbqt_body, tree_stats
from workloads import small_tree

from datamover.config import ApiSettings

DEFAULT_WORKDIR = Path(__file__).resolve().parent / "work"
DEFAULT_WORKERS = ApiSettings().workers
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432"

API, STAGE = "api", "stage small tree"
DIRECT, REST = "direct: stage --local", "REST: POST, poll"
HOOK, TARX = "CLI via the daemon: stage --wait", "tar -x"
BURST_SIZE = 50
BURST = f"burst: {BURST_SIZE} stages at once over REST"
TAR_GOAL = 2.0  # the data-plane target "stage within 2x of tar -x", on the deployed path
LOGICAL = "/bench/small"
STAGE_POLL = 0.05  # seconds between GETs while a REST stage runs
STAGE_TIMEOUT = 1800.0
OVERHEAD_GOAL = 1.10  # REST stage at most 10% longer than the direct CLI stage

QUEUE_PREFIX = "/bench/q"
TINY_SIZE = 4096
QUEUE_POLL = 1.0  # seconds between listings while the queue drains (each lists every row)


@dataclass(frozen=True)
class QueueConfig:
    """One way of running the queue: catalog backend, serve processes, workers each."""

    catalog: str  # "sqlite" or "postgresql"
    processes: int
    workers: int

    @property
    def label(self) -> str:
        """For tables: `postgresql, 2 serve x 2 workers`."""
        default = " (default)" if self.workers == DEFAULT_WORKERS else ""
        return f"{self.processes} serve x {self.workers} workers{default}"

    @property
    def slug(self) -> str:
        """For file and database names."""
        return f"{self.catalog}-p{self.processes}-w{self.workers}"


@dataclass
class QueueRun:
    """One queue run: `transfers` pushes submitted at once, waited for, counted."""

    config: QueueConfig
    rep: int
    transfers: int
    submitted: int = 0
    submit_errors: list[str] = field(default_factory=list)
    submit_seconds: float | None = None  # first POST to last answer
    complete_seconds: float | None = None  # first POST to the last finished_at
    observed_seconds: float | None = None  # first POST to the listing that showed all done
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    unfinished: int = 0
    push_seconds: list[float] = field(default_factory=list)  # started_at -> finished_at
    failure_messages: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the run itself broke
    log_paths: list[str] = field(default_factory=list)
    log_summary: str = ""

    @property
    def rate(self) -> float | None:
        """Transfers per second, first submit to last completion (None unless all ended)."""
        if self.errors or self.unfinished or not self.complete_seconds or not self.submitted:
            return None
        return self.submitted / self.complete_seconds

    @property
    def failures(self) -> int | None:
        """Failed, cancelled or refused transfers (None when the run did not finish)."""
        if self.errors or self.unfinished or not self.submitted:
            return None
        return self.failed + self.cancelled + len(self.submit_errors)

    def why_missing(self) -> str:
        """Why there is no measurement."""
        if self.errors:
            return self.errors[0]
        if self.unfinished:
            return f"{self.unfinished} transfers not finished before the timeout"
        return "nothing was submitted" + (
            f": {self.submit_errors[0]}" if self.submit_errors else ""
        )


@dataclass
class Context:
    """Settings and shared state of one benchmark run."""

    bench: Bench
    logs: Path
    transfers: int
    queue_repeat: int
    workers: list[int]
    concurrency: int
    queue_timeout: float
    postgres: Postgres | None  # None: PostgreSQL runs are skipped
    postgres_problem: str = ""  # why PostgreSQL cannot be used, when it cannot
    setup_notes: list[str] = field(default_factory=list)
    rest_phases: list[dict[str, float]] = field(default_factory=list)
    queue_runs: list[QueueRun] = field(default_factory=list)


# -- part 1: API overhead ---------------------------------------------------------------


def run_api(ctx: Context) -> None:
    """Push the small tree at site A once; then, per repetition and each from a fresh
    site B, time the CLI's in-process stage and a stage submitted over REST. The staged
    trees are all deleted at the end, so no deletion runs between timed steps."""
    b = ctx.bench
    data = small_tree(b)
    run = b.fresh_dir(b.work / "runs" / "daemon-api")
    tarball = b.tarball("small")  # made once, untimed; read through with the tree
    b.settle_caches([data / "small", *([tarball] if tarball else [])])
    bucket = b.bucket("dmapi")
    try:
        site_a = b.dm.write_site("site-a", run, bucket, data_dir=data)
        log("api: push of the small tree at site A (untimed setup) ...")
        pushed = run_measured(b.dm.push(LOGICAL, site_a), b.dm.env())
        if not pushed.ok:
            reason = f"push at site A failed: {pushed.first_error_line()}"
            b.skip((API, STAGE, DIRECT), reason)
            b.skip((API, STAGE, REST), reason)
        else:
            ctx.setup_notes.append(f"setup push of {LOGICAL} at site A: {pushed.seconds:.2f} s")
            steps = [_direct, _rest, _hook, _untar, _burst]
            for rep in range(b.repeat):
                log(f"api: repetition {rep + 1}/{b.repeat}")
                # Rotate which goes first, so a systematic drift hits all alike.
                shift = rep % len(steps)
                for measure_one in steps[shift:] + steps[:shift]:
                    measure_one(ctx, run, bucket, rep)
    finally:
        b.drop_buckets()
        b.retire(run)
    r = b.results
    for label, keys, goal in (
        ("REST stage / direct CLI stage (median wall)", (REST, DIRECT), OVERHEAD_GOAL),
        (
            "CLI stage via the daemon / tar -x (median wall; the data-plane target, deployed)",
            (HOOK, TARX),
            TAR_GOAL,
        ),
    ):
        steps = ((STAGE, keys[0]), (STAGE, keys[1]))
        r.target(
            Target(API, label, r.ratio(API, *steps), "<=", goal, "{:.2f}x", r.missing(API, *steps))
        )


def _site_b(b: Bench, run: Path, bucket: str, tag: str) -> tuple[SiteFiles, Path, str]:
    """A new site B under `run/<tag>`: empty target, empty state dir, `[api]` on a free port.

    Every measurement gets directories that never existed: creating 20,000 files right after
    20,000 were deleted is several times slower (ext4's recently-deleted inode scan, see
    `harness.RECENTLY_DELETED`), which would make whichever step runs first look fast.
    """
    root = run / tag
    root.mkdir()
    site = b.dm.write_site("site-b", root, bucket)
    listen = free_listens(1)[0]
    return site, daemon_config(site, root / "site-b-api.toml", listen=listen), listen


def _verify(b: Bench, record: Step, config: Path) -> bool:
    """Untimed `datamover verify`; a failure is recorded against `record`."""
    argv = [*b.dm.argv0, "verify", LOGICAL, "--config", str(config), "--json"]
    sample = run_measured(argv, b.dm.env(), sync_first=False)
    if sample.ok:
        record.note("verify OK")
        return True
    message = f"verify failed: {sample.first_error_line()}"
    record.errors.append(message)
    log(f"  {record.tool}: {message}")
    return False


def _direct(ctx: Context, run: Path, bucket: str, rep: int) -> None:
    """Time `datamover stage --local` as a whole command (no daemon running)."""
    b, shape = ctx.bench, ctx.bench.sizes.small
    site, config, _ = _site_b(b, run, bucket, f"r{rep}-direct")
    try:
        create_catalog(b.dm, config)  # a site's catalog exists before anyone stages
    except BenchError as exc:
        b.skip((API, STAGE, DIRECT), str(exc))
        return
    argv = [*b.dm.argv0, "stage", LOGICAL, "--local", "--config", str(config), "--json"]
    sample = b.run(
        (API, STAGE, DIRECT),
        argv,
        b.dm.env(),
        files=shape.files,
        nbytes=shape.bytes,
        expect_tree=site.data_dir / "small",
        want_json=True,
    )
    record = b.results.step(API, STAGE, DIRECT)
    if sample is not None and not _verify(b, record, config):
        record.samples.pop()
        record.payloads.pop()


async def _timed_stage(url: str, token: str) -> tuple[float, float, dict[str, Any]]:
    """POST a stage and poll until it ends: (seconds, wall clock at the POST, transfer)."""
    async with client_session(4) as session:
        api = RestClient(session, url, token)
        await api.call("GET", "/healthz")  # connect before the clock starts
        wall = time.time()
        start = time.perf_counter()
        transfer = await api.submit("stage", LOGICAL)
        while transfer["state"] not in TERMINAL:
            if time.perf_counter() - start > STAGE_TIMEOUT:
                raise TimeoutError(f"stage not finished after {STAGE_TIMEOUT:.0f} s")
            await asyncio.sleep(STAGE_POLL)
            transfer = await api.get(transfer["id"])
        return time.perf_counter() - start, wall, transfer


def _hook(ctx: Context, run: Path, bucket: str, rep: int) -> None:
    """Time `datamover stage --wait` as a whole command (Python start-up included) on a site
    whose daemon is running (started untimed): what a Slurm prolog waits for."""
    b, shape = ctx.bench, ctx.bench.sizes.small
    site, config, listen = _site_b(b, run, bucket, f"r{rep}-hook")
    log_path = ctx.logs / f"api-r{rep}-hook-serve.log"
    try:
        token = create_token(b.dm, config)
        served = ServeProcess.start(b.dm, config, listen, log_path)
    except BenchError as exc:
        b.skip((API, STAGE, HOOK), str(exc))
        return
    argv = [*b.dm.argv0, "stage", LOGICAL, "--wait", "--config", str(config), "--json"]
    try:
        sample = b.run(
            (API, STAGE, HOOK),
            argv,
            {**b.dm.env(), "DATAMOVER_TOKEN": token},
            files=shape.files,
            nbytes=shape.bytes,
            expect_tree=site.data_dir / "small",
            want_json=True,
        )
    finally:
        _stop(b, served, f"api hook r{rep}")
    record = b.results.step(API, STAGE, HOOK)
    if sample is not None and "transfer" not in record.payloads[-1]:
        record.errors.append("the CLI did not go through the daemon (no transfer id)")
        record.samples.pop()
        record.payloads.pop()
    elif sample is not None and not _verify(b, record, config):
        record.samples.pop()
        record.payloads.pop()


def _untar(ctx: Context, run: Path, bucket: str, rep: int) -> None:
    """Time `tar -x` of the small tree's tarball from local disk into a new directory."""
    b, shape = ctx.bench, ctx.bench.sizes.small
    tarball = b.tarball("small")
    if b.tar is None or tarball is None:
        b.skip((API, STAGE, TARX), "tar not found")
        return
    dst = run / f"r{rep}-tar"
    dst.mkdir()
    b.run(
        (API, STAGE, TARX),
        b.tar.extract(tarball, dst),
        b.tar.env(),
        files=shape.files,
        nbytes=shape.bytes,
        expect_tree=dst / "small",
    )


def _stop(b: Bench, served: ServeProcess, what: str) -> None:
    """Stop a daemon; errors in its log go into the report's problems under `what`."""
    served.stop()
    findings = served.findings()
    if findings.errors:
        b.results.problems.append(f"{what}: {served.log_path}: {findings.summary()}")


def _served_b(
    ctx: Context, run: Path, bucket: str, tag: str, log_path: Path, record: Step, label: str
) -> tuple[SiteFiles, Path, str, ServeProcess] | None:
    """A new site B (`_site_b`) with its daemon started and a write token: `(site, config,
    token, daemon)`; None, the failure recorded, if it cannot start."""
    b = ctx.bench
    site, config, listen = _site_b(b, run, bucket, tag)
    try:
        token = create_token(b.dm, config)
        served = ServeProcess.start(b.dm, config, listen, log_path)
    except BenchError as exc:
        record.errors.append(str(exc))
        log(f"{label}: FAILED: {exc}")
        return None
    return site, config, token, served


def _rest(ctx: Context, run: Path, bucket: str, rep: int) -> None:
    """Time a stage over REST on a running daemon (start-up untimed), then verify it."""
    b, shape = ctx.bench, ctx.bench.sizes.small
    label = f"  {REST}"
    record = b.results.step(API, STAGE, REST, files=shape.files, nbytes=shape.bytes)
    log_path = ctx.logs / f"api-r{rep}-serve.log"
    started = _served_b(ctx, run, bucket, f"r{rep}-rest", log_path, record, label)
    if started is None:
        return
    site, config, token, served = started
    try:
        os.sync()
        seconds, wall, final = asyncio.run(_timed_stage(served.url, token))
    except (RestError, aiohttp.ClientError, TimeoutError, OSError) as exc:
        record.errors.append(f"{type(exc).__name__}: {exc} (log: {log_path})")
        log(f"{label}: FAILED: {exc}")
        return
    finally:
        _stop(b, served, f"api r{rep}")
    if final["state"] != "succeeded":
        error = (final.get("error") or {}).get("message", "")
        record.errors.append(f"transfer {final['id']} {final['state']}: {error} (log: {log_path})")
        log(f"{label}: FAILED: transfer {final['state']}: {error}")
        return
    got = tree_stats(site.data_dir / "small")
    if got != (shape.files, shape.bytes):
        record.errors.append(f"incomplete tree: {got[0]}/{shape.files} files")
        log(f"{label}: FAILED: incomplete tree {got}")
        return
    if not _verify(b, record, config):
        return
    record.samples.append(
        Sample(("POST", served.url + "/v1/transfers"), seconds, 0, json.dumps(final), "", None)
    )
    record.payloads.append(final.get("result") or {})
    created, started, finished = (
        epoch(final.get(k)) for k in ("created_at", "started_at", "finished_at")
    )
    if created is not None and started is not None and finished is not None:
        ctx.rest_phases.append(
            {
                "post_to_created": created - wall,
                "queue_wait": started - created,
                "running": finished - started,
                "poll_lag": wall + seconds - finished,
            }
        )
    log(f"{label}: {seconds:.2f} s (self-reported {final['result'].get('seconds', 0):.2f} s)")


async def _timed_burst(url: str, token: str) -> tuple[float, list[dict[str, Any]]]:
    """POST `BURST_SIZE` stages of the small tree at once, poll until all have ended:
    (seconds from the first POST to the last end seen, the transfers)."""
    async with client_session(8) as session:
        api = RestClient(session, url, token)
        await api.call("GET", "/healthz")
        start = time.perf_counter()
        submitted = await asyncio.gather(*(api.submit("stage", LOGICAL) for _ in range(BURST_SIZE)))
        ids = [t["id"] for t in submitted]
        ended: dict[str, dict[str, Any]] = {}
        while len(ended) < len(ids):
            if time.perf_counter() - start > STAGE_TIMEOUT:
                raise TimeoutError(f"burst not finished after {STAGE_TIMEOUT:.0f} s")
            await asyncio.sleep(STAGE_POLL)
            for t in await asyncio.gather(*(api.get(i) for i in ids if i not in ended)):
                if t["state"] in TERMINAL:
                    ended[t["id"]] = t
        return time.perf_counter() - start, [ended[i] for i in ids]


def _burst(ctx: Context, run: Path, bucket: str, rep: int) -> None:
    """Time `BURST_SIZE` stages of one dataset submitted at once to a running daemon (a job
    array's prologs all asking for one dataset): until the last has ended."""
    b, shape = ctx.bench, ctx.bench.sizes.small
    label = f"  {BURST}"
    record = b.results.step(API, STAGE, BURST, files=shape.files, nbytes=shape.bytes)
    log_path = ctx.logs / f"api-r{rep}-burst-serve.log"
    started = _served_b(ctx, run, bucket, f"r{rep}-burst", log_path, record, label)
    if started is None:
        return
    site, config, token, served = started
    try:
        os.sync()
        seconds, ended = asyncio.run(_timed_burst(served.url, token))
    except (RestError, aiohttp.ClientError, TimeoutError, OSError) as exc:
        record.errors.append(f"{type(exc).__name__}: {exc} (log: {log_path})")
        log(f"{label}: FAILED: {exc}")
        return
    finally:
        _stop(b, served, f"api burst r{rep}")
    failed = [t for t in ended if t["state"] != "succeeded"]
    if failed:
        error = (failed[0].get("error") or {}).get("message", "")
        record.errors.append(f"{len(failed)} of {len(ended)} did not succeed: {error}")
        log(f"{label}: FAILED: {len(failed)} transfers did not succeed")
        return
    got = tree_stats(site.data_dir / "small")
    if got != (shape.files, shape.bytes) or not _verify(b, record, config):
        record.errors.append(f"tree after the burst: {got[0]}/{shape.files} files")
        return
    answered = sum(1 for t in ended if (t.get("result") or {}).get("satisfied_by"))
    record.note(f"answered by an earlier stage (satisfied_by): {answered} of {len(ended)}")
    tail = _answer_tail(ended)
    if tail is not None:
        record.note(f"last answer {tail:.3f} s after the last stage that ran ended")
    record.samples.append(Sample(("POST", served.url + "/v1/transfers"), seconds, 0, "", "", None))
    after = f", the last {tail:.3f} s after the stage that ran" if tail is not None else ""
    log(f"{label}: {seconds:.2f} s, {answered} of {len(ended)} answered by an earlier stage{after}")


def _answer_tail(ended: list[dict[str, Any]]) -> float | None:
    """Seconds (catalog clock) from the end of the last stage that ran to the end of the
    last stage answered by an earlier one: how long the answered prologs waited once the
    tree was ready. None when no stage was answered."""

    def at(t: dict[str, Any]) -> datetime:
        return datetime.fromisoformat(t["finished_at"])

    ran = [at(t) for t in ended if not (t.get("result") or {}).get("satisfied_by")]
    answered = [at(t) for t in ended if (t.get("result") or {}).get("satisfied_by")]
    if not ran or not answered:
        return None
    return max((max(answered) - max(ran)).total_seconds(), 0.0)


# -- part 2: queue throughput -----------------------------------------------------------


def dataset_name(index: int, count: int) -> str:
    """`d0000`... wide enough for `count` datasets."""
    return f"d{index:0{max(4, len(str(count - 1)))}d}"


def make_tiny_datasets(root: Path, count: int, seed: int = 11) -> None:
    """`root/dNNNN/lig_out.pdbqt`: one 4 KiB docking pose per dataset, each different."""
    rng = random.Random(seed)
    for i in range(count):
        directory = root / dataset_name(i, count)
        directory.mkdir(parents=True, exist_ok=True)
        header = f"REMARK  Name = QUEUE{seed:03d}{i:09d}\n"
        (directory / "lig_out.pdbqt").write_bytes(pdbqt_body(rng, TINY_SIZE, header))


def tiny_tree(b: Bench, count: int) -> Path:
    """The data dir holding `q/` with `count` tiny datasets (generated once, cached)."""
    return b.tree(
        "q",
        f"tiny datasets={count} size={TINY_SIZE} seed=11",
        lambda p: make_tiny_datasets(p, count),
    )


def queue_configs(ctx: Context) -> list[QueueConfig]:
    """SQLite and PostgreSQL with each worker count, then two processes on PostgreSQL."""
    configs = [QueueConfig("sqlite", 1, w) for w in ctx.workers]
    if ctx.postgres is not None:
        configs += [QueueConfig("postgresql", 1, w) for w in ctx.workers]
        configs.append(QueueConfig("postgresql", 2, ctx.workers[0]))
    return configs


@dataclass
class _Drained:
    """What the client saw of one queue run."""

    first_post: float  # wall clock
    last_answer: float
    observed: float | None  # wall clock of the listing that showed every transfer ended
    ids: list[str]
    submit_errors: list[str]
    rows: dict[str, dict[str, Any]]  # terminal transfers by id


async def _drain_queue(
    urls: Sequence[str],
    token: str,
    paths: Sequence[str],
    concurrency: int,
    patience: float,
) -> _Drained:
    """Submit a push of every path (round-robin over the daemons, `concurrency` requests in
    flight), then list terminal transfers every `QUEUE_POLL` s until all have ended or `patience`
    seconds have passed."""
    async with client_session(max(concurrency, 4)) as session:
        apis = [RestClient(session, url, token) for url in urls]
        for api in apis:
            await api.call("GET", "/healthz")
        ids: list[str] = []
        errors: list[str] = []
        todo = iter(enumerate(paths))

        async def submitter() -> None:
            for i, path in todo:
                try:
                    ids.append((await apis[i % len(apis)].submit("push", path))["id"])
                except (RestError, aiohttp.ClientError, TimeoutError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")

        first = time.time()
        await asyncio.gather(*(submitter() for _ in range(concurrency)))
        last_answer = time.time()
        log(
            f"  submitted {len(ids)} in {last_answer - first:.2f} s"
            + (f", {len(errors)} refused: {errors[0]}" if errors else "")
        )
        wanted = set(ids)
        rows: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + patience
        next_report = time.monotonic() + 15
        while True:
            rows = {}
            for state in TERMINAL:
                for t in await apis[0].list_all(state, QUEUE_PREFIX):
                    rows[t["id"]] = t
            if wanted <= rows.keys():
                return _Drained(first, last_answer, time.time(), ids, errors, rows)
            if time.monotonic() > deadline:
                return _Drained(first, last_answer, None, ids, errors, rows)
            if time.monotonic() > next_report:
                log(f"  {len(wanted & rows.keys())}/{len(wanted)} ended")
                next_report += 15
            await asyncio.sleep(QUEUE_POLL)


def run_queue(ctx: Context, qc: QueueConfig, rep: int) -> QueueRun:
    """One queue run on fresh state: new bucket, new catalog, daemons started untimed."""
    b = ctx.bench
    out = QueueRun(qc, rep, ctx.transfers)
    data = tiny_tree(b, ctx.transfers)
    paths = [f"{QUEUE_PREFIX}/{dataset_name(i, ctx.transfers)}" for i in range(ctx.transfers)]
    run = b.fresh_dir(b.work / "runs" / "daemon-queue" / qc.slug)
    database: str | None = None
    served: list[ServeProcess] = []
    try:
        site = b.dm.write_site("site-b", run, b.bucket("dmq"), data_dir=data)
        catalog = None
        if qc.catalog == "postgresql":
            if ctx.postgres is None:
                raise BenchError("PostgreSQL is not available")
            database = f"dm_bench_{os.getpid()}_{qc.slug.replace('-', '_')}_r{rep}"
            catalog = ctx.postgres.create(database)
        listens = free_listens(qc.processes)
        configs = [
            daemon_config(
                site, run / f"serve-{i}.toml", listen=listen, workers=qc.workers, catalog=catalog
            )
            for i, listen in enumerate(listens)
        ]
        token = create_token(b.dm, configs[0])
        for i, (config, listen) in enumerate(zip(configs, listens, strict=True)):
            log_path = ctx.logs / f"queue-{qc.slug}-r{rep}-serve{i}.log"
            out.log_paths.append(str(log_path))
            served.append(ServeProcess.start(b.dm, config, listen, log_path))
        os.sync()
        drained = asyncio.run(
            _drain_queue([s.url for s in served], token, paths, ctx.concurrency, ctx.queue_timeout)
        )
        _account(out, drained)
    except (BenchError, RestError, aiohttp.ClientError, TimeoutError, OSError) as exc:
        out.errors.append(f"{type(exc).__name__}: {exc}")
        log(f"  FAILED: {exc}")
    finally:
        findings = [s.findings() for s in _stop_all(served)]
        summaries = [f.summary() for f in findings if f.summary()]
        out.log_summary = "; ".join(summaries)
        if any(f.errors for f in findings):
            b.results.problems.append(
                f"queue {qc.catalog}, {qc.label}: errors in {', '.join(out.log_paths)}: "
                + out.log_summary
            )
        if database is not None and ctx.postgres is not None:
            try:
                ctx.postgres.drop(database)
            except BenchError as exc:
                b.results.problems.append(str(exc))
        b.drop_buckets()
        b.retire(run)
    return out


def _stop_all(served: list[ServeProcess]) -> list[ServeProcess]:
    """SIGTERM every daemon first (they drain in parallel), then wait for each."""
    for s in served:
        s.terminate()
    for s in served:
        s.stop()
    return served


def _account(out: QueueRun, drained: _Drained) -> None:
    """Fill a `QueueRun` from what the client saw."""
    out.submitted = len(drained.ids)
    out.submit_errors = drained.submit_errors
    out.submit_seconds = drained.last_answer - drained.first_post
    if drained.observed is not None:
        out.observed_seconds = drained.observed - drained.first_post
    mine = [drained.rows[i] for i in drained.ids if i in drained.rows]
    out.unfinished = out.submitted - len(mine)
    finished: list[float] = []
    for t in mine:
        end, start = epoch(t.get("finished_at")), epoch(t.get("started_at"))
        if end is not None:
            finished.append(end)
        if t["state"] == "succeeded":
            out.succeeded += 1
            if end is not None and start is not None:
                out.push_seconds.append(end - start)
        else:
            out.failed += t["state"] == "failed"
            out.cancelled += t["state"] == "cancelled"
            if len(out.failure_messages) < 5:
                error = t.get("error") or {}
                out.failure_messages.append(f"{t['path']}: {t['state']}: {error.get('message')}")
    if finished:
        out.complete_seconds = max(finished) - drained.first_post


def run_queues(ctx: Context) -> None:
    """Every queue configuration, `queue_repeat` times (interleaved), and their targets."""
    configs = queue_configs(ctx)
    for rep in range(ctx.queue_repeat):
        for qc in configs:
            log(f"queue: {qc.catalog}, {qc.label}, {ctx.transfers} pushes (run {rep + 1})")
            q = run_queue(ctx, qc, rep)
            ctx.queue_runs.append(q)
            rate = f"{q.rate:.1f}/s" if q.rate is not None else "no rate"
            log(f"  {rate}, {q.failed} failed, {q.unfinished} unfinished")
    for qc in configs:
        runs = [q for q in ctx.queue_runs if q.config == qc]
        counts = [q.failures for q in runs]
        measured = None if None in counts else float(sum(c or 0 for c in counts))
        why = next((q.why_missing() for q in runs if q.failures is None), "")
        ctx.bench.results.target(
            Target("queue", f"{qc.catalog}, {qc.label}: failed", measured, "<=", 0.0, "{:.0f}", why)
        )
    if ctx.postgres is None and ctx.postgres_problem:
        ctx.bench.results.target(
            Target(
                "queue",
                "postgresql runs",
                None,
                "<=",
                0.0,
                "{:.0f}",
                ctx.postgres_problem,
            )
        )


# -- report -----------------------------------------------------------------------------

API_COLUMNS = (
    "Step",
    "Runs",
    "Median s",
    "Range s",
    "Self-reported s",
    "Files/s",
    "vs direct",
    "Notes",
)
QUEUE_COLUMNS = (
    "Catalog",
    "Serve x workers",
    "Transfers",
    "Submits/s",
    "Complete s",
    "Transfers/s",
    "Failed",
    "Push s",
    "Avg running",
    "Notes",
)
API_LEGEND = (
    "direct: `datamover stage --local --json` timed as a whole command (Python start-up "
    "included), no daemon running. REST: POST /v1/transfers to the moment a GET (every "
    f"{STAGE_POLL * 1000:.0f} ms) shows `succeeded`, daemon already running, client already "
    "connected. CLI via the daemon: `datamover stage --wait --json` timed as a whole command "
    "on a site whose daemon is running (what a Slurm prolog waits for). tar -x: the tree's "
    "tarball from local disk, the floor for writing it. "
    f"{BURST}: {BURST_SIZE} POSTs of a stage of the tree sent together (a job array's "
    "prologs), timed to the moment GETs show every one ended; one tree is staged; its note "
    "gives how long after the stage that ran (catalog times) the last answered one ended. "
    "Each run from a new site-B state dir into a new, empty target directory "
    "(nothing is deleted between timed steps); which goes first rotates. "
    "Self-reported: the `seconds` of the stage's own JSON result."
)
QUEUE_LEGEND = (
    "Pushes of one-file datasets, all submitted at once over REST. Complete s: first POST to "
    "the last transfer's finished_at; Transfers/s = transfers / Complete s. Push s: median "
    "started_at -> finished_at per transfer. Avg running: sum of those / Complete s (how busy "
    "the workers were on average)."
)


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else spec.format(value)


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def api_rows(ctx: Context) -> list[list[str]]:
    """One row per way of staging."""
    r = ctx.bench.results
    base = r.median(API, STAGE, DIRECT)
    rows = []
    for tool in (DIRECT, REST, HOOK, TARX, BURST):
        step = r.get(API, STAGE, tool)
        if step is None:
            continue
        median = step.median
        notes: list[str] = []
        if step.errors:
            notes.append(f"FAILED {len(step.errors)}x: {step.errors[0]}")
        if tool == REST and ctx.rest_phases:
            phase = {k: _median([p[k] for p in ctx.rest_phases]) for k in ctx.rest_phases[0]}
            notes.append(
                "daemon medians: queue wait {queue_wait:.2f} s, running {running:.2f} s, "
                "poll lag {poll_lag:.3f} s".format(**phase)
            )
        notes.extend(step.notes)
        times = step.times
        rows.append(
            [
                tool,
                f"{len(step.samples)}/{len(step.samples) + len(step.errors)}",
                _fmt(median, "{:.2f}"),
                f"{min(times):.2f}-{max(times):.2f}" if times else "—",
                _fmt(step.payload_median("seconds"), "{:.2f}"),
                _fmt(step.files / median if median else None, "{:,.0f}"),
                _fmt(median / base if median is not None and base else None, "{:.2f}x"),
                "; ".join(notes),
            ]
        )
    return rows


def queue_rows(ctx: Context) -> list[list[str]]:
    """One row per queue run."""
    rows = []
    for q in ctx.queue_runs:
        notes: list[str] = []
        if q.errors:
            notes.append(f"FAILED: {q.errors[0]}")
        if q.unfinished:
            notes.append(f"{q.unfinished} unfinished at the timeout")
        if q.submit_errors:
            notes.append(f"{len(q.submit_errors)} refused: {q.submit_errors[0]}")
        notes.extend(q.failure_messages[:1])
        if q.log_summary:
            notes.append(q.log_summary)
        busy = sum(q.push_seconds) / q.complete_seconds if q.complete_seconds else None
        label = q.config.label + (f" (run {q.rep + 1})" if ctx.queue_repeat > 1 else "")
        rows.append(
            [
                q.config.catalog,
                label,
                f"{q.submitted}/{q.transfers}",
                _fmt(q.submitted / q.submit_seconds if q.submit_seconds else None, "{:,.0f}"),
                _fmt(q.complete_seconds, "{:.1f}"),
                _fmt(q.rate, "{:.1f}"),
                _fmt(None if q.failures is None else float(q.failures), "{:.0f}"),
                _fmt(_median(q.push_seconds), "{:.3f}"),
                _fmt(busy, "{:.2f}"),
                "; ".join(notes),
            ]
        )
    return rows


def render(ctx: Context, header: list[str], markdown: bool) -> str:
    """The report as aligned text or as Markdown."""
    results = ctx.bench.results
    sections = [
        ("API overhead", API_COLUMNS, api_rows(ctx), API_LEGEND),
        ("Queue throughput", QUEUE_COLUMNS, queue_rows(ctx), QUEUE_LEGEND),
        ("Targets", TARGET_COLUMNS, target_rows(results), ""),
    ]
    if markdown:
        parts = ["# datamover daemon benchmark", "", *(f"- {line}" for line in header), ""]
        parts += [*(f"- **{p}**" for p in results.problems), ""] if results.problems else []
        for title, columns, rows, legend in sections:
            if rows:
                parts += [f"## {title}", "", markdown_table(columns, rows), ""]
                parts += [legend, ""] if legend else []
        return "\n".join(parts)
    parts = [*header, ""]
    parts += [*results.problems, ""] if results.problems else []
    for title, columns, rows, legend in sections:
        if rows:
            parts += [f"{title}:", text_table(columns, rows), ""]
            parts += [legend, ""] if legend else []
    return "\n".join(parts)


def raw(ctx: Context, header: list[str]) -> str:
    """Every sample, payload, phase and queue run as JSON."""
    data: dict[str, Any] = json.loads(raw_json(ctx.bench.results, header))
    data["rest_phases"] = ctx.rest_phases
    data["queue"] = [{**asdict(q), "rate": q.rate, "failures": q.failures} for q in ctx.queue_runs]
    return json.dumps(data, indent=2) + "\n"


# -- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="default: bench/work")
    p.add_argument(
        "--repeat", type=int, default=5, help="API-overhead runs of each way (median; default 5)"
    )
    p.add_argument("--transfers", type=int, default=None, help="queue size (default 1000)")
    p.add_argument("--queue-repeat", type=int, default=1, help="runs of each queue setting")
    p.add_argument(
        "--workers",
        type=int,
        action="append",
        metavar="N",
        help=f"workers per serve process in the queue runs, repeatable "
        f"(default: {DEFAULT_WORKERS} and 4; two-process runs use the first)",
    )
    p.add_argument(
        "--concurrency", type=int, default=32, help="queue submissions in flight (default 32)"
    )
    p.add_argument(
        "--queue-timeout", type=float, default=1800.0, help="seconds to wait for one queue run"
    )
    p.add_argument("--postgres", default=DEFAULT_POSTGRES, metavar="URL", help="server, no db")
    p.add_argument("--skip-postgres", action="store_true", help="SQLite runs only")
    p.add_argument("--only", choices=("api", "queue"), help="run one part only")
    p.add_argument(
        "--quick", action="store_true", help="2,000-file tree and 100 transfers (harness check)"
    )
    p.add_argument("--markdown", type=Path, metavar="FILE", help="also write the report here")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every sample as JSON here")
    args = p.parse_args(argv)
    if args.transfers is None:
        args.transfers = 100 if args.quick else 1000
    if min(args.repeat, args.queue_repeat, args.transfers, args.concurrency) < 1:
        p.error("--repeat, --queue-repeat, --transfers and --concurrency must be at least 1")
    args.workers = list(dict.fromkeys(args.workers or [DEFAULT_WORKERS, 4]))
    if min(args.workers) < 1:
        p.error("--workers must be at least 1")
    return args


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def header(ctx: Context, endpoint: str) -> list[str]:
    """Lines describing the run."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    shape = ctx.bench.sizes.small
    version = run_measured([*ctx.bench.dm.argv0, "--version"], sync_first=False).stdout.strip()
    postgres = (
        "skipped"
        if ctx.postgres is None and not ctx.postgres_problem
        else ctx.postgres_problem or (ctx.postgres.server if ctx.postgres else "")
    )
    return [
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"command: {shlex.join(['python', 'bench/daemon.py', *sys.argv[1:]])}",
        f"machine: {platform.node()}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}",
        f"datamover: {version}; store: SeaweedFS via datamover.embedded at {endpoint}",
        f"api overhead: small tree {shape.files:,} x {shape.size} B, {ctx.bench.repeat} runs "
        f"each way; daemon with default [api] workers ({DEFAULT_WORKERS}), SQLite catalog",
        f"queue: {ctx.transfers:,} pushes of one-file datasets, {ctx.concurrency} submissions "
        f"in flight, {ctx.queue_repeat} run(s) per setting; PostgreSQL: {postgres}",
        f"daemon logs: {ctx.logs}",
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the report; return the exit status."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    from datamover.embedded import EmbeddedSeaweed

    # Not work/seaweed: bench/run.py owns (and wipes) that one.
    store_dir = work / "seaweed-daemon"
    remove_tree(store_dir, many_files=False)
    server = EmbeddedSeaweed(data_dir=store_dir)
    log("starting SeaweedFS ...")
    try:
        server.start()
    except Exception as exc:  # nothing to measure without a store: say why and stop
        log(f"error: SeaweedFS did not start: {exc}")
        return 2
    target = S3Target(server.endpoint, server.access_key, server.secret_key)
    bench = Bench(work, target, args.repeat, args.repeat, QUICK if args.quick else FULL)
    bench.results.problems.clear()  # s5cmd, rclone and tar are not used here
    logs = work / "daemon-logs" / time.strftime("%Y%m%d-%H%M%S")
    logs.mkdir(parents=True, exist_ok=True)
    postgres: Postgres | None = None
    problem = ""
    if not args.skip_postgres and args.only != "api":
        postgres = Postgres(args.postgres.rstrip("/"))
        reason = postgres.unusable()
        if reason is not None:
            problem = f"PostgreSQL at {args.postgres} unusable: {reason}"
            bench.results.problems.append(problem + "; its queue runs are missing")
            postgres = None
    ctx = Context(
        bench,
        logs,
        args.transfers,
        args.queue_repeat,
        args.workers,
        args.concurrency,
        args.queue_timeout,
        postgres,
        problem,
    )
    lines = header(ctx, server.endpoint)
    load_before = os.getloadavg()
    started = time.monotonic()
    try:
        parts = (("api", run_api), ("queue", run_queues))
        run_parts(
            bench,
            [(n, functools.partial(fn, ctx)) for n, fn in parts if args.only in (None, n)],
        )
    finally:
        server.stop()
        remove_tree(store_dir, many_files=False)
        bench.bury()

    lines += ctx.setup_notes
    lines.append(
        f"load average (1 min) at start / end: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs; whole run {time.monotonic() - started:.0f} s"
    )
    sys.stdout.write(render(ctx, lines, markdown=False))
    if args.markdown:
        args.markdown.write_text(render(ctx, lines, markdown=True))
        log(f"wrote {args.markdown}")
    if args.json:
        args.json.write_text(raw(ctx, lines))
        log(f"wrote {args.json}")
    targets = bench.results.targets
    return 0 if targets and all(t.passed for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
