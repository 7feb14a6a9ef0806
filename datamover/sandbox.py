"""`datamover sandbox`: a local S3 server to try datamover with a site config of one's own.

It runs the SeaweedFS the `embedded` extra installs (as `datamover demo` does), in the
foreground until Ctrl-C or SIGTERM, on 127.0.0.1 only, with the keys and bucket that
`config/workstation.toml` names, so that file works against it as it is. The data stays in
its directory between runs. The keys are fixed and known: a sandbox, not a store to keep
anything in that matters.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

from datamover.embedded import EmbeddedSeaweed

PORT = 8333
ACCESS_KEY = "datamover"
SECRET_KEY = "datamover-secret"
BUCKET = "datamover"


def default_dir() -> Path:
    """`$XDG_DATA_HOME/datamover/sandbox`, else `~/.local/share/datamover/sandbox`."""
    base = os.environ.get("XDG_DATA_HOME")
    if base and Path(base).is_absolute():
        return Path(base, "datamover", "sandbox")
    return Path.home() / ".local" / "share" / "datamover" / "sandbox"


def run_sandbox(data_dir: Path, port: int, bucket: str, say: Callable[[str], None]) -> None:
    """Serve until SIGINT or SIGTERM; `say` gets the lines telling how to reach it (the
    last one once it is ready)."""
    stops = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # taken by sigwait below, not raised
    try:
        with EmbeddedSeaweed(
            data_dir=data_dir, access_key=ACCESS_KEY, secret_key=SECRET_KEY, s3_port=port
        ) as seaweed:
            seaweed.create_bucket(bucket)
            say(f"data:       {data_dir}")
            say(
                f"[store] endpoint = {seaweed.endpoint!r}, bucket = {bucket!r}, "
                f"access_key = {ACCESS_KEY!r}, secret_key = {SECRET_KEY!r}"
            )
            say("ready: Ctrl-C stops it")
            signal.sigwait(stops)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
