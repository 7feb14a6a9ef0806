#!/usr/bin/env python3
"""What `datamover db rebuild` buys a site new to a bucket, and what it costs.

Site A pushes a generated small-file tree. Site B, with a fresh catalog, pushes a `cp -a`
copy of it under a path of its own: it knows no chunk, so it uploads them all again. Site
C, also fresh, first runs `datamover db rebuild` (indexing every pack's chunks from the
store), then pushes another copy: only manifests go up. Each repetition uses a new bucket.
Every step is a whole command (`--json`), timed with its peak RSS.

    python bench/rebuild.py --files 20000 --repeat 3
    python bench/rebuild.py --files 200000 --pack-size 1 --repeat 1   # ~300 packs
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from measure import run_measured
from treegen import TreeShape, make_small_tree

from datamover.embedded import EmbeddedSeaweed


def _site(root: Path, name: str, seaweed: EmbeddedSeaweed, bucket: str, pack_mib: int) -> Path:
    """Write a site whose `/bench` is `root/data`; return its config file."""
    config = root / f"{name}.toml"
    config.write_text(
        f'[site]\nname = "{name}"\nstate_dir = "{root / (name + "-state")}"\n'
        f'catalog = "sqlite:///{root / (name + ".db")}"\n'
        f'[store]\nendpoint = "{seaweed.endpoint}"\nbucket = "{bucket}"\n'
        f'access_key = "{seaweed.access_key}"\nsecret_key = "{seaweed.secret_key}"\n'
        f'[namespace]\n"/bench" = "{root / "data"}"\n'
        f"[transfer]\npack_size = {pack_mib << 20}\n"
    )
    return config


def _run(*args: str, config: Path) -> tuple[float, dict[str, Any], int | None]:
    """Run `datamover ARGS --config CONFIG --json`; `(seconds, its JSON, peak RSS KiB)`."""
    sample = run_measured(
        [sys.executable, "-m", "datamover", *args, "--config", str(config), "--json"]
    )
    if not sample.ok:
        raise SystemExit(f"{' '.join(args)} failed: {sample.first_error_line()}")
    return sample.seconds, json.loads(sample.stdout), sample.peak_rss_kib


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=20_000, help="files of 4 KiB, 100 a directory")
    p.add_argument("--pack-size", type=int, default=32, metavar="MIB", help="site A's packs")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dm-rebuild-"))
    tree = work / "tree"
    if not tree.exists():
        print(f"generating {args.files} files ...", file=sys.stderr)
        make_small_tree(tree, TreeShape(dirs=max(1, args.files // 100), per_dir=100))
    rows: list[dict[str, Any]] = []
    with EmbeddedSeaweed(work / "seaweed") as seaweed:
        for rep in range(args.repeat):
            bucket = f"rebuild-{rep}"
            seaweed.create_bucket(bucket)
            run = work / f"run{rep}"
            sites = {n: run / n for n in "abc"}
            for root in sites.values():
                (root / "data").mkdir(parents=True)
                subprocess.run(["cp", "-a", str(tree), str(root / "data" / "t")], check=True)
            a, b, c = (_site(sites[n], n, seaweed, bucket, args.pack_size) for n in "abc")
            first_s, first, _ = _run("push", "/bench/t", config=a)
            # B and C push their copies under paths of their own: no parent to reuse from.
            (sites["b"] / "data" / "t").rename(sites["b"] / "data" / "tb")
            (sites["c"] / "data" / "t").rename(sites["c"] / "data" / "tc")
            cold_s, cold, _ = _run("push", "/bench/tb", config=b)
            rebuild_s, rebuilt, rebuild_rss = _run("db", "rebuild", config=c)
            warm_s, warm, _ = _run("push", "/bench/tc", config=c)
            again_s, again, _ = _run("db", "rebuild", config=c)
            assert again["packs_indexed"] == 0, again
            row = {
                "first_push_s": first_s,
                "first_uploaded": first["uploaded_bytes"],
                "unindexed_push_s": cold_s,
                "unindexed_uploaded": cold["uploaded_bytes"],
                "rebuild_s": rebuild_s,
                "rebuild_self_s": rebuilt["seconds"],
                "rebuild_rss_mib": (rebuild_rss or 0) / 1024,
                "packs": rebuilt["packs_indexed"],
                "chunks": rebuilt["chunks_indexed"],
                "index_bytes_read": rebuilt["bytes_read"],
                "indexed_push_s": warm_s,
                "indexed_uploaded": warm["uploaded_bytes"],
                "rebuild_again_s": again_s,
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            shutil.rmtree(run)
            seaweed.delete_bucket(bucket)
    m = {k: _median(rows, k) for k in rows[0]}
    print(
        f"{args.files:,} files of 4 KiB, site A's packs {args.pack_size} MiB, median of {len(rows)}"
    )
    print(
        f"first push at A:                {m['first_push_s']:.2f} s, "
        f"uploaded {m['first_uploaded'] / 2**20:.1f} MiB"
    )
    print(
        f"copy pushed at B (no index):    {m['unindexed_push_s']:.2f} s, "
        f"uploaded {m['unindexed_uploaded'] / 2**20:.1f} MiB"
    )
    print(
        f"db rebuild at C:                {m['rebuild_s']:.2f} s "
        f"(self-reported {m['rebuild_self_s']:.2f} s; {m['packs']:.0f} packs, "
        f"{m['chunks']:,.0f} chunks, {m['index_bytes_read'] / 2**20:.2f} MiB read, "
        f"peak RSS {m['rebuild_rss_mib']:.0f} MiB)"
    )
    print(
        f"copy pushed at C after rebuild: {m['indexed_push_s']:.2f} s, "
        f"uploaded {m['indexed_uploaded'] / 2**20:.2f} MiB "
        f"({m['indexed_uploaded'] / m['unindexed_uploaded']:.2%} of B's)"
    )
    print(f"db rebuild again (nothing new): {m['rebuild_again_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
