"""Plumbing for the daemon benchmark (`daemon.py`): site configs with an `[api]` section,
API tokens, `datamover serve` processes (started, awaited, stopped, their logs scanned),
throwaway PostgreSQL databases, and a small asyncio REST client.

Nothing here is timed; `daemon.py` owns the clocks.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from measure import last_json, run_measured
from tools import Datamover, SiteFiles, find_binary

TERMINAL = ("succeeded", "failed", "cancelled")
TENANT = "bench"


class BenchError(Exception):
    """A setup step failed (token, daemon start, database); the message says why."""


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_listens(count: int) -> list[str]:
    """`count` distinct `127.0.0.1:PORT` addresses, free right now."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return [f"127.0.0.1:{p}" for p in sorted(ports)]


def daemon_config(
    site: SiteFiles,
    dest: Path,
    *,
    listen: str,
    workers: int | None = None,
    catalog: str | None = None,
) -> Path:
    """Write `dest`: the site's config (from `Datamover.write_site`) plus `[site] catalog`
    when given and an `[api]` section on `listen` with `workers` transfer workers (None:
    leave the daemon's default). Returns `dest`."""
    text = site.config.read_text()
    if catalog is not None:
        text = text.replace("[site]\n", f'[site]\ncatalog = "{catalog}"\n', 1)
    text += f'[api]\nlisten = "{listen}"\n'
    if workers is not None:
        text += f"workers = {workers}\n"
    dest.write_text(text)
    return dest


def _cli(dm: Datamover, *args: str) -> dict[str, Any]:
    """Run an untimed `datamover ... --json` command; its JSON output, or `BenchError`."""
    sample = run_measured([*dm.argv0, *args, "--json"], dm.env(), sync_first=False, timeout=300)
    payload = last_json(sample.stdout)
    if not sample.ok or payload is None:
        raise BenchError(f"datamover {args[0]} {args[1]}: {sample.first_error_line()}")
    return payload


def create_token(dm: Datamover, config: Path, prefix: str = "/bench") -> str:
    """A write token for `prefix` in the catalog of `config` (creating the catalog)."""
    payload = _cli(
        dm,
        "token",
        "create",
        "--tenant",
        TENANT,
        "--prefix",
        prefix,
        "--scope",
        "write",
        "--config",
        str(config),
    )
    if not isinstance(payload.get("token"), str):
        raise BenchError(f"datamover token create printed no token: {payload}")
    return payload["token"]


def create_catalog(dm: Datamover, config: Path) -> None:
    """Create (migrate) the catalog of `config`, so a timed command does not pay for it."""
    _cli(dm, "db", "upgrade", "--config", str(config))


@dataclass
class LogFindings:
    """What a daemon log says went wrong: error lines and warning lines (first line each)."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """`N errors (first: ...)`, `M warnings (first: ...)`, or ''."""
        parts = []
        for name, lines in (("errors", self.errors), ("warnings", self.warnings)):
            if lines:
                parts.append(f"{len(lines)} log {name} (first: {lines[0][:160]})")
        return "; ".join(parts)


def scan_log(text: str) -> LogFindings:
    """Sort the daemon's JSON log lines by level; stray non-JSON lines (a traceback printed
    outside logging, a Python warning) count as errors when they look like one."""
    found = LogFindings()
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if isinstance(entry, dict):
            level = str(entry.get("level", ""))
            message = str(entry.get("message", ""))
            error = str(entry.get("error") or "").strip().splitlines()
            if error:
                message += f" [{error[-1]}]"
            if level in ("error", "critical"):
                found.errors.append(message)
            elif level == "warning":
                found.warnings.append(message)
        elif re.search(r"Traceback|Error|Exception", line):
            found.errors.append(line)
        else:
            found.warnings.append(line)
    return found


@dataclass
class ServeProcess:
    """One `datamover serve` we started, in its own session, logging to `log_path`."""

    config: Path
    url: str
    log_path: Path
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(
        cls, dm: Datamover, config: Path, listen: str, log_path: Path, timeout: float = 60.0
    ) -> ServeProcess:
        """Start the daemon and wait until `/readyz` answers 200 (catalog and store OK)."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [*dm.argv0, "serve", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dm.env(),
                start_new_session=True,
            )
        served = cls(config, f"http://{listen}", log_path, proc)
        try:
            served._wait_ready(timeout)
        except BaseException:
            served.stop(grace=5.0)
            raise
        return served

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"datamover serve exited {self.proc.returncode} at start-up "
                    f"(log: {self.log_path}): {self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:  # not listening yet, or 503 (urllib's HTTPError is an OSError)
                pass
            time.sleep(0.1)
        raise BenchError(f"datamover serve not ready after {timeout:.0f} s (log: {self.log_path})")

    def terminate(self) -> None:
        """Ask the daemon to drain and exit (SIGTERM), without waiting."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def stop(self, grace: float = 60.0) -> int | None:
        """SIGTERM (the daemon drains), then SIGKILL our process group after `grace` s."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def log_text(self) -> str:
        """Everything the daemon wrote."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 3) -> str:
        """The last lines of the log, joined for one message."""
        return " | ".join(self.log_text().strip().splitlines()[-lines:])

    def findings(self) -> LogFindings:
        """Errors and warnings in the log so far."""
        return scan_log(self.log_text())


def _first_line(text: str, default: str = "") -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else default


@dataclass(frozen=True)
class Postgres:
    """A PostgreSQL server for throwaway catalogs, driven with `psql`."""

    server: str  # postgresql://user@host:port, no database

    def _psql(self, sql: str) -> subprocess.CompletedProcess[str]:
        psql = find_binary("psql")
        if psql is None:
            raise BenchError("psql not found")
        return subprocess.run(
            [psql, f"{self.server}/postgres", "-v", "ON_ERROR_STOP=1", "-qAtc", sql],
            capture_output=True,
            text=True,
            timeout=120,
        )

    def unusable(self) -> str | None:
        """None when the server answers, else why not."""
        try:
            out = self._psql("SELECT 1")
        except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
            return str(exc)
        return None if out.returncode == 0 else _first_line(out.stderr, "psql failed")

    def create(self, name: str) -> str:
        """Create database `name` (dropping a leftover of that name); its catalog URL."""
        self.drop(name)
        out = self._psql(f'CREATE DATABASE "{name}"')
        if out.returncode != 0:
            raise BenchError(f"CREATE DATABASE {name}: {_first_line(out.stderr)}")
        return f"{self.server}/{name}"

    def drop(self, name: str) -> None:
        """Drop database `name`, ending any session still on it."""
        out = self._psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if out.returncode != 0:
            raise BenchError(f"DROP DATABASE {name}: {_first_line(out.stderr)}")


class RestError(Exception):
    """The daemon answered with an unexpected status."""


class RestClient:
    """The few calls of the daemon's REST API the benchmark needs (aiohttp, keep-alive)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, token: str) -> None:
        self.session = session
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"}

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        expect: tuple[int, ...] = (200,),
    ) -> Any:
        """One request; its JSON body, or `RestError` for another status."""
        async with self.session.request(
            method, self.url + path, json=body, params=params, headers=self.headers
        ) as resp:
            text = await resp.text()
            if resp.status not in expect:
                raise RestError(f"{method} {path}: HTTP {resp.status}: {text[:200]}")
            return json.loads(text) if text else None

    async def submit(self, kind: str, path: str) -> dict[str, Any]:
        """POST /v1/transfers; the new transfer."""
        result: dict[str, Any] = await self.call(
            "POST", "/v1/transfers", body={"kind": kind, "path": path}, expect=(201,)
        )
        return result

    async def get(self, transfer_id: str) -> dict[str, Any]:
        """GET /v1/transfers/{id}."""
        result: dict[str, Any] = await self.call("GET", f"/v1/transfers/{transfer_id}")
        return result

    async def list_all(self, state: str, prefix: str, limit: int = 1000) -> list[dict[str, Any]]:
        """Every transfer in `state` under `prefix`, following the `next` cursor."""
        rows: list[dict[str, Any]] = []
        params = {"state": state, "prefix": prefix, "limit": str(limit)}
        while True:
            page = await self.call("GET", "/v1/transfers", params=params)
            rows.extend(page["transfers"])
            if not page.get("next"):
                return rows
            params["after"] = page["next"]


def client_session(connections: int = 64) -> aiohttp.ClientSession:
    """A session for one benchmark step (create it inside the event loop that uses it)."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=120),
        connector=aiohttp.TCPConnector(limit=connections),
    )


def epoch(iso: str | None) -> float | None:
    """Seconds since the epoch of the daemon's `2026-11-29T18:15:00.123456Z` timestamps."""
    if not iso:
        return None
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
