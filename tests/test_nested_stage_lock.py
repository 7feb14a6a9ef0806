"""Stages of datasets nested in one another (`/proj/ds` and `/proj/ds/sub` share a tree) do
not run together on one host: each waits for the other (`locks.lock_nested`), as the
daemon's queue keeps them apart. Siblings do not wait for each other. Each test here once
failed on the code before its fix: two `--local` stages (a job's prolog falling back when
the daemon is down) wrote one tree together."""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys

import pytest

from datamover.transfer.locks import tree_lock_path
from tests.fixtures_sites import MakeSite, SiteEnv
from tests.locking import held_lock, waits_at

_SQLITE_ONLY = pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)


async def _pushed(make_site: MakeSite) -> SiteEnv:
    """Site B, with /proj/ds (holding sub/) and /proj/ds/sub and /proj/other pushed at A."""
    a, b = await make_site("site-a"), await make_site("site-b")
    for rel in ("ds/sub", "other"):
        (a.data / rel).mkdir(parents=True)
        (a.data / rel / "f").write_text(f"{rel}\n")
    for dataset in ("/proj/ds/sub", "/proj/ds", "/proj/other"):
        assert a.cli("push", dataset).returncode == 0
    return b


def _start_stage(env: SiteEnv, dataset: str) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
    argv = [sys.executable, "-m", "datamover", "stage", dataset, "--local"]
    return subprocess.Popen(
        [*argv, "--config", str(env.config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
    )


async def _waits_while_held(env: SiteEnv, dataset: str, lock: str, op: int, says: str) -> None:
    """A stage of `dataset` waits while the tree lock of `lock` is held with `op` (as the
    stage of a nested dataset holds it), saying `says`, and completes once it is free."""
    with held_lock(tree_lock_path(env.state, lock), op):
        proc = _start_stage(env, dataset)
        try:
            await waits_at(proc, tree_lock_path(env.state, lock), "it ran beside a nested stage")
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    try:
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert says in err, err


@_SQLITE_ONLY
async def test_a_stage_below_waits_for_the_stage_above(make_site: MakeSite) -> None:
    b = await _pushed(make_site)
    await _waits_while_held(
        b,
        "/proj/ds/sub",
        "/proj/ds",
        fcntl.LOCK_EX,
        "a stage of '/proj/ds', above '/proj/ds/sub', is running; the stage waits",
    )
    assert (b.data / "ds" / "sub" / "f").read_text() == "ds/sub\n"


@_SQLITE_ONLY
async def test_a_stage_above_waits_for_the_stages_below(make_site: MakeSite) -> None:
    b = await _pushed(make_site)
    await _waits_while_held(
        b,
        "/proj/ds",
        "/proj/ds",
        fcntl.LOCK_SH,
        "a stage of a dataset below '/proj/ds' is running; the stage waits",
    )
    assert (b.data / "ds" / "f").exists() is False and (b.data / "ds" / "sub" / "f").exists()


@_SQLITE_ONLY
async def test_siblings_and_a_stage_after_them_do_not_wait(make_site: MakeSite) -> None:
    b = await _pushed(make_site)
    # A stage of /proj/ds holds /proj shared and /proj/ds exclusively: /proj/other goes on.
    with (
        held_lock(tree_lock_path(b.state, "/proj"), fcntl.LOCK_SH),
        held_lock(tree_lock_path(b.state, "/proj/ds"), fcntl.LOCK_EX),
    ):
        proc = _start_stage(b, "/proj/other")
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 0 and "waits" not in err, err
    # And every lock the stages took is free again.
    for path in ("/proj", "/proj/ds", "/proj/other"):
        with held_lock(tree_lock_path(b.state, path), fcntl.LOCK_EX):
            pass
