"""`datamover demo`: the main job end to end on an embedded default, in a temporary directory.

Starts a SeaweedFS, configures two sites (SQLite catalogs) sharing one bucket, generates a
docking-like tree (many small text files, a larger file, a symlink) at site A, pushes it,
stages it at site B, verifies it there, pushes again unchanged, and prints a summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from datamover.config import Config, parse_config
from datamover.console import human_bytes
from datamover.embedded import EmbeddedSeaweed


def _site_config(root: Path, name: str, seaweed: EmbeddedSeaweed, bucket: str) -> Config:
    data = {
        "site": {"name": name, "state_dir": str(root / name / "state")},
        "store": {
            "endpoint": seaweed.endpoint,
            "bucket": bucket,
            "access_key": seaweed.access_key,
            "secret_key": seaweed.secret_key,
        },
        "namespace": {"/proj": str(root / name / "proj")},
    }
    return parse_config(data, f"demo:{name}", env={})


def generate_tree(root: Path, files: int, seed: int = 42) -> int:
    """Write `files` docking-like 4 KiB text files in directories of 100, plus a larger file
    and a symlink; return the bytes written."""
    rng = random.Random(seed)
    total = 0
    root.mkdir(parents=True, exist_ok=True)  # made by the first small file, if there is one
    for i in range(files):
        d = root / f"lig{i // 100:04d}"
        if i % 100 == 0:
            d.mkdir(parents=True, exist_ok=True)
        lines = [f"REMARK  ligand {i} pose 1 score {rng.uniform(-12, -3):.2f}\n"]
        while sum(map(len, lines)) < 4096:
            lines.append(
                f"ATOM  {rng.randint(1, 9999):5d}  C   LIG A   1    {rng.uniform(-50, 50):8.3f}"
                f"{rng.uniform(-50, 50):8.3f}{rng.uniform(-50, 50):8.3f}  1.00  0.00 C\n"
            )
        body = "".join(lines).encode()[:4096]
        (d / f"pose{i:06d}.pdbqt").write_bytes(body)
        total += len(body)
    big = root / "trajectory.bin"
    big.write_bytes(rng.randbytes(24 << 20))
    (root / "latest").symlink_to("trajectory.bin")
    return total + (24 << 20)


async def _run(root: Path, seaweed: EmbeddedSeaweed, files: int, say: Any) -> dict[str, Any]:
    from datamover.site import Site
    from datamover.transfer.push import push
    from datamover.transfer.stage import stage
    from datamover.transfer.verify import verify

    bucket = "datamover-demo"
    seaweed.create_bucket(bucket)
    for name in ("site-a", "site-b"):  # each site's namespace directory, as an operator makes
        (root / name / "proj").mkdir(parents=True, exist_ok=True)
    site_a = await Site.open(_site_config(root, "site-a", seaweed, bucket))
    site_b = await Site.open(_site_config(root, "site-b", seaweed, bucket))
    try:
        tree = root / "site-a" / "proj" / "docking" / "run1"
        say(f"generating {files} small files and a 24 MiB trajectory at site A ({tree})")
        size = await asyncio.to_thread(generate_tree, tree, files)
        pushed = await push(site_a, "/proj/docking/run1")
        say(
            f"site A pushed {pushed.files} files ({human_bytes(pushed.bytes)}) as version "
            f"{pushed.version}: uploaded {human_bytes(pushed.uploaded_bytes)} in "
            f"{pushed.seconds:.2f} s"
        )
        staged = await stage(site_b, "/proj/docking/run1")
        say(
            f"site B staged it at {root / 'site-b' / 'proj' / 'docking' / 'run1'}: downloaded "
            f"{human_bytes(staged.downloaded_bytes)} in {staged.seconds:.2f} s"
        )
        checked = await verify(site_b, "/proj/docking/run1")
        say(
            f"site B verify: {'OK' if checked.ok else 'MISMATCH'} "
            f"({checked.files_checked} files re-hashed)"
        )
        again = await push(site_a, "/proj/docking/run1")
        say(
            f"site A pushed again unchanged: uploaded {human_bytes(again.uploaded_bytes)} in "
            f"{again.seconds:.2f} s"
        )
        return {
            "files": pushed.files,
            "bytes": size,
            "version": pushed.version,
            "push_seconds": pushed.seconds,
            "uploaded_bytes": pushed.uploaded_bytes,
            "stage_seconds": staged.seconds,
            "downloaded_bytes": staged.downloaded_bytes,
            "verified": checked.ok,
            "repush_uploaded_bytes": again.uploaded_bytes,
            "repush_seconds": again.seconds,
        }
    finally:
        await site_a.close()
        await site_b.close()


@contextlib.contextmanager
def _interrupted_by_termination() -> Iterator[None]:
    """SIGTERM and SIGHUP (`timeout`, a CI job's limit, a closed terminal) unwind like
    Ctrl-C: the server the demo started runs in a process group of its own and its files
    are in a temporary directory, and only unwinding stops the one and removes the other."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (a caller embedding the demo)
        return
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _bypass_proxies_for_loopback() -> None:
    """Add the loopback addresses to `NO_PROXY` for this process: the demo's server is on
    127.0.0.1, which no proxy reaches, and a login node's `http_proxy` had every request
    sent to the proxy, so the demo failed after a minute blaming SeaweedFS."""
    # One list from both spellings, written to both: urllib prefers the lower-case one, so
    # a new `no_proxy` of the loopback addresses alone would hide the user's `NO_PROXY`.
    have: list[str] = []
    for name in ("no_proxy", "NO_PROXY"):
        for host in os.environ.get(name, "").split(","):
            if host.strip() and host.strip() not in have:
                have.append(host.strip())
    merged = ",".join([*have, *(h for h in _LOOPBACK if h not in have)])
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = merged


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def run_demo(files: int, quiet: bool = False) -> dict[str, Any]:
    """Run the demo in a temporary directory; return the summary."""

    def say(line: str) -> None:
        if not quiet:
            click.echo(line)

    started = time.monotonic()
    _bypass_proxies_for_loopback()
    with (
        _interrupted_by_termination(),
        tempfile.TemporaryDirectory(prefix="datamover-demo-") as tmp,
    ):
        root = Path(tmp)
        say("starting an embedded SeaweedFS (S3 on a free loopback port)")
        with EmbeddedSeaweed(data_dir=root / "seaweed") as seaweed:
            summary = asyncio.run(_run(root, seaweed, files, say))
    summary["seconds"] = round(time.monotonic() - started, 2)
    say(f"demo finished in {summary['seconds']:.1f} s")
    if not summary["verified"]:
        from datamover.errors import Corrupt

        raise Corrupt("demo: the staged tree does not match the pushed version")
    return summary
