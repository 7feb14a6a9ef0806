"""`datamover sandbox`: a local S3 server to try datamover with a site config of one's own.

It runs the SeaweedFS the `embedded` extra installs (as `datamover demo` does), in the
foreground until Ctrl-C, SIGTERM or SIGHUP (a closed terminal), on 127.0.0.1 only, with
the keys and bucket that `config/workstation.toml` names, so that file works against it as
it is. The data stays in its directory between runs; one sandbox at a time uses a
directory (`sandbox.lock`), and the server ends with the sandbox however it ends (a
SIGKILL too: `EmbeddedSeaweed(die_with_parent=True)`). The keys are fixed and known: a
sandbox, not a store to keep anything in that matters.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

from datamover.embedded import EmbeddedSeaweed, check_port_free
from datamover.errors import Busy, InvalidInput, PermanentError

PORT = 8333
ACCESS_KEY = "datamover"
SECRET_KEY = "datamover-secret"
BUCKET = "datamover"

#: S3's rules for a new bucket's name (what SeaweedFS enforces too): 3-63 characters of
#: lower-case letters, digits, dots and hyphens, a letter or digit at each end.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP = re.compile(r"\d+\.\d+\.\d+\.\d+")
_STOPS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def default_dir() -> Path:
    """`$XDG_DATA_HOME/datamover/sandbox`, else `~/.local/share/datamover/sandbox`."""
    base = os.environ.get("XDG_DATA_HOME")
    if base and Path(base).is_absolute():
        return Path(base, "datamover", "sandbox")
    return Path.home() / ".local" / "share" / "datamover" / "sandbox"


def check_bucket(name: str) -> str:
    """`name` if S3 takes it for a new bucket, else `InvalidInput` saying what it takes."""
    if not _BUCKET.fullmatch(name) or ".." in name or _IP.fullmatch(name):
        raise InvalidInput(
            f"--bucket {name!r}: an S3 bucket name is 3-63 characters of a-z, 0-9, '.' and "
            "'-', beginning and ending with a letter or digit, and not an IP address"
        )
    return name


@contextlib.contextmanager
def _only_sandbox(data_dir: Path) -> Iterator[None]:
    """Hold `data_dir/sandbox.lock` (made with the directory): `Busy` if another sandbox
    holds it."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(data_dir / "sandbox.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise PermanentError(f"cannot use {str(data_dir)!r}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"{str(data_dir)!r} is in use by another datamover sandbox") from None
        yield
    finally:
        os.close(fd)


def _prune_logs(data_dir: Path) -> None:
    """Remove the glog files earlier runs left (`weed.<host>.<user>.log.<level>...`)."""
    for path in data_dir.glob("weed.*.log.*"):
        with contextlib.suppress(OSError):
            path.unlink()


def run_sandbox(data_dir: Path, port: int, bucket: str, say: Callable[[str], None]) -> None:
    """Serve until SIGINT, SIGTERM or SIGHUP; `say` gets the lines telling how to reach it
    (the last one once it is ready). A stop asked while it starts stops the start."""
    data_dir = data_dir.absolute()
    check_bucket(bucket)
    for stop in (signal.SIGHUP, signal.SIGTERM):  # while it starts: as Ctrl-C, cleaned up
        signal.signal(stop, signal.default_int_handler)
    if not data_dir.exists():  # a taken port must not leave a new directory behind
        check_port_free(port)
    with _only_sandbox(data_dir):
        _prune_logs(data_dir)
        with EmbeddedSeaweed(
            data_dir=data_dir,
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            s3_port=port,
            die_with_parent=True,
        ) as seaweed:
            seaweed.create_bucket(bucket)
            signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)  # taken by sigwait, not raised
            try:
                say(f"data in {data_dir}; for a site config:")
                say("[store]")
                for key, value in (
                    ("endpoint", seaweed.endpoint),
                    ("bucket", bucket),
                    ("access_key", ACCESS_KEY),
                    ("secret_key", SECRET_KEY),
                ):
                    say(f'{key} = "{value}"')
                say("ready: Ctrl-C stops it")
                # Woken once a second to look at the server: one that died (killed, out of
                # memory, its disk full) ends the sandbox with an error, not a sandbox that
                # runs on with nothing on its port.
                while signal.sigtimedwait(_STOPS, 1.0) is None:
                    if not seaweed.running:
                        raise PermanentError(
                            f"the sandbox's SeaweedFS stopped on its own; its log: "
                            f"{seaweed.log_path}"
                        )
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)
