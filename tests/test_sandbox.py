"""`datamover sandbox`: a local S3 server that config/workstation.toml works against as it
is (but for the port a test picks), kept between runs, stopped by SIGTERM or Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from datamover.embedded import _free_ports

WORKSTATION = Path(__file__).parent.parent / "config" / "workstation.toml"


def _start(data: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "datamover", "sandbox", "--dir", str(data), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _ready(proc: subprocess.Popen[str]) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, f"sandbox ended: {proc.wait()} {proc.stderr.read() if proc.stderr else ''}"
        lines.append(line)
        if line.startswith("ready"):
            return lines
    raise AssertionError(f"sandbox not ready: {lines}")


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATAMOVER_", "AWS_"))}
    return subprocess.run(
        [sys.executable, "-m", "datamover", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        env={**env, "XDG_STATE_HOME": str(config.parent / "state")},
        timeout=120,
    )


def test_the_workstation_example_works_against_the_sandbox_across_restarts(
    tmp_path: Path,
) -> None:
    [port] = _free_ports(1)
    tree = tmp_path / "proj"
    (tree / "t").mkdir(parents=True)
    (tree / "t" / "f").write_text("hello\n")
    config = tmp_path / "site.toml"
    text = WORKSTATION.read_text()
    assert '"http://127.0.0.1:8333"' in text and '"/tmp/datamover/proj"' in text
    config.write_text(
        text.replace("127.0.0.1:8333", f"127.0.0.1:{port}").replace(
            "/tmp/datamover/proj", str(tree)
        )
    )
    data = tmp_path / "sandbox"
    proc = _start(data, port)
    try:
        said = _ready(proc)
        assert f"'http://127.0.0.1:{port}'" in "".join(said)
        pushed = _cli(config, "push", "/proj/t")
        assert pushed.returncode == 0, pushed.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        taken = socket.socket()
        taken.bind(("127.0.0.1", port))  # its port is free again, and now held here
        try:
            args = ["sandbox", "--dir", str(data), "--port", str(port)]
            refused = subprocess.run(
                [sys.executable, "-m", "datamover", *args],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert refused.returncode != 0 and refused.stderr.count("\n") == 1
            assert f"port {port} " in refused.stderr and "is taken" in refused.stderr
        finally:
            taken.close()
        proc = _start(data, port)  # the data was kept
        _ready(proc)
        listed = _cli(config, "ls", "/proj")
        assert listed.returncode == 0 and "/proj/t\n" in listed.stdout, listed.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
