"""Benchmark datamover against s5cmd, rclone and tar on one local SeaweedFS.

    python bench/run.py [--repeat N] [--only WORKLOAD]... [--skip-scale] [--markdown FILE]

Prints a table of absolute times and ratios plus PASS/FAIL per target (see bench/README.md).
Exit status: 0 when every target passes, 1 when one fails, 2 when the store cannot start.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import platform
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from harness import FULL, QUICK, Bench, log, remove_tree, run_parts
from measure import rss_method
from report import raw_json, render_markdown, render_text
from s3admin import S3Target
from treegen import TreeShape
from viadaemon import SETTLE
from vmtune import settled_memory
from workloads import run_big, run_incremental, run_scale, run_small

WORKLOADS: dict[str, Callable[[Bench], None]] = {
    "small": run_small,
    "big": run_big,
    "incremental": run_incremental,
    "scale": run_scale,
}
DEFAULT_WORKDIR = Path(__file__).resolve().parent / "work"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help="trees, runs and the store's data (default: bench/work)",
    )
    p.add_argument("--repeat", type=int, default=3, help="runs of each timed step (median)")
    p.add_argument(
        "--scale-repeat",
        type=int,
        default=None,
        help="runs for the scale workload (default: --repeat)",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=sorted(WORKLOADS),
        metavar="WORKLOAD",
        help=f"run only this workload (repeatable): {', '.join(WORKLOADS)}",
    )
    p.add_argument("--skip-scale", action="store_true", help="leave out the scale workload")
    p.add_argument(
        "--scale-files",
        type=int,
        default=None,
        metavar="N",
        help="files in the scale workload, a multiple of 100 (default: 200,000; the targets "
        "hold at any size)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes to smoke-test the harness (targets are then meaningless)",
    )
    p.add_argument(
        "--no-vm-tune",
        action="store_true",
        help="leave a VM's free page reporting as it is (see bench/vmtune.py)",
    )
    p.add_argument(
        "--via-daemon",
        action="store_true",
        help="submit datamover's pushes and stages to a running site daemon, as a deployed "
        "site does (see bench/viadaemon.py); the scale workload still runs them directly",
    )
    p.add_argument("--markdown", type=Path, metavar="FILE", help="also write the report here")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every sample as JSON here")
    args = p.parse_args(argv)
    if args.repeat < 1 or (args.scale_repeat is not None and args.scale_repeat < 1):
        p.error("repetitions must be at least 1")
    if args.scale_files is not None and (args.scale_files < 100 or args.scale_files % 100):
        p.error("--scale-files must be a positive multiple of 100")
    return args


def selected(args: argparse.Namespace) -> list[str]:
    """Workloads to run, in the canonical order."""
    names = args.only or list(WORKLOADS)
    return [n for n in WORKLOADS if n in names and not (args.skip_scale and n == "scale")]


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def header(args: argparse.Namespace, bench: Bench, server_label: str) -> list[str]:
    """Lines describing the run: when, where, what was compared, how it was measured."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    sizes = bench.sizes
    return [
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"command: {shlex.join(['python', 'bench/run.py', *sys.argv[1:]])}",
        f"machine: {platform.node()}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}",
        f"store: SeaweedFS via {server_label} at {bench.target.endpoint}",
        f"sizes: small {sizes.small.files:,} x {sizes.small.size} B; big {sizes.big_bytes:,} B; "
        f"scale {sizes.scale.files:,} x {sizes.scale.size} B; incremental rewrites "
        f"{sizes.changed} files",
        f"repetitions: {bench.repeat} (scale {bench.scale_repeat}); peak RSS via {rss_method()}",
        "datamover: "
        + (
            "pushes and stages through a running site daemon (`--via-daemon`: started untimed, "
            f"settled {SETTLE:.0f} s; wall is the client command, self-reported the daemon's "
            "transfer; the scale workload runs directly)"
            if bench.via_daemon
            else "each command runs the transfer in its own process (`--local` behaviour)"
        ),
        *bench.check_tools(),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the selected workloads and print the report; return the exit status."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free / (1 << 30)
    if free < 30 and not args.quick:
        log(f"warning: only {free:.0f} GiB free under {work}; the full run needs about 30 GiB")

    from datamover.embedded import EmbeddedSeaweed

    store_dir = work / "seaweed"
    remove_tree(store_dir, many_files=False)
    server = EmbeddedSeaweed(data_dir=store_dir)
    log("starting SeaweedFS ...")
    try:
        server.start()
    except Exception as exc:  # the report is useless without a store: say why and stop
        log(f"error: SeaweedFS did not start: {exc}")
        return 2
    target = S3Target(server.endpoint, server.access_key, server.secret_key)
    sizes = QUICK if args.quick else FULL
    if args.scale_files is not None:  # 100 files a directory, as in the default shape
        sizes = dataclasses.replace(sizes, scale=TreeShape(args.scale_files // 100, 100))
    bench = Bench(work, target, args.repeat, args.scale_repeat or args.repeat, sizes)
    bench.via_daemon = args.via_daemon
    lines = header(args, bench, "datamover.embedded")
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        lines.append(stack.enter_context(settled_memory(not args.no_vm_tune)))
        stack.callback(remove_tree, store_dir, many_files=False)
        stack.callback(server.stop)  # callbacks run last-in first-out: stop, then remove
        stack.callback(bench.bury)
        run_parts(bench, [(n, functools.partial(WORKLOADS[n], bench)) for n in selected(args)])

    lines.append(
        "load average (1 min) at start / end: "
        f"{load_before[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    sys.stdout.write(render_text(bench.results, lines))
    if args.markdown:
        args.markdown.write_text(render_markdown(bench.results, lines))
        log(f"wrote {args.markdown}")
    if args.json:
        args.json.write_text(raw_json(bench.results, lines))
        log(f"wrote {args.json}")
    return 0 if all(t.passed for t in bench.results.targets) else 1


if __name__ == "__main__":
    sys.exit(main())
