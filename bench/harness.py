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


_last_removal = 0.0  # time.monotonic() of the last remove_tree that removed something


def remove_tree(path: Path) -> None:
    """`rm -rf path` (faster than shutil.rmtree on 200,000 files, and untimed anyway)."""
    global _last_removal
    if path.exists() or path.is_symlink():
        subprocess.run(["rm", "-rf", "--", str(path)], check=True)
        _last_removal = time.monotonic()


def _deletion_window() -> float:
    """Seconds ext4 treats a deleted inode as recently deleted: the writeback expiry."""
    try:
        return int(Path("/proc/sys/vm/dirty_expire_centisecs").read_text()) / 100
    except (OSError, ValueError):
        return 30.0


def forget_deleted(warm: Sequence[Path] = ()) -> None:
    """Make file creation fast again after a large deletion, then re-read `warm` trees.

    ext4 skips recently deleted inodes when it allocates new ones, checking each candidate
    against the inode table blocks it has cached: after `rm -rf` of 20,000 files, the next
    20,000 creates spent 5-13 s of kernel time here (`perf`: `recently_deleted`), where
    0.5 s is normal. Dropping the clean page cache (root only) removes those blocks, but a
    tool's creates read them back, and within the window in which ext4 counts an inode as
    recently deleted (the writeback expiry, `vm.dirty_expire_centisecs`, 30 s) the checks
    bite again. So this first waits out that window after the last removal, then drops the
    cache; `warm` (the inputs of the coming steps) is read back so no tool pays for a cold
    source tree. (Later repetitions were still slower for whichever tool followed the bulk
    uploads; that is the S3 server, which the rotating order in workloads.py spreads.)
    """
    wait = _last_removal + _deletion_window() + 1 - time.monotonic()
    if _last_removal and wait > 0:
        log(f"waiting {wait:.0f} s for deleted inodes to stop counting as recently deleted")
        time.sleep(wait)
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return  # not root: the effect stays, and shows as noise in the ranges
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
        """A directory that never existed, for one repetition of a workload.

        Nothing is deleted between the timed steps of a repetition (creating files right
        after a large deletion is slow: `forget_deleted`). Repetitions remove their directory
        when all their steps are done, and each starts with `settle_caches(warm)`, `warm`
        being the trees and tarballs it will use.
        """
        path = self.work / "runs" / workload / f"{time.strftime('%H%M%S')}-r{rep}"
        remove_tree(path)
        self.settle_caches(warm)
        path.mkdir(parents=True)
        return path

    def settle_caches(self, warm: Sequence[Path] = ()) -> None:
        """Before timed steps: `forget_deleted(warm)`, then `warm_tools`."""
        forget_deleted(warm)
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
        """`path`, emptied and created."""
        remove_tree(path)
        path.mkdir(parents=True)
        return path

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
