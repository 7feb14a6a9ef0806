"""The example pod's release sidecar (deploy/kubernetes/example-job-pod.yaml), run as its
shell runs it on SIGTERM with a stand-in `datamover`: a daemon that does not answer (exit
6, a rollout) is asked again within the grace period, any other failure is not. Before: one
try, and the pin stayed until released by hand."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

_POD = Path(__file__).parent.parent / "deploy" / "kubernetes" / "example-job-pod.yaml"


def _sidecar_script() -> str:
    pod = yaml.safe_load(_POD.read_text())
    for container in pod["spec"]["initContainers"]:
        script = container.get("command", [])[-1]
        if "trap release" in script:
            return str(script)
    raise AssertionError("no release sidecar in the example pod")


@pytest.mark.parametrize(("answers", "calls"), [("6 6 0", 3), ("6 " * 10, 8), ("9", 1)])
def test_the_release_sidecar_retries_an_unreachable_daemon_only(
    tmp_path: Path, answers: str, calls: int
) -> None:
    fake = tmp_path / "datamover"
    log = tmp_path / "calls"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        f"n=$(wc -l < {log}); set -- {answers}\n"
        'shift $((n - 1)); exit "${1:-6}"\n'
    )
    fake.chmod(0o755)
    script = _sidecar_script()
    assert "/opt/datamover/bin/datamover" in script and "sleep 3" in script
    script = script.replace("/opt/datamover/bin/datamover", str(fake))
    script = script.replace("sleep 3", "sleep 0.01")
    errors = tmp_path / "stderr"
    with errors.open("w") as err_file:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", script],
            env={"POD_UID": "uid-1", "PATH": "/usr/bin:/bin"},
            stderr=err_file,
            start_new_session=True,  # its `sleep infinity` is ended with it below
        )
        try:
            time.sleep(0.3)  # the trap is set
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    err = errors.read_text()
    assert proc.returncode == 0
    lines = log.read_text().splitlines()
    assert len(lines) == calls and "--pin k8s-uid-1" in lines[0]
    assert ("release of k8s-uid-1 failed" in err) == (answers != "6 6 0")
