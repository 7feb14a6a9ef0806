"""SIGKILL in the middle of a push or a stage, then run again: it completes, sends nothing
twice, and no final path ever holds a partial or wrong file."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from datamover.catalog.engine import open_engine
from datamover.catalog.queries import Catalog
from datamover.chunking.pack import parse_pack
from tests.fixtures_sites import MakeSite, SiteEnv
from tests.treegen import snapshot

MiB = 1 << 20


def start(env: SiteEnv, *args: str) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
    return subprocess.Popen(
        [sys.executable, "-m", "datamover", *args, "--config", str(env.config_path), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
    )


def kill_when(proc: subprocess.Popen[str], ready, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before it could be killed: {proc.communicate()}"
        assert time.monotonic() < deadline, "never reached the kill point"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


async def chunk_count(env: SiteEnv) -> int:
    catalog = Catalog(await open_engine(env.config.catalog_url))
    try:
        return await catalog.count_chunks()
    finally:
        await catalog.close()


def write_files(root: Path, count: int, size: int) -> None:
    root.mkdir(parents=True)
    for i in range(count):
        (root / f"f{i:03d}.bin").write_bytes(os.urandom(size))


async def test_push_killed_and_rerun(make_site: MakeSite) -> None:
    # 1 MiB packs, 8 MiB/s: a 40-file push takes ~5 s, so the kill lands in the middle.
    a = await make_site(
        "site-a", pack_size=MiB, bandwidth_limit=8 * MiB, upload_concurrency=1, segment_entries=4
    )
    b = await make_site("site-b")
    write_files(a.data / "x", 40, MiB)
    proc = start(a, "push", "/proj/x")
    # The catalog indexes a pack's chunks only once the pack is stored.
    kill_when(proc, lambda: _indexed_chunks(a) >= 24)
    done_before = await chunk_count(a)
    assert 24 <= done_before < 40

    site = await a.open()
    try:
        assert await site.repo.latest("/proj/x") is None  # nothing published by the dead run
        for key in [o.key async for o in site.store.list("packs/")]:
            parse_pack(await site.store.get(key), bytes.fromhex(key.rsplit("/", 1)[1]))
    finally:
        await site.close()

    rerun = a.cli_json("push", "/proj/x")
    assert rerun["new_chunks"] == 40 - done_before  # nothing stored before is sent again
    assert rerun["files_read"] < 40  # checkpointed segments spared re-reading their files
    b.cli_json("stage", "/proj/x")
    assert snapshot(b.data / "x") == snapshot(a.data / "x")


def _indexed_chunks(env: SiteEnv) -> int:
    import sqlite3

    url = env.config.catalog_url
    if not url.startswith("sqlite"):
        return _pg_chunks(url)
    try:
        with sqlite3.connect(url.split(":///", 1)[1], timeout=1) as db:
            return db.execute("SELECT count(*) FROM chunks").fetchone()[0]
    except sqlite3.Error:
        return 0


def _pg_chunks(url: str) -> int:
    out = subprocess.run(
        ["psql", url, "-tAc", "SELECT count(*) FROM chunks"], capture_output=True, text=True
    )
    return int(out.stdout.strip() or 0) if out.returncode == 0 else 0


def final_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".dm-")]


async def test_stage_killed_and_rerun(make_site: MakeSite) -> None:
    a = await make_site("site-a", pack_size=MiB)
    b = await make_site("site-b", bandwidth_limit=6 * MiB, batch_bytes=MiB)
    src = a.data / "x"
    write_files(src, 24, MiB // 2)
    (src / "large.bin").write_bytes(os.urandom(24 * MiB))
    pushed = a.cli_json("push", "/proj/x")
    total = pushed["bytes"]

    proc = start(b, "stage", "/proj/x")
    target = b.data / "x"

    def partial() -> bool:
        """A large partial file is under way (small files' temporary names come and go)."""
        for p in target.glob(".dm-*.part"):
            with contextlib.suppress(FileNotFoundError):
                if p.stat().st_size > 4 * MiB:
                    return True
        return False

    kill_when(proc, lambda: target.exists() and len(final_files(target)) >= 6 and partial())

    # Every file at a final path is complete and right; the large one is only a partial.
    originals = {p.name: p.read_bytes() for p in src.iterdir()}
    for path in final_files(target):
        assert path.read_bytes() == originals[path.name], path
    assert not (target / "large.bin").exists()

    rerun = b.cli_json("stage", "/proj/x")
    assert rerun["downloaded_bytes"] < total * 0.9  # finished files and the partial were kept
    assert snapshot(target) == snapshot(src)
    assert list(target.glob(".dm-*")) == []
    verified = b.cli("verify", "/proj/x")
    assert verified.returncode == 0, verified.stdout
    assert json.loads(b.cli("stage", "/proj/x", "--json").stdout)["downloaded_bytes"] == 0


_POOL_THEN_DIE = """
import os, signal, sys
from datamover.transfer import procpool
pool = procpool.start(2)
pool.submit(procpool._ready).result()
with open(sys.argv[1], "w") as f:
    f.write(" ".join(str(pid) for pid in pool._processes))
os.kill(os.getpid(), signal.SIGKILL)
"""


def _running(pid: int) -> bool:
    """Whether `pid` is a process that has not ended (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_worker_processes_end_with_a_killed_command(tmp_path: Path) -> None:
    # A push's readers or a stage's writers outlived a SIGKILL of the command (the OOM
    # killer, `kill -9`): they waited for jobs for ever, keeping the fork server alive, and
    # both held the command's stdout open, so a script reading it hung.
    pids_file = tmp_path / "pids"
    proc = subprocess.Popen(
        [sys.executable, "-c", _POOL_THEN_DIE, str(pids_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    pids: list[int] = []
    try:
        proc.communicate(timeout=20)  # the output ends: nothing holds the pipes any more
        assert proc.returncode == -signal.SIGKILL
        pids = [int(p) for p in pids_file.read_text().split()]
        assert len(pids) == 2
        deadline = time.monotonic() + 10
        while any(_running(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_running(p) for p in pids)
    finally:
        if not pids and pids_file.exists():
            pids = [int(p) for p in pids_file.read_text().split()]
        for pid in pids:  # what an unfixed pool left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
