"""Worker processes start from a fork server that has loaded what they run."""

from __future__ import annotations

from datamover.transfer import procpool


def test_a_worker_starts_with_the_cli_and_the_jobs_loaded() -> None:
    """A worker runs the command's main module again as it starts (the `datamover`
    script imports the CLI): loaded in the fork server, that costs no import."""
    pool = procpool.start(1)
    try:
        loaded = pool.submit(eval, "set(__import__('sys').modules)").result(timeout=60)
    finally:
        pool.shutdown()
    assert set(procpool.PRELOAD) <= loaded
    assert "datamover.cli" in procpool.PRELOAD
