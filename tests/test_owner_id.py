"""Who owns a piece of work (`owner_id`) and whether it still runs (`owner_alive`): a
process in a PID namespace of its own (a container) is named with that namespace, and one
of another namespace cannot be checked from here, so it counts as alive, as one of another
host does. Each test here once failed on the code before its fix."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from datamover.catalog.queries import owner_alive, owner_id

_IN_NEW_NAMESPACE = ["unshare", "--pid", "--fork", "--mount-proc"]
_PRINT_OWNER = "from datamover.catalog.queries import owner_id; print(owner_id())"


def _in_a_container(code: str) -> str:
    """What `code` prints, run as PID 1 of a new PID namespace (needs root: CI runs so)."""
    proc = subprocess.run(
        [*_IN_NEW_NAMESPACE, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_a_process_of_the_hosts_namespace_is_host_and_pid() -> None:
    assert owner_id() == f"{socket.gethostname()}:{os.getpid()}"
    assert owner_alive(owner_id()) and owner_alive(f"{owner_id()}/w0")


def test_a_dead_process_of_this_host_is_dead() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    assert not owner_alive(f"{socket.gethostname()}:{done.stdout.strip()}/w1")


def test_a_killed_process_its_parent_has_not_reaped_is_dead() -> None:
    # Before: `os.kill(pid, 0)` succeeds on a zombie, so a push killed under a parent that
    # reaps late (a shell's `timeout -s KILL`; a container whose first process never
    # reaps) held its dataset against the rerun: "a push ... is already running".
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert owner_alive(f"{socket.gethostname()}:{proc.pid}")
        proc.kill()
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
        assert os.path.exists(f"/proc/{proc.pid}")
        assert not owner_alive(f"{socket.gethostname()}:{proc.pid}")
    finally:
        proc.kill()
        proc.wait()


def test_two_containers_with_one_host_name_have_two_owner_ids() -> None:
    # Before: both were `host:1`, so a daemon starting in one took the other's running
    # transfers for its own dead predecessor's (`daemon._dead_owner`) and ran them again.
    # The two run at once, as two daemons do: a namespace made after another one ended may
    # get its number again (the first run of this test saw that once).
    waits = _PRINT_OWNER + "; import sys; sys.stdout.flush(); sys.stdin.read()"
    first_proc = subprocess.Popen(
        [*_IN_NEW_NAMESPACE, sys.executable, "-c", waits],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert first_proc.stdout is not None
        first = first_proc.stdout.readline().strip()
        second = _in_a_container(_PRINT_OWNER)
    finally:
        first_proc.communicate(timeout=60)
    host = socket.gethostname()
    assert first.startswith(f"{host}:1@") and second.startswith(f"{host}:1@")
    assert first != second


def test_a_process_of_another_namespace_is_not_judged_from_here() -> None:
    # Before: its PID was looked up in this namespace, where it names another process or
    # none: a live container's work was taken for a dead one's (push checkpoints, stage
    # records, the daemon's requeue at start).
    inside = _in_a_container(_PRINT_OWNER)
    assert owner_alive(inside)
    assert owner_alive(inside.replace(":1@", ":999999@"))
    # And from inside a container, a process of the host's namespace cannot be checked.
    seen = _in_a_container(
        "from datamover.catalog.queries import owner_alive; "
        f"print(owner_alive({socket.gethostname() + ':999999'!r}))"
    )
    assert seen == "True"
