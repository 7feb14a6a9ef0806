"""Run one command as its own process and measure it: wall clock of the whole command and
its peak resident set size.

Peak RSS comes from `/usr/bin/time -f %M` when that exists, else from a tiny Python wrapper
that runs the command and reports `getrusage(RUSAGE_CHILDREN).ru_maxrss`; either way one
process per command, so the figure belongs to that command alone. `sync` runs before the
clock starts so earlier writeback does not land in this measurement.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GNU_TIME = "/usr/bin/time"
DEFAULT_TIMEOUT = 3600.0

# Linux charges a child's pre-exec memory (the wrapper's own ~10 MiB) to its peak, so this
# method has a floor of about 10 MiB; irrelevant for the 100+ MiB commands measured here.
_WRAPPER = (
    "import resource, subprocess, sys\n"
    "try:\n"
    "    rc = subprocess.call(sys.argv[2:])\n"
    "except OSError as exc:\n"
    "    sys.exit(f'cannot run {sys.argv[2]}: {exc}')\n"
    "with open(sys.argv[1], 'w') as f:\n"
    "    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(rc if rc >= 0 else 128 - rc)\n"
)


@dataclass(frozen=True)
class Sample:
    """One timed run of a command."""

    argv: tuple[str, ...]
    seconds: float
    returncode: int
    stdout: str
    stderr: str
    peak_rss_kib: int | None

    @property
    def ok(self) -> bool:
        """Whether the command exited 0."""
        return self.returncode == 0

    def first_error_line(self) -> str:
        """The most telling line of a failed run's output, for a table cell."""
        payload = last_json(self.stdout)
        if payload and isinstance(payload.get("error"), dict):
            return str(payload["error"].get("message", payload["error"]))[:200]
        lines = [ln.strip() for ln in (self.stderr + "\n" + self.stdout).splitlines()]
        lines = [ln for ln in lines if ln]
        for test in (
            lambda ln: ln.startswith("datamover: error:"),
            lambda ln: ln.startswith("ERROR") or " ERROR " in ln,
            lambda ln: "error" in ln.lower() and "warning" not in ln.lower(),
            lambda ln: True,
        ):
            for line in lines:
                if test(line):
                    return line[:200]
        return f"exit code {self.returncode}"


def last_json(text: str) -> dict[str, Any] | None:
    """The last line of `text` that parses as a JSON object, if any."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def rss_method() -> str:
    """How peak RSS is measured on this machine."""
    return GNU_TIME + " -f %M" if os.access(GNU_TIME, os.X_OK) else "getrusage wrapper"


SETTLE_IDLE = 0.85  # fraction of all CPUs idle over one window
SETTLE_WINDOW = 0.25
SETTLE_MAX = 15.0


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies over all CPUs, from /proc/stat; (0, 0) where it does not exist."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])


def settle(max_wait: float = SETTLE_MAX) -> float:
    """Wait until the machine is nearly idle; return the seconds waited.

    The previous step's aftermath (the S3 server compacting deleted buckets, writeback of
    removed trees) otherwise lands in whichever tool runs next. Gives up after `max_wait`.
    """
    start = time.monotonic()
    idle0, total0 = _cpu_times()
    while time.monotonic() - start < max_wait:
        time.sleep(SETTLE_WINDOW)
        idle1, total1 = _cpu_times()
        if total1 == total0 or (idle1 - idle0) / (total1 - total0) >= SETTLE_IDLE:
            break
        idle0, total0 = idle1, total1
    return time.monotonic() - start


def run_measured(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    sync_first: bool = True,
) -> Sample:
    """Run `argv` once, timing the whole command; never raises for a failing command."""
    if sync_first:
        os.sync()
        settle()
    with tempfile.NamedTemporaryFile("r", prefix="bench-rss-", suffix=".txt") as rss_file:
        if os.access(GNU_TIME, os.X_OK):
            wrapped = [GNU_TIME, "-f", "%M", "-o", rss_file.name, *argv]
        else:
            wrapped = [sys.executable, "-c", _WRAPPER, rss_file.name, *argv]
        start = time.perf_counter()
        try:
            # Its own session, so a timeout or ^C can end the command's whole process group
            # (killing only /usr/bin/time would leave the command running).
            proc = subprocess.Popen(
                wrapped,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        except OSError as exc:
            return Sample(tuple(argv), 0.0, -1, "", f"error: cannot run: {exc}", None)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, _ = proc.communicate()
            return Sample(
                tuple(argv),
                time.perf_counter() - start,
                -1,
                stdout,
                f"error: timed out after {timeout:.0f} s",
                None,
            )
        except BaseException:
            _kill_group(proc)
            proc.wait()
            raise
        seconds = time.perf_counter() - start
        rss = _parse_rss(Path(rss_file.name).read_text())
    return Sample(tuple(argv), seconds, proc.returncode, stdout, stderr, rss)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the process group we started for `proc`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _parse_rss(text: str) -> int | None:
    """The last integer line (GNU time writes 'Command exited with non-zero status' first)."""
    for line in reversed(text.splitlines()):
        if line.strip().isdigit():
            return int(line.strip())
    return None
