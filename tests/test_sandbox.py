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
from tests.fixtures_sites import sigint_as_from_a_terminal

WORKSTATION = Path(__file__).parent.parent / "config" / "workstation.toml"


def _start(data: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "datamover", "sandbox", "--dir", str(data), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_as_from_a_terminal,
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
        assert f'endpoint = "http://127.0.0.1:{port}"\n' in said  # TOML to paste
        other = subprocess.run(  # a second sandbox on its directory
            [sys.executable, "-m", "datamover", "sandbox", "--dir", str(data), "--port", "9"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert other.returncode == 2  # --port 9: refused before anything
        other = subprocess.run(
            [
                sys.executable,
                "-m",
                "datamover",
                "sandbox",
                "--dir",
                str(data),
                "--port",
                str(_free_ports(1)[0]),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert other.returncode == 4 and other.stderr.count("\n") == 1, other.stderr
        assert "is in use by another datamover sandbox" in other.stderr
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
            assert refused.returncode == 4 and refused.stderr.count("\n") == 1
            assert f"port {port} " in refused.stderr and "is taken" in refused.stderr
            fresh = tmp_path / "fresh"  # a directory not made yet is not made for nothing
            args = ["sandbox", "--dir", str(fresh), "--port", str(port)]
            refused = subprocess.run(
                [sys.executable, "-m", "datamover", *args],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert refused.returncode != 0 and "is taken" in refused.stderr, refused.stderr
            assert not fresh.exists()
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


def test_a_bucket_s3_refuses_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    # Before: "internal error (ClientError ... InvalidBucketName)", exit 70, once weed ran.
    for bucket in ("ab", "Bad_Name", "192.168.1.1", "a..b"):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "datamover",
                "sandbox",
                "--dir",
                str(tmp_path / "sb"),
                "--bucket",
                bucket,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert f"--bucket {bucket!r}: an S3 bucket name is 3-63 characters" in proc.stderr
    assert not (tmp_path / "sb").exists()


def test_a_killed_sandbox_takes_its_server_with_it_and_a_relative_dir_works(
    tmp_path: Path,
) -> None:
    # Before: a SIGKILL (or a closed terminal) left weed running on the port, with the
    # fixed keys; and `--dir sb` failed (weed, running inside it, looked for sb/sb).
    [port] = _free_ports(1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "datamover", "sandbox", "--dir", "sb", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        _ready(proc)
        assert (tmp_path / "sb" / "sandbox.lock").exists()
        proc.kill()
        proc.wait(timeout=20)
        deadline = time.monotonic() + 20
        while not _free(port):
            assert time.monotonic() < deadline, "weed still holds the port"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_sandbox_whose_server_dies_ends_with_an_error(tmp_path: Path) -> None:
    """It ran on with nothing on its port, its server killed (`kill -9` of weed)."""
    [port] = _free_ports(1)
    proc = _start(tmp_path / "sb", port)
    try:
        _ready(proc)
        flag = f"-s3.port={port}".encode()
        weed = [
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and flag in _cmdline(p).split(b"\0")
        ]
        assert len(weed) == 1
        os.kill(weed[0], signal.SIGKILL)
        assert proc.wait(timeout=20) == 7
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert err.startswith("datamover: error: the sandbox's SeaweedFS stopped on its own")
        assert len(err.splitlines()) == 1 and str(tmp_path / "sb") in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _cmdline(proc_dir: Path) -> bytes:
    try:
        return (proc_dir / "cmdline").read_bytes()
    except OSError:  # a process that ended meanwhile
        return b""
