"""The benchmark's working context: the tools, fresh buckets and directories per repetition,
cached source trees, and `Bench.run`, the one place a timed step is run and recorded.

A failing command never stops the benchmark: its first error line is recorded against the
step and the caller decides what depends on it.
"""

from __future__ import annotations

import compileall
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vmtune
from measure import Sample, last_json, run_measured
from results import Results
from s3admin import S3Admin, S3Target
from tools import Datamover, Rclone, S5cmd, Tar, find_binary
from treegen import GENERATOR_VERSION, TreeShape, tree_stats


@dataclass(frozen=True)
class Sizes:
    """How big each workload is."""

    small: TreeShape
    big_bytes: int
    scale: TreeShape
    changed: int  # files rewritten by the incremental workload


FULL = Sizes(TreeShape(200, 100), 1 << 30, TreeShape(2000, 100), 200)
QUICK = Sizes(TreeShape(20, 100), 64 << 20, TreeShape(100, 100), 20)


def log(line: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


RECENTLY_DELETED = 361.0
"""Seconds after which ext4 no longer treats a deleted inode as recently deleted.

On ext4 without a journal (the development VM's root file system) inode allocation skips
free inodes deleted less than 60 s ago, or 360 s ago while their inode table block is dirty
(`recently_deleted` in fs/ext4/ialloc.c), checking each candidate against the cached inode
table: after `rm -rf` of 20,000 files the next 20,000 creates took 5-13 s of kernel time
here instead of 0.5 s. A create dirties its inode table block, so in practice the window is
the 360 s one.
"""

_last_removal = 0.0  # time.monotonic() of the last removal that freed many inodes
_STAMP = ".last-removal"  # under the work directory: wall-clock time of the last such removal


def remove_tree(path: Path, *, many_files: bool = True) -> None:
    """`rm -rf path` (faster than shutil.rmtree on 200,000 files, and untimed anyway).

    `many_files` says whether the tree may hold many files, so that creating files soon
    after must wait (`wait_out_deletions`); False for trees of a few large files.
    """
    global _last_removal
    if path.exists() or path.is_symlink():
        subprocess.run(["rm", "-rf", "--", str(path)], check=True)
        if many_files:
            _last_removal = time.monotonic()


def note_removal(work: Path) -> None:
    """Record in `work` when many inodes were last freed, for the next run's `recall_removal`."""
    if _last_removal:
        ago = time.monotonic() - _last_removal
        (work / _STAMP).write_text(f"{time.time() - ago:.3f}\n")


def recall_removal(work: Path) -> None:
    """Take over an earlier run's last removal (`note_removal`) if it is still recent."""
    global _last_removal
    try:
        when = float((work / _STAMP).read_text())
    except (OSError, ValueError):
        return
    ago = time.time() - when
    if 0 <= ago < RECENTLY_DELETED:
        _last_removal = max(_last_removal, time.monotonic() - ago)


def wait_out_deletions(warm: Sequence[Path] = ()) -> None:
    """Before timed steps: wait until no inode freed by this run (or the previous one, see
    `recall_removal`) counts as recently deleted (`RECENTLY_DELETED`), then read `warm` (the
    inputs of the coming steps) so no tool pays for a cold source tree.

    Runs retire their trees into a graveyard (`Bench.retire`) instead of deleting them, so
    the wait happens only when a run starts soon after another one ended, or after a cached
    input tree had to be generated again.
    """
    global _last_removal
    wait = _last_removal + RECENTLY_DELETED - time.monotonic()
    if _last_removal and wait > 0:
        log(f"waiting {wait:.0f} s for deleted inodes to stop counting as recently deleted")
        time.sleep(wait)
    _last_removal = 0.0
    for root in warm:
        if root.is_file():
            _read_through(root)
            continue
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                _read_through(Path(dirpath) / name)


def _read_through(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass


class Bench:
    """Shared state of one benchmark run against one store."""

    def __init__(
        self, work: Path, target: S3Target, repeat: int, scale_repeat: int, sizes: Sizes
    ) -> None:
        self.work = work
        self.target = target
        self.repeat = repeat
        self.scale_repeat = scale_repeat
        self.sizes = sizes
        self.results = Results()
        self.admin = S3Admin(target)
        self.dm = Datamover.locate(target)
        s5 = find_binary("s5cmd")
        rc = find_binary("rclone", Path("/usr/bin/rclone"))
        tar = find_binary("tar")
        self.s5 = S5cmd(s5, target) if s5 else None
        self.rclone = Rclone(rc, target, work / "rclone.conf") if rc else None
        self.tar = Tar(tar) if tar else None
        (work / "rclone.conf").touch()
        self._seq = 0
        self._buckets: list[str] = []
        self.graveyard = work / "graveyard"
        # `run.py --via-daemon` (see viadaemon.py): pushes and stages through a site daemon.
        self.via_daemon = False
        self.daemon_logs = work / "daemon-logs" / time.strftime("%Y%m%d-%H%M%S")
        self._retired = 0
        recall_removal(work)
        remove_tree(self.graveyard)  # left by an interrupted run
        for name, found in (("s5cmd", s5), ("rclone", rc), ("tar", tar)):
            if not found:
                self.results.problems.append(f"{name} not found: its columns are empty")

    # -- buckets and directories ----------------------------------------------------------

    def bucket(self, tag: str) -> str:
        """A new empty bucket, dropped by `drop_buckets`."""
        self._seq += 1
        name = f"{tag}-{self._seq:04d}"
        self.admin.create_bucket(name)
        self._buckets.append(name)
        return name

    def drop_buckets(self) -> None:
        """Drop every bucket handed out so far (frees the server's disk at once)."""
        while self._buckets:
            name = self._buckets.pop()
            try:
                self.admin.drop_bucket(name)
            except Exception as exc:  # cleanup must not end the run
                log(f"  warning: could not drop bucket {name}: {exc}")

    def rep_dir(self, workload: str, rep: int, warm: Sequence[Path] = ()) -> Path:
        """A directory that never existed, for one repetition of a workload, after
        `settle_caches(warm)`, `warm` being the trees and tarballs it will use."""
        path = self.work / "runs" / workload / f"{time.strftime('%H%M%S')}-r{rep}"
        self.retire(path)
        self.settle_caches(warm)
        path.mkdir(parents=True)
        return path

    def settle_caches(self, warm: Sequence[Path] = ()) -> None:
        """Before timed steps: `wait_out_deletions(warm)`, then `warm_tools`."""
        wait_out_deletions(warm)
        self.warm_tools()

    def warm_tools(self) -> None:
        """Run every tool once, untimed, so none starts from a cold page cache (datamover:
        its interpreter importing the modules a transfer needs).

        datamover's modules are byte-compiled first, as a regular install has them: pip
        compiles a wheel's modules when it installs them, but an editable install leaves it
        to the first import, and with PYTHONDONTWRITEBYTECODE set (it is on the development
        machine) every run compiled ~45 modules from source again (0.09 s of compiling;
        importing what a push needs took 1.02-1.31 s against 0.82-0.87 s byte-compiled).
        """
        import datamover

        compileall.compile_dir(Path(datamover.__file__).parent, quiet=1)
        commands = [self.dm.warm_command()]
        commands += [[t.binary, "version"] for t in (self.s5, self.rclone) if t is not None]
        if self.tar is not None:
            commands.append([self.tar.binary, "--version"])
        for argv in commands:
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)

    def fresh_dir(self, path: Path) -> Path:
        """`path`, emptied (its old content retired) and created."""
        self.retire(path)
        path.mkdir(parents=True)
        return path

    def retire(self, path: Path) -> None:
        """Move `path` (if it exists) into the graveyard, which `bury` empties at the end.

        Deleting a staged tree during the run would make the next tool's file creation
        several times slower (`RECENTLY_DELETED`); a rename frees no inode.
        """
        if not (path.exists() or path.is_symlink()):
            return
        self.graveyard.mkdir(exist_ok=True)
        self._retired += 1
        path.rename(self.graveyard / f"{self._retired:05d}-{path.name}")

    def bury(self) -> None:
        """Delete the graveyard (untimed, at the end of a run) and note when, so a run
        started soon after waits before its first timed step (`recall_removal`)."""
        if self.graveyard.exists():
            log("deleting retired trees ...")
            remove_tree(self.graveyard)
        note_removal(self.work)

    # -- cached inputs --------------------------------------------------------------------

    def tree(self, name: str, params: str, make: Callable[[Path], None]) -> Path:
        """`work/trees/<name>/data`, holding the tree `<name>` made by `make(data/name)`;
        reused by later runs while `params` (the generator's settings) stay the same."""
        base = self.work / "trees" / name
        marker = base / "done"
        params = f"{params} generator=v{GENERATOR_VERSION}"
        if marker.exists() and marker.read_text() == params:
            return base / "data"
        log(f"generating {name} tree ({params}) ...")
        remove_tree(base)
        (base / "data").mkdir(parents=True)
        make(base / "data" / name)
        marker.write_text(params)
        return base / "data"

    def tarball(self, name: str) -> Path | None:
        """`work/trees/<name>.tar` of the tree (made once, untimed), or None without tar."""
        if self.tar is None:
            return None
        base = self.work / "trees" / name
        tarball = base / f"{name}.tar"
        marker = base / "tar-done"
        if not marker.exists():
            log(f"creating {tarball.name} ...")
            subprocess.run(self.tar.create(tarball, base / "data", name), check=True)
            marker.touch()
        return tarball

    # -- timed steps ----------------------------------------------------------------------

    def run(
        self,
        where: tuple[str, str, str],
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        files: int,
        nbytes: int,
        expect_tree: Path | None = None,
        want_json: bool = False,
    ) -> Sample | None:
        """Time `argv` for step `where` = (workload, step, tool) and record it.

        Returns the sample, or None when the command failed, printed no JSON although
        `want_json`, or left `expect_tree` without exactly `files` files of `nbytes` bytes.
        """
        record = self.results.step(*where, files=files, nbytes=nbytes)
        vmtune.refresh()
        sample = run_measured(argv, env)
        label = " ".join(where)
        if not sample.ok:
            return self._fail(record, label, sample.first_error_line())
        payload: dict[str, Any] | None = None
        if want_json:
            payload = last_json(sample.stdout)
            if payload is None:
                return self._fail(record, label, "printed no JSON object on stdout")
        if expect_tree is not None:
            got = tree_stats(expect_tree) if expect_tree.is_dir() else (0, 0)
            if got != (files, nbytes):
                return self._fail(
                    record,
                    label,
                    f"incomplete tree: {got[0]}/{files} files, {got[1]}/{nbytes} bytes",
                )
        record.samples.append(sample)
        if payload is not None:
            record.payloads.append(payload)
        rss = f", peak RSS {sample.peak_rss_kib / 1024:.0f} MiB" if sample.peak_rss_kib else ""
        log(f"  {label}: {sample.seconds:.2f} s{rss}")
        return sample

    def skip(self, where: tuple[str, str, str], reason: str) -> None:
        """Record that a step could not run this repetition."""
        record = self.results.step(*where)
        self._fail(record, " ".join(where), f"skipped: {reason}")

    def _fail(self, record: Any, label: str, message: str) -> None:
        record.errors.append(message)
        log(f"  {label}: FAILED: {message}")

    def check_tools(self) -> list[str]:
        """One line per peer tool saying which binary and version is used."""
        lines = []
        for name, argv in (
            ("datamover", [*self.dm.argv0, "--version"]),
            ("s5cmd", [self.s5.binary, "version"] if self.s5 else None),
            ("rclone", [self.rclone.binary, "version"] if self.rclone else None),
            ("tar", [self.tar.binary, "--version"] if self.tar else None),
        ):
            if argv is None:
                lines.append(f"{name}: not found")
                continue
            env = self.rclone.env() if name == "rclone" and self.rclone else None
            try:
                out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
                first = (out.stdout or out.stderr).strip().splitlines()[:1]
                lines.append(f"{name}: {first[0] if first else '?'} ({argv[0]})")
            except (OSError, subprocess.TimeoutExpired) as exc:
                lines.append(f"{name}: unusable ({exc})")
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        try:
            out = subprocess.run([weed, "version"], capture_output=True, text=True, timeout=60)
            lines.append(f"weed: {out.stdout.strip().splitlines()[0]}")
        except (OSError, subprocess.TimeoutExpired, IndexError):
            lines.append("weed: version unknown")
        return lines


def run_parts(bench: Bench, parts: Sequence[tuple[str, Callable[[], None]]]) -> None:
    """Run each named part in turn. One that fails is recorded as a problem and the others
    still run; ^C ends the run with partial results. Buckets are dropped after each part."""
    for name, run in parts:
        log(f"== {name}")
        try:
            run()
        except KeyboardInterrupt:
            bench.results.problems.append(f"interrupted during {name}: results are partial")
            break
        except Exception as exc:  # one broken part must not hide the others
            bench.results.problems.append(f"{name}: aborted: {type(exc).__name__}: {exc}")
            log(f"{name}: aborted: {exc!r}")
        finally:
            bench.drop_buckets()
