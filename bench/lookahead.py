"""Walks over a slow file system, with names looked up ahead and without.

Mounts a generated tree through `slowfs.py` (each `lstat` answered after `--delay-ms`),
pushes it once, then runs a no-op push and a verify of it again and again, alternating
`[transfer] lookup_threads` between its default and 1 (never look ahead), and prints the
median of each. Direct commands, against one local SeaweedFS.

    python bench/lookahead.py --files 4000 --delay-ms 0.5 --repeat 3

Needs root (or FUSE for the user), `fusepy` and libfuse 2: see slowfs.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from treegen import TreeShape, make_small_tree

from datamover.embedded import EmbeddedSeaweed

BUCKET = "lookahead"
HERE = Path(__file__).parent


def _mount(source: Path, mountpoint: Path, delay: float) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "slowfs.py"), str(source), str(mountpoint), str(delay)]
    )
    deadline = time.monotonic() + 20
    while not os.path.ismount(mountpoint):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"slowfs.py did not mount {mountpoint} (exit {proc.poll()})")
        time.sleep(0.1)
    return proc


def _run(config: Path, threads: int, *args: str) -> tuple[float, dict[str, object]]:
    env = dict(os.environ, DATAMOVER_TRANSFER_LOOKUP_THREADS=str(threads))
    start = time.perf_counter()
    done = subprocess.run(
        ["datamover", *args, "--config", str(config), "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"datamover {' '.join(args)} failed: {done.stderr.strip()}")
    return wall, json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=4000, help="files, 100 a directory")
    parser.add_argument("--delay-ms", type=float, default=0.5, help="added to each lstat")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=16, help="lookup_threads measured")
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="datamover-lookahead-"))
    source, mnt = work / "source", work / "mnt" / "tree"
    make_small_tree(source, TreeShape(max(1, opts.files // 100), 100))
    mnt.mkdir(parents=True)
    with EmbeddedSeaweed(data_dir=work / "store") as seaweed:
        seaweed.create_bucket(BUCKET)
        config = work / "site.toml"
        config.write_text(
            f'[site]\nname = "slow"\ncatalog = "sqlite:///{work}/catalog.db"\n'
            f'state_dir = "{work}/state"\n'
            f'[store]\nendpoint = "{seaweed.endpoint}"\nbucket = "{BUCKET}"\n'
            f'access_key = "{seaweed.access_key}"\nsecret_key = "{seaweed.secret_key}"\n'
            f'[namespace]\n"/slow" = "{mnt.parent}"\n'
        )
        fuse = _mount(source, mnt, opts.delay_ms / 1000)
        try:
            _, first = _run(config, opts.threads, "push", "/slow/tree")
            if first["files"] != (opts.files // 100) * 100:
                raise SystemExit(f"the first push found {first['files']} files through FUSE")
            samples: dict[tuple[str, int], list[float]] = {}
            for rep in range(opts.repeat):
                order = (opts.threads, 1) if rep % 2 == 0 else (1, opts.threads)
                for threads in order:
                    wall, out = _run(config, threads, "push", "/slow/tree")
                    assert out["unchanged"], out
                    samples.setdefault(("no-op push, self-reported", threads), []).append(
                        float(out["seconds"])
                    )  # type: ignore[arg-type]
                    samples.setdefault(("no-op push, wall", threads), []).append(wall)
                    wall, out = _run(config, threads, "verify", "/slow/tree")
                    assert out["ok"], out
                    samples.setdefault(("verify, wall", threads), []).append(wall)
                print(f"repetition {rep + 1}/{opts.repeat} done", file=sys.stderr)
        finally:
            subprocess.run(["fusermount", "-u", str(mnt)], check=False)
            fuse.wait(timeout=10)
    print(f"{opts.files} files, {opts.delay_ms} ms added to each lstat, median of {opts.repeat}")
    print(f"| step | lookup_threads={opts.threads} | lookup_threads=1 | speed-up |")
    print("| --- | --- | --- | --- |")
    for step in ("no-op push, self-reported", "no-op push, wall", "verify, wall"):
        on, off = (
            statistics.median(samples[(step, opts.threads)]),
            statistics.median(samples[(step, 1)]),
        )
        print(f"| {step} | {on:.2f} s | {off:.2f} s | {off / on:.1f}x |")


if __name__ == "__main__":
    main()
