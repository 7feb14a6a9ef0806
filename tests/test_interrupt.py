"""Ctrl-C: worker processes leave interrupts to the command, and a command leaves no
`pymp-*` directory behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from datamover.transfer import procpool
from tests.fixtures_sites import MakeSite


def test_worker_processes_ignore_sigint() -> None:
    # Ctrl-C signals the whole process group: a worker interrupted while it held the pool's
    # result-queue lock left it taken, and the command hung shutting the pool down.
    pool = procpool.start(2)
    try:
        handlers = {pool.submit(signal.getsignal, signal.SIGINT).result() for _ in range(4)}
    finally:
        pool.shutdown()
    assert handlers == {signal.SIG_IGN}


async def test_a_command_with_worker_processes_leaves_no_temporary_directory(
    make_site: MakeSite, tmp_path: Path
) -> None:
    # `os._exit` skipped multiprocessing's exit handler: every push or stage that started
    # its workers left a `pymp-*` directory (the fork server's socket) in $TMPDIR.
    a = await make_site("site-a", read_workers=2)
    tree = a.data / "many"
    for d in range(10):
        (tree / f"d{d}").mkdir(parents=True)
        for f in range(300):
            (tree / f"d{d}" / f"f{f}").write_bytes(os.urandom(64))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
    proc = subprocess.run(
        [sys.executable, "-m", "datamover", "push", "/proj/many", "--config", str(a.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "TMPDIR": str(tmp)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "read 3000 files" in proc.stdout
    assert list(tmp.iterdir()) == []
