"""Daemon fixtures: `datamover serve` as a real subprocess on a free loopback port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.fixtures_sites import MakeSite, SiteEnv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Daemon:
    """A running `datamover serve` for one site."""

    env: SiteEnv
    url: str
    proc: subprocess.Popen[str]
    log_path: str
    tokens: dict[tuple[str, str, tuple[str, ...]], str] = field(default_factory=dict)

    def token(self, tenant: str = "t1", prefix: str = "/proj", *scopes: str) -> str:
        """A token created by `datamover token create`; the same one again for the same
        arguments (a command each time cost the suite a minute; a test that needs a token
        of its own, to revoke it say, runs the command itself)."""
        key = (tenant, prefix, scopes)
        if key not in self.tokens:
            self.tokens[key] = self._create_token(tenant, prefix, *scopes)
        return self.tokens[key]

    def _create_token(self, tenant: str, prefix: str, *scopes: str) -> str:
        proc = self.env.cli(
            "token",
            "create",
            "--tenant",
            tenant,
            "--prefix",
            prefix,
            *[a for s in (scopes or ("write",)) for a in ("--scope", s)],
            "--json",
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["token"]

    def request(
        self,
        method: str,
        path: str,
        token: str | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode()

    def wait(self, transfer_id: str, token: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, t = self.request("GET", f"/v1/transfers/{transfer_id}", token)
            assert status == 200, t
            if t["state"] in ("succeeded", "failed", "cancelled"):
                return t
            time.sleep(0.1)
        raise AssertionError(f"transfer {transfer_id} did not finish: {t}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout)
        return self.proc.returncode

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()


def start_daemon(env: SiteEnv, timeout: float = 60) -> Daemon:
    """Start `datamover serve` for `env` (whose config has [api] listen) and wait for it."""
    listen = next(
        line.split("=", 1)[1].strip().strip('"')
        for line in env.config_path.read_text().splitlines()
        if line.startswith("listen")
    )
    log_path = str(env.state.parent / f"serve-{time.monotonic_ns()}.log")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "datamover", "serve", "--config", str(env.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=environ,
        )
    daemon = Daemon(env, f"http://{listen}", proc, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}: {daemon.log()}")
        try:
            status, _ = daemon.request("GET", "/healthz")
            if status == 200:
                return daemon
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"serve did not answer: {daemon.log()}")


def with_token(env: SiteEnv, token: str) -> SiteEnv:
    """Give `env`'s CLI `token` through `[api] token_file` (the way a hook host is set up)."""
    token_file = env.state / "token"
    token_file.write_text(token)
    text = env.config_path.read_text().replace("[api]\n", f'[api]\ntoken_file = "{token_file}"\n')
    env.config_path.write_text(text)
    return env


StartSite = Callable[..., Awaitable[Daemon]]

MiB = 1 << 20


async def slow_site(served_site: StartSite, make_site: MakeSite) -> tuple[Daemon, str]:
    """A daemon with one worker whose stage of `/proj/slow` (12 MiB at 2 MiB/s) takes about
    6 s, and a write token for `/proj`."""
    a = await make_site("site-a", pack_size=MiB)
    (a.data / "slow").mkdir()
    for i in range(12):
        (a.data / "slow" / f"f{i}").write_bytes(os.urandom(MiB))
    a.cli_json("push", "/proj/slow")
    d = await served_site("site-b", api={"workers": 1}, bandwidth_limit=2 * MiB)
    return d, d.token("t1", "/proj", "write")


async def until_running(d: Daemon, token: str, transfer_id: str) -> None:
    """Wait (30 s at most) until the daemon runs `transfer_id`."""
    deadline = time.monotonic() + 30
    while d.request("GET", f"/v1/transfers/{transfer_id}", token)[1]["state"] != "running":
        assert time.monotonic() < deadline, f"{transfer_id} did not start"
        await asyncio.sleep(0.05)


@pytest.fixture
async def served_site(make_site: MakeSite) -> AsyncIterator[StartSite]:
    """`await served_site(name, **transfer)` -> a site with a running daemon (stopped after)."""
    daemons: list[Daemon] = []

    async def start(name: str, api: dict[str, Any] | None = None, **kw: Any) -> Daemon:
        settings = {"listen": f"127.0.0.1:{free_port()}", "lease_seconds": 10, **(api or {})}
        env = await make_site(name, api=settings, **kw)
        daemon = start_daemon(env)
        daemons.append(daemon)
        return daemon

    yield start
    for d in daemons:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
