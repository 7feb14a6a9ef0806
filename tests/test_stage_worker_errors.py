"""An error a writer process raised after it made a directory writable (`writers.BatchFailed`)
reaches the stage with the worker's traceback as its cause (concurrent.futures attaches it as
a `_RemoteTraceback`), so `DATAMOVER_DEBUG=1` shows where in the worker it happened; without
it the CLI still prints one line.

Before: the error was raised `from None`, which dropped the worker's traceback: an
unexpected error in a writer process (exit 70) showed only the stage process's frames.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.fixtures_sites import MakeSite
from tests.test_stage_path_review import _tmpfs

#: Root without the capabilities that let it ignore file permissions: a writer process
#: makes the read-only dataset directory writable to write into it (`BatchFailed`).
UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_a_writer_process_error_keeps_the_workers_traceback(make_site: MakeSite) -> None:
    a = await make_site("site-a")
    b = await make_site("site-b", write_workers=2)
    (a.data / "ds").mkdir()
    for i in range(3000):  # enough files for writer processes
        (a.data / "ds" / f"f{i:04d}").write_bytes(os.urandom(4096))
    assert a.cli("push", "/proj/ds").returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
    command = [*UNPRIVILEGED, sys.executable, "-m", "datamover", "stage", "/proj/ds"]
    command += ["--config", str(b.config_path)]
    with _tmpfs(b.data, "2m"):
        root = b.data / "ds"
        root.mkdir()
        os.chmod(root, 0o555)
        debug = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=120,
            env={**env, "DATAMOVER_DEBUG": "1"},
        )
        assert debug.returncode != 0
        assert "No space left on device" in debug.stderr, debug.stderr[-4000:]
        # Before: only the stage process's frames; the worker's were dropped.
        assert "concurrent.futures.process._RemoteTraceback" in debug.stderr, debug.stderr[-4000:]
        assert "in write_batch" in debug.stderr, debug.stderr[-4000:]
        plain = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
        assert plain.returncode != 0
        assert plain.stderr.startswith("datamover: error: "), plain.stderr
        assert "No space left on device" in plain.stderr, plain.stderr
        assert plain.stderr.count("\n") == 1, plain.stderr  # one line, as ever
