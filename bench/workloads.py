"""The four workloads (small, big, incremental, scale) and the targets each one checks.

Every repetition interleaves the tools (s5cmd, rclone, datamover, tar) so that noise on the
shared machine spreads over all of them, and starts from fresh buckets, fresh site state and
empty target directories. Setup (trees, tarballs, copies, buckets) is never timed.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from harness import Bench, log
from measure import run_measured
from results import DATAMOVER, Step, Target
from serving import BenchError
from tools import Rclone, S5cmd, SiteFiles
from treegen import add_files, make_big_file, make_pooled_tree, make_small_tree, rewrite_files
from viadaemon import through, went_through

UP, DOWN = "upload (push)", "download (stage)"
FIRST, NOOP, CHANGED, COPY = "first push", "no-op re-push", "1% changed", "same tree, new path"
ADDED = "1% added in one directory"
S5, RC, TAR = "s5cmd", "rclone", "tar -x"


def small_tree(b: Bench) -> Path:
    """The data dir holding `small` (docking-like files, each different)."""
    shape = b.sizes.small
    return b.tree("small", f"pdbqt {shape} seed=42", lambda p: make_small_tree(p, shape))


def run_small(b: Bench) -> None:
    """Many small files: push/stage against s5cmd, rclone and tar -x."""
    shape = b.sizes.small
    data = small_tree(b)
    for rep in range(b.repeat):
        log(f"small: repetition {rep + 1}/{b.repeat}")
        _round(b, "small", data, "small", rep, shape.files, shape.bytes, peers=True)
    r = b.results
    r.target(
        _ratio_target(
            b, "small", "s5cmd upload / datamover push", (UP, S5), (UP, DATAMOVER), ">=", 5.0
        )
    )
    r.target(
        _ratio_target(
            b, "small", "s5cmd download / datamover stage", (DOWN, S5), (DOWN, DATAMOVER), ">=", 5.0
        )
    )
    r.target(
        _ratio_target(
            b, "small", "datamover stage / tar -x", (DOWN, DATAMOVER), (DOWN, TAR), "<=", 2.0
        )
    )


def run_big(b: Bench) -> None:
    """One big random file: datamover must keep up with s5cmd both ways."""
    size = b.sizes.big_bytes
    data = b.tree("big", f"random {size} seed=99", lambda p: make_big_file(p / "blob.bin", size))
    for rep in range(b.repeat):
        log(f"big: repetition {rep + 1}/{b.repeat}")
        _round(b, "big", data, "big", rep, 1, size, peers=True)
    r = b.results
    r.target(
        _ratio_target(
            b, "big", "s5cmd upload / datamover push", (UP, S5), (UP, DATAMOVER), ">=", 1.0
        )
    )
    r.target(
        _ratio_target(
            b, "big", "s5cmd download / datamover stage", (DOWN, S5), (DOWN, DATAMOVER), ">=", 1.0
        )
    )


def run_scale(b: Bench) -> None:
    """Very many small files: datamover's memory stays bounded and staging keeps its rate."""
    shape = b.sizes.scale
    data = b.tree("scale", f"pooled {shape} seed=7", lambda p: make_pooled_tree(p, shape))
    for rep in range(b.scale_repeat):
        log(f"scale: repetition {rep + 1}/{b.scale_repeat}")
        _round(b, "scale", data, "scale", rep, shape.files, shape.bytes, peers=False)
    r = b.results
    for step, label in ((UP, "push"), (DOWN, "stage")):
        s = r.get("scale", step, DATAMOVER)
        r.target(
            Target(
                "scale",
                f"datamover {label} peak RSS (MiB)",
                s.peak_rss_mib if s else None,
                "<",
                300.0,
                "{:.0f}",
                r.missing("scale", (step, DATAMOVER)),
            )
        )
    stage = r.median("scale", DOWN, DATAMOVER)
    r.target(
        Target(
            "scale",
            "datamover stage rate (files/s)",
            shape.files / stage if stage else None,
            ">=",
            5000.0,
            "{:,.0f}",
            r.missing("scale", (DOWN, DATAMOVER)),
        )
    )


def run_incremental(b: Bench) -> None:
    """On a copy of the small tree: no-op re-push, 1% changed, 1% added in one directory, the
    same tree at a new path."""
    data = small_tree(b)
    for rep in range(b.repeat):
        log(f"incremental: repetition {rep + 1}/{b.repeat}")
        _incremental_rep(b, data, rep)
    _incremental_targets(b)


def _incremental_rep(b: Bench, data: Path, rep: int) -> None:
    shape, wl = b.sizes.small, "incremental"
    run = b.rep_dir(wl, rep, [data / "small"])
    a_data = run / "site-a-data"
    a_data.mkdir()
    tree = a_data / "small"
    subprocess.run(["cp", "-a", str(data / "small"), str(tree)], check=True)
    site = b.dm.write_site("site-a", run, b.bucket("dm"), data_dir=a_data)
    uploads = _peer_uploads(b, wl, tree)
    pushed = True

    def step(name: str, logical: str = "/bench/small") -> None:
        """Time datamover, then both peers, on the tree as it is now."""
        nonlocal pushed
        if pushed:
            pushed = _push(b, wl, name, logical, site, shape.files, shape.bytes) is not None
        else:
            b.skip((wl, name, DATAMOVER), "an earlier push failed")
        if logical == "/bench/small":
            for upload in uploads.values():
                upload(name)

    step(FIRST)
    step(NOOP)
    rewrite_files(tree, shape, b.sizes.changed, seed=1000 + rep)
    step(CHANGED)
    add_files(tree, shape, b.sizes.changed, seed=2000 + rep)
    step(ADDED)
    # `cp -a` keeps the mtimes: the copy is the same tree, so nearly nothing may be uploaded.
    subprocess.run(["cp", "-a", str(tree), str(a_data / "small2")], check=True)
    step(COPY, "/bench/small2")
    b.drop_buckets()
    b.retire(run)


def _incremental_targets(b: Bench) -> None:
    r, wl = b.results, "incremental"
    noop = r.get(wl, NOOP, DATAMOVER)
    if noop is not None and any(p.get("unchanged") is not True for p in noop.payloads):
        noop.note("push did not report unchanged=true")
    for step, goal, name in (
        (CHANGED, 0.03, "1% changed: uploaded / dataset bytes"),
        (ADDED, 0.03, "1% added in one directory: uploaded / dataset bytes"),
        (COPY, 0.02, "copy at /bench/small2: uploaded / dataset bytes"),
    ):
        s = r.get(wl, step, DATAMOVER)
        r.target(
            Target(
                wl,
                name,
                _uploaded_fraction(s),
                "<=",
                goal,
                "{:.2%}",
                r.missing(wl, (step, DATAMOVER)),
            )
        )
    r.target(
        _ratio_target(
            b, wl, "no-op re-push / first push", (NOOP, DATAMOVER), (FIRST, DATAMOVER), "<=", 0.25
        )
    )


def _uploaded_fraction(step: Step | None) -> float | None:
    if step is None:
        return None
    values = sorted(
        p["uploaded_bytes"] / p["bytes"]
        for p in step.payloads
        if isinstance(p.get("uploaded_bytes"), int) and p.get("bytes")
    )
    return values[len(values) // 2] if values else None


def _peer_uploads(b: Bench, wl: str, tree: Path) -> dict[str, Callable[[str], None]]:
    """For s5cmd and rclone: a function that times one (re-)upload of `tree` for a step."""
    files, nbytes = b.sizes.small.files, b.sizes.small.bytes
    uploads: dict[str, Callable[[str], None]] = {}
    if b.s5 is not None:
        s5, bucket = b.s5, b.bucket("s5cmd")

        def s5_upload(step: str) -> None:
            argv = (
                s5.upload(tree, bucket, "small")
                if step == FIRST
                else s5.sync_up(tree, bucket, "small")
            )
            sample = b.run((wl, step, S5), argv, s5.env(), files=files, nbytes=nbytes)
            if sample is not None and step != FIRST:
                sent = sum(1 for line in sample.stdout.splitlines() if line.startswith("cp "))
                b.results.step(wl, step, S5).note(f"s5cmd sync sent {sent} files")

        uploads[S5] = s5_upload
    if b.rclone is not None:
        rc, bucket_rc = b.rclone, b.bucket("rclone")

        def rc_upload(step: str) -> None:
            b.run(
                (wl, step, RC),
                rc.upload(tree, bucket_rc, "small"),
                rc.env(),
                files=files,
                nbytes=nbytes,
            )

        uploads[RC] = rc_upload
    return uploads


def _push(
    b: Bench, wl: str, step: str, logical: str, site: SiteFiles, files: int, nbytes: int
) -> dict[str, object] | None:
    """Time one `datamover push` (through the site's daemon with `--via-daemon`); return its
    JSON output."""
    try:
        with through(b, site, f"{wl} {step}") as (served, env):
            sample = b.run(
                (wl, step, DATAMOVER),
                b.dm.push(logical, served),
                env,
                files=files,
                nbytes=nbytes,
                want_json=True,
            )
    except BenchError as exc:
        b.skip((wl, step, DATAMOVER), str(exc))
        return None
    if sample is None or not _went_through(b, (wl, step, DATAMOVER)):
        return None
    record = b.results.step(wl, step, DATAMOVER)
    payload = record.payloads[-1]
    if payload.get("files") != files or payload.get("bytes") != nbytes:
        record.note(f"push reported {payload.get('files')} files, {payload.get('bytes')} bytes")
    return payload


def _went_through(b: Bench, where: tuple[str, str, str]) -> bool:
    """False (the sample dropped, an error recorded) if the step's last output shows it did
    not run through the daemon although `--via-daemon` asked for that."""
    record = b.results.step(*where)
    if went_through(b, record.payloads[-1]):
        return True
    record.errors.append("ran without the daemon (its output has no transfer id)")
    record.samples.pop()
    record.payloads.pop()
    return False


def _rotated(steps: list[Callable[[], None]], rep: int) -> list[Callable[[], None]]:
    """`steps` starting at the `rep`-th: repetitions rotate which tool goes first.

    Whoever runs right after another tool's bulk upload finds the S3 server still digesting
    it, and whoever writes a tree last finds the file system fuller; rotating spreads both
    over every tool instead of charging them to the same one each time.
    """
    k = rep % len(steps) if steps else 0
    return steps[k:] + steps[:k]


def _round(
    b: Bench, wl: str, data: Path, name: str, rep: int, files: int, nbytes: int, *, peers: bool
) -> None:
    """One repetition of upload then download by every tool; `data/name` is the tree.

    Uploads all run before downloads; within each phase the tools' order rotates per
    repetition (`_rotated`)."""
    tarball = b.tarball(name)
    run = b.rep_dir(wl, rep, [data / name, *([tarball] if tarball else [])])
    src, logical = data / name, f"/bench/{name}"
    got: dict[str, str] = {}
    site_a = b.dm.write_site("site-a", run, b.bucket("dm"), data_dir=data)
    pushed: dict[str, object] | None = None

    def upload(tool: str, peer: S5cmd | Rclone) -> Callable[[], None]:
        def go() -> None:
            bucket = b.bucket(tool)
            argv = peer.upload(src, bucket, name)
            if b.run((wl, UP, tool), argv, peer.env(), files=files, nbytes=nbytes):
                got[tool] = bucket

        return go

    def push() -> None:
        nonlocal pushed
        pushed = _push(b, wl, UP, logical, site_a, files, nbytes)

    def download(tool: str, peer: S5cmd | Rclone) -> Callable[[], None]:
        def go() -> None:
            if tool not in got:
                b.skip((wl, DOWN, tool), "upload failed")
                return
            dst = b.fresh_dir(run / f"{tool}-down")
            b.run(
                (wl, DOWN, tool),
                peer.download(got[tool], name, dst),
                peer.env(),
                expect_tree=dst,
                files=files,
                nbytes=nbytes,
            )

        return go

    def stage() -> None:
        if pushed is None:
            b.skip((wl, DOWN, DATAMOVER), "push failed")
            return
        site_b = b.dm.write_site("site-b", run, site_a.bucket)
        try:
            with through(b, site_b, f"{wl} stage r{rep}") as (served, env):
                staged = b.run(
                    (wl, DOWN, DATAMOVER),
                    b.dm.stage(logical, served),
                    env,
                    expect_tree=site_b.data_dir / name,
                    want_json=True,
                    files=files,
                    nbytes=nbytes,
                )
        except BenchError as exc:
            b.skip((wl, DOWN, DATAMOVER), str(exc))
            return
        if staged is not None and _went_through(b, (wl, DOWN, DATAMOVER)) and rep == 0:
            _verify(b, wl, logical, site_b)

    def untar() -> None:
        assert b.tar is not None and tarball is not None
        dst = b.fresh_dir(run / "tar-down")
        b.run(
            (wl, DOWN, TAR),
            b.tar.extract(tarball, dst),
            b.tar.env(),
            expect_tree=dst / name,
            files=files,
            nbytes=nbytes,
        )

    peer_tools: list[tuple[str, S5cmd | Rclone]] = []
    if peers:
        peer_tools += [(S5, b.s5)] if b.s5 is not None else []
        peer_tools += [(RC, b.rclone)] if b.rclone is not None else []
    uploads = [upload(t, p) for t, p in peer_tools] + [push]
    downloads = [download(t, p) for t, p in peer_tools] + [stage]
    if b.tar is not None and tarball is not None:
        downloads.append(untar)
    for step in _rotated(uploads, rep) + _rotated(downloads, rep):
        step()
    b.drop_buckets()
    b.retire(run)


def _verify(b: Bench, wl: str, logical: str, site: SiteFiles) -> None:
    """Untimed `datamover verify` of a staged tree; the verdict goes into the step's notes."""
    sample = run_measured(b.dm.verify(logical, site), b.dm.env(), sync_first=False)
    record = b.results.step(wl, DOWN, DATAMOVER)
    if sample.ok:
        record.note("verify OK")
    else:
        record.note(f"VERIFY FAILED: {sample.first_error_line()}")
        log(f"  {wl} verify FAILED: {sample.first_error_line()}")


def _ratio_target(
    b: Bench, wl: str, name: str, num: tuple[str, str], den: tuple[str, str], op: str, goal: float
) -> Target:
    """A target on median(num) / median(den)."""
    r = b.results
    return Target(wl, name, r.ratio(wl, num, den), op, goal, "{:.2f}x", r.missing(wl, num, den))
