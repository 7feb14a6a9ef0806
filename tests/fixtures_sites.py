"""Site fixtures: configured sites sharing one real SeaweedFS bucket, each with its own catalog.

`make_site("a")` returns a `SiteEnv` whose config is also written to a TOML file, so a test
can drive the library in-process (`await env.open()`) or the real CLI in a subprocess
(`env.cli("push", "/proj/x")`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from datamover.config import Config, load_config
from datamover.site import Site


@dataclass
class SiteEnv:
    """One test site: its namespace root for `/proj`, state dir and config file."""

    name: str
    data: Path
    state: Path
    config_path: Path

    @property
    def config(self) -> Config:
        return load_config(self.config_path, env={})

    async def open(self) -> Site:
        return await Site.open(self.config)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run `datamover ARGS --config FILE` in a subprocess (never raises on exit codes)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
        return subprocess.run(
            [sys.executable, "-m", "datamover", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )

    def cli_json(self, *args: str) -> dict[str, Any]:
        """Run a command with `--json`; assert success; return the parsed object."""
        proc = self.cli(*args, "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)


MakeSite = Callable[..., Awaitable[SiteEnv]]


def _toml(value: Any) -> str:
    return json.dumps(value)  # TOML basic strings and integers are JSON-compatible


@pytest.fixture
async def make_site(tmp_path: Path, seaweed: Any, bucket: str, new_catalog: Any) -> MakeSite:
    """Factory of sites on the shared bucket; keyword arguments go to `[transfer]`."""

    async def make(
        name: str,
        bucket_name: str | None = None,
        api: dict[str, Any] | None = None,
        catalog: str | None = None,
        **transfer: Any,
    ) -> SiteEnv:
        root = tmp_path / name
        env = SiteEnv(name, root / "data", root / "state", root / "site.toml")
        env.data.mkdir(parents=True)
        lines = [
            "[site]",
            f"name = {_toml(name)}",
            f"catalog = {_toml(catalog or await new_catalog())}",
            f"state_dir = {_toml(str(env.state))}",
            "[store]",
            f"endpoint = {_toml(seaweed.endpoint)}",
            f"bucket = {_toml(bucket_name or bucket)}",
            f"access_key = {_toml(seaweed.access_key)}",
            f"secret_key = {_toml(seaweed.secret_key)}",
            "retry_attempts = 2",
            "[namespace]",
            f'"/proj" = {_toml(str(env.data))}',
            "[transfer]",
            *(f"{k} = {_toml(v)}" for k, v in transfer.items()),
            "[api]",
            *(f"{k} = {_toml(v)}" for k, v in (api or {}).items()),
        ]
        env.config_path.parent.mkdir(parents=True, exist_ok=True)
        env.config_path.write_text("\n".join(lines) + "\n")
        return env

    return make


def cli_unprivileged(env: SiteEnv, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI without the capabilities that let root ignore file permissions (skips the
    test where `setpriv` is missing and the tests run as root)."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv to drop root's capabilities")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
    env_vars = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "datamover", *args, "--config", str(env.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env_vars,
    )


def sigint_as_from_a_terminal() -> None:
    """`preexec_fn` of a child a test sends SIGINT to: SIGINT at its default and not
    blocked, whatever this process inherited or set, as a shell's Ctrl-C reaches a command.
    A test run started in the background of a non-interactive shell (`.ci/run &`) inherits
    SIGINT ignored, and so would every child: the interrupt then never arrives."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.fixture
def stages_end_after_a_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stages run in this test's process end 50 ms after their last write, as any but the
    smallest do: the time a stage records its tree as held from lies `ctimes.SLACK` before
    its end, and what it wrote within that is read once more by the next push (by
    design). A test of a few files asserting that a push after a stage reads nothing asks
    for this."""
    from datamover.transfer.stage import _Stager

    real_run = _Stager.run

    async def ends_later(self: _Stager) -> Any:
        result = await real_run(self)
        time.sleep(0.05)
        return result

    monkeypatch.setattr(_Stager, "run", ends_later)


@pytest.fixture
def segment_encodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The entry count of every manifest segment pushes in this test encode, in order (a
    segment reused whole is not encoded)."""
    from datamover.transfer import manifest_writer

    encoded: list[int] = []
    real_encode = manifest_writer.encode_segment

    def counting_encode(entries: list[Any]) -> bytes:
        encoded.append(len(entries))
        return real_encode(entries)

    monkeypatch.setattr(manifest_writer, "encode_segment", counting_encode)
    return encoded
