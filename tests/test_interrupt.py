"""Ctrl-C: worker processes leave interrupts to the command, and a command leaves no
`pymp-*` directory behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from datamover.transfer import procpool
from tests.fixtures_sites import MakeSite, sigint_as_from_a_terminal


def test_worker_processes_ignore_sigint() -> None:
    # Ctrl-C signals the whole process group: a worker interrupted while it held the pool's
    # result-queue lock left it taken, and the command hung shutting the pool down.
    pool = procpool.start(2)
    try:
        handlers = {pool.submit(signal.getsignal, signal.SIGINT).result() for _ in range(4)}
    finally:
        pool.shutdown()
    assert handlers == {signal.SIG_IGN}


async def _push_with_workers(make_site: MakeSite, tmp: Path) -> subprocess.CompletedProcess[str]:
    """A CLI push of 3,000 files with two reader processes, under `TMPDIR=tmp`."""
    a = await make_site("site-a", read_workers=2)
    tree = a.data / "many"
    for d in range(10):
        (tree / f"d{d}").mkdir(parents=True)
        for f in range(300):
            (tree / f"d{d}" / f"f{f}").write_bytes(os.urandom(64))
    os.makedirs(tmp)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
    return subprocess.run(
        [sys.executable, "-m", "datamover", "push", "/proj/many", "--config", str(a.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "TMPDIR": str(tmp)},
    )


async def test_a_command_with_worker_processes_leaves_no_temporary_directory(
    make_site: MakeSite, tmp_path: Path
) -> None:
    # `os._exit` skipped multiprocessing's exit handler: every push or stage that started
    # its workers left a `pymp-*` directory (the fork server's socket) in $TMPDIR.
    tmp = tmp_path / "tmp"
    proc = await _push_with_workers(make_site, tmp)
    assert proc.returncode == 0, proc.stderr
    assert "read 3000 files" in proc.stdout
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_an_interrupted_command_with_json_prints_one_error_object(
    make_site: MakeSite,
) -> None:
    # Ctrl-C printed only the stderr line: a script reading --json's stdout got nothing,
    # where every other failure gives it {"error": ...}.
    import json
    import time

    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "big").mkdir()
    # A GET runs ahead of the limit by its size (up to 16 MiB) and the next waits it out.
    (a.data / "big" / "f").write_bytes(os.urandom(40 << 20))
    assert a.cli("push", "/proj/big").returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
    cfg = str(b.config_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "datamover", "stage", "/proj/big", "--json", "--config", cfg],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "DATAMOVER_TRANSFER_BANDWIDTH_LIMIT": str(1 << 20)},  # 40 s for 40 MiB
        preexec_fn=sigint_as_from_a_terminal,
    )
    time.sleep(3)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert json.loads(out) == {"error": {"code": "interrupted", "message": "interrupted"}}
    assert err.strip() == "datamover: error: interrupted"


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_a_command_with_workers_runs_under_a_long_tmpdir(
    make_site: MakeSite, tmp_path: Path
) -> None:
    # Before: the fork server's socket goes below $TMPDIR, and a path over 107 bytes is
    # too long for one: under a job's TMPDIR deep in a scratch file system every command
    # with workers failed, "AF_UNIX path too long" (exit 1).
    tmp = tmp_path / ("t" * 60) / ("u" * 60)
    proc = await _push_with_workers(make_site, tmp)
    assert proc.returncode == 0, proc.stderr
    assert "read 3000 files" in proc.stdout and proc.stderr == ""
    assert list(tmp.iterdir()) == []
