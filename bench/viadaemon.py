"""`run.py --via-daemon`: datamover's pushes and stages submitted to a running site daemon.

A deployed site runs `datamover serve`; its users' `datamover push` and `datamover stage`
(and a Slurm prolog's) then submit to it and wait, so a command costs the thin client's
start-up and the transfer in a process that is already warm, not a Python interpreter
importing SQLAlchemy and botocore. In this mode every timed datamover push or stage gets its
site's daemon started first, untimed, and left `SETTLE` seconds once ready (it creates its
store client and starts its fork server in that time, as a daemon in service has long done);
the command timed is the same `datamover push|stage ... --json` with the site's config now
naming the daemon (`[api] listen`), and a token. Its output must carry a transfer id: one
that fell back to running locally is an error, not a sample. The daemon is stopped after
the command, and its log scanned for errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

from harness import Bench
from serving import ServeProcess, create_token, daemon_config, free_listens
from tools import SiteFiles

SETTLE = 1.0


@contextlib.contextmanager
def through(b: Bench, site: SiteFiles, label: str) -> Iterator[tuple[SiteFiles, dict[str, str]]]:
    """`site` and the environment to run a datamover command with: as they are, or (with
    `b.via_daemon`) a config naming a running daemon of the site and a token for it.
    `serving.BenchError` if the daemon does not start."""
    if not b.via_daemon:
        yield site, b.dm.env()
        return
    listen = free_listens(1)[0]
    config = daemon_config(site, site.config.with_name(f"{site.name}-api.toml"), listen=listen)
    token = create_token(b.dm, config)
    b.daemon_logs.mkdir(parents=True, exist_ok=True)
    log_path = b.daemon_logs / f"{label.replace(' ', '-').replace('/', '-')}.log"
    served = ServeProcess.start(b.dm, config, listen, log_path)
    try:
        time.sleep(SETTLE)
        yield dataclasses.replace(site, config=config), {**b.dm.env(), "DATAMOVER_TOKEN": token}
    finally:
        served.stop()
        findings = served.findings()
        if findings.errors:
            b.results.problems.append(f"daemon {label}: {log_path}: {findings.summary()}")


def went_through(b: Bench, payload: dict[str, object]) -> bool:
    """Whether a command's JSON output shows it ran as it should: through the daemon (a
    transfer id) when `b.via_daemon`, always true otherwise."""
    return not b.via_daemon or "transfer" in payload
