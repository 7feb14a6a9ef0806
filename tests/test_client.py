"""The daemon client the CLI and the staging hooks use: the CLI's daemon path loads no event
loop, HTTP library or database driver, keeps one connection, survives a daemon restart
between requests, and names a malformed `[api] url` in one line."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from datamover.catalog.queue_sql import T
from datamover.client import DaemonClient
from datamover.errors import InvalidInput, TransientError
from tests.fixtures_daemon import Daemon, StartSite, start_daemon, with_token
from tests.fixtures_sites import MakeSite
from tests.tls import self_signed

HEAVY = ("asyncio", "aiohttp", "sqlalchemy", "botocore", "aiobotocore")


def _imported(stderr: str) -> set[str]:
    """Top-level packages named by `python -X importtime`'s report on stderr."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def _timed_imports(d: Daemon, token: str, *args: str) -> tuple[dict[str, Any], set[str]]:
    """Run `datamover ARGS --wait --json` against daemon `d` under `-X importtime`; its
    JSON output and the top-level packages it imported."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
    argv = [sys.executable, "-X", "importtime", "-m", "datamover", *args, "--wait", "--json"]
    proc = subprocess.run(
        [*argv, "--config", str(d.env.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environ, "DATAMOVER_TOKEN": token},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout), _imported(proc.stderr)


async def test_stage_through_the_daemon_imports_nothing_heavy(
    served_site: StartSite, make_site: MakeSite
) -> None:
    a = await make_site("site-a")
    (a.data / "x").mkdir()
    for i in range(5):
        (a.data / "x" / f"f{i}").write_bytes(os.urandom(1000))
    a.cli_json("push", "/proj/x")
    d = await served_site("site-b")
    token = d.token("t1", "/proj", "write")
    result, imported = _timed_imports(d, token, "stage", "/proj/x")
    assert result["transfer"].startswith("tr-") and result["files"] == 5
    assert sorted((d.env.data / "x").iterdir()) == [d.env.data / "x" / f"f{i}" for i in range(5)]
    site = await d.env.open()
    try:
        async with site.catalog.engine.connect() as conn:
            key = await conn.scalar(select(T.c.idempotency_key).where(T.c.id == result["transfer"]))
    finally:
        await site.close()
    assert key is not None and key.startswith("cli-")  # so a resent POST is not queued twice
    assert "datamover" in imported and "http" in imported  # the report is what it seems
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


async def test_push_through_the_daemon_imports_nothing_heavy(served_site: StartSite) -> None:
    # The push command imported the push module (SQLAlchemy, botocore: most of a second on a
    # 2-core host) before asking the daemon, which then did all the work.
    d = await served_site("site-a")
    (d.env.data / "x").mkdir()
    for i in range(5):
        (d.env.data / "x" / f"f{i}").write_bytes(os.urandom(1000))
    token = d.token("t1", "/proj", "write")
    result, imported = _timed_imports(d, token, "push", "/proj/x")
    assert result["transfer"].startswith("tr-") and result["files"] == 5 and result["version"]
    assert "datamover" in imported and "http" in imported  # the report is what it seems
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


async def test_one_connection_survives_a_daemon_restart(served_site: StartSite) -> None:
    first = await served_site("site-b")
    token = first.token("t1", "/proj", "write")
    running = [first]

    def restart() -> None:
        running[-1].stop()
        running.append(start_daemon(first.env))  # same config, same port

    try:
        with DaemonClient(first.url, token) as client:
            assert client.reachable()
            assert client.call("GET", "/v1/transfers")["transfers"] == []
            sock = client._conn.sock if client._conn else None
            client.call("GET", "/v1/transfers", params={"limit": "5"})
            assert sock is not None and client._conn and client._conn.sock is sock  # kept
            restart()
            # The kept connection is dead now: a GET is sent again on a new one ...
            assert client.call("GET", "/v1/transfers")["transfers"] == []
            restart()
            # ... and so is a POST with an Idempotency-Key ...
            body = {"kind": "stage", "path": "/proj/nothing-here"}
            assert client.submit(body, key="k-1")["id"].startswith("tr-")
            restart()
            # ... but not one without: the dead connection might have delivered it.
            with pytest.raises(TransientError, match="unreachable"):
                client.submit(body)
            assert client.call("GET", "/healthz") is not None  # a new connection again
        assert client._conn is None
    finally:
        for daemon in running:
            daemon.stop()
    assert not client.reachable()  # nobody listens any more


async def test_a_daemon_of_another_site_is_refused_before_anything_is_sent(
    served_site: StartSite, make_site: MakeSite
) -> None:
    # Before, a config whose [api] url named another site's daemon pushed that site's tree
    # (published as that site's version) and exited 0.
    d = await served_site("site-b")
    token = d.token("t1", "/proj", "write")
    a = await make_site("site-a", api={"url": d.url})
    a.state.mkdir(parents=True, exist_ok=True)
    with_token(a, token)
    (a.data / "x").mkdir()
    (a.data / "x" / "f").write_text("site a's own file\n")
    for args in (
        ("push", "/proj/x"),
        ("stage", "/proj/x", "--wait"),
        ("transfer", "submit", "push", "/proj/x"),  # through `DaemonClient.call` alone
        ("transfer", "list"),
    ):
        proc = a.cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.splitlines() == [
            f"datamover: error: [api] url {d.url} is the daemon of site 'site-b', not of "
            "'site-a' ([site] name): check [api] url"
        ]
    assert d.request("GET", "/v1/transfers", token)[1]["transfers"] == []  # nothing sent
    with DaemonClient(d.url, token, site="site-b") as client:  # its own site: as before
        assert client.reachable()
    with DaemonClient(d.url, token) as client:  # a client that names no site: as before
        assert client.reachable()


async def test_catalog_commands_neither_load_nor_need_the_store(make_site: MakeSite) -> None:
    # `token create`, `pins` and a local `release` opened the whole site: the store client
    # (a third of a second of imports in each, a Slurm epilog's release among them) and its
    # configuration, which they do not use.
    a = await make_site("site-a")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    text = a.config_path.read_text()
    a.config_path.write_text(
        re.sub(r'endpoint = "[^"]*"', f'endpoint = "http://127.0.0.1:{closed}"', text)
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
    argv = [sys.executable, "-X", "importtime", "-m", "datamover"]
    outputs = []
    for args in (
        ["token", "create", "--tenant", "t1", "--prefix", "/proj", "--scope", "read"],
        ["pins", "/proj"],
        ["release", "--pin", "job-1", "--tenant", "t1", "--local"],
    ):
        proc = subprocess.run(
            [*argv, *args, "--json", "--config", str(a.config_path)],
            capture_output=True,
            text=True,
            timeout=120,
            env=environ,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        imported = _imported(proc.stderr)
        assert "sqlalchemy" in imported  # the report is what it seems
        assert not imported & {"aiohttp", "botocore", "aiobotocore"}, args
        outputs.append(json.loads(proc.stdout))
    assert outputs[0]["token"] and outputs[0]["scopes"] == ["read"]
    assert outputs[1] == {"prefix": "/proj", "pins": []}
    assert outputs[2] == {"pin": "job-1", "released": 0}


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://127.0.0.1:1", "expected http://HOST"),
        ("http://", "expected http://HOST"),
        ("http://127.0.0.1:99999", "is not a URL"),
        ("http://127.0.0.1:1/?x=1", "query"),
        # Before: these were "unreachable" (exit 6), retried by a job's prolog for an hour.
        ("http://a b:1", "space or a control character"),
        ("http://a\tb:1", "space or a control character"),
        # Before: the password was printed in every "unreachable" line.
        ("http://ops:s3cret@127.0.0.1:1", "must not carry a user or password"),
    ],
)
def test_a_malformed_url_is_named(url: str, says: str) -> None:
    with pytest.raises(InvalidInput, match=says) as refused:
        DaemonClient(url, None)
    assert "s3cret" not in str(refused.value)


async def test_a_malformed_url_is_one_line_from_the_cli(make_site: MakeSite) -> None:
    a = await make_site("site-a", api={"url": "ftp://127.0.0.1:1"})
    for args in (("transfer", "list"), ("stage", "/proj/x", "--wait"), ("release", "--pin", "j")):
        proc = a.cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "[api] url 'ftp://127.0.0.1:1'" in lines[0], proc.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_with_daemon_only_a_daemon_that_does_not_answer_is_exit_6(
    make_site: MakeSite,
) -> None:
    # A hook host's config names only the daemon: the in-process fallback failed for lack
    # of store credentials (exit 7), which the Slurm prolog does not retry.
    a = await make_site("site-a", api={"url": f"http://127.0.0.1:{_free_port()}"})
    (a.data / "x").mkdir()
    for args in (
        ("stage", "/proj/x", "--wait", "--daemon"),
        ("push", "/proj/x", "--daemon"),
        ("release", "--pin", "j", "--daemon"),
    ):
        proc = a.cli(*args)
        assert proc.returncode == 6, (args, proc.stderr)
        assert "unreachable" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    pushed = json.loads(a.cli("push", "/proj/x", "--local", "--json").stdout)
    assert pushed["parent"] is None  # the push with --daemon published nothing
    proc = a.cli("stage", "/proj/x", "--daemon", "--local")
    assert proc.returncode == 2 and "choose one" in proc.stderr
    b = await make_site("site-b")
    proc = b.cli("stage", "/proj/x", "--daemon")
    assert proc.returncode == 2 and "no [api] url" in proc.stderr


async def test_a_healthz_answer_other_than_the_daemons_is_named(make_site: MakeSite) -> None:
    # A redirect (http -> https) or a proxy's 401 was taken for "no daemon": the CLI then
    # staged in-process, or the hook failed with an unrelated error.
    import http.server
    import threading

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(301)
            self.send_header("Location", "https://example.invalid/healthz")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        a = await make_site("site-a", api={"url": f"http://127.0.0.1:{server.server_port}"})
        for args in (("stage", "/proj/x", "--wait"), ("release", "--pin", "j", "--daemon")):
            proc = a.cli(*args)
            assert proc.returncode == 2, (args, proc.stderr)
            assert "answered HTTP 301" in proc.stderr and "[api] url" in proc.stderr
    finally:
        server.shutdown()
        server.server_close()


# -- what reaching the daemon failed on ---------------------------------------------------------


@contextlib.contextmanager
def _tls_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate whose `/healthz` answers
    200 `{"status": "ok"}`, as a daemon behind a TLS proxy would; its URL and certificate."""
    import http.server
    import ssl
    import threading

    cert, key = self_signed(tmp_path)

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "16")
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}')  # the daemon's: reachable() wants no other

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.handle_error = lambda *args: None  # type: ignore[method-assign]  # the refused handshakes
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_port}", cert
    finally:
        server.shutdown()
        server.server_close()


def test_a_certificate_that_fails_verification_is_invalid_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: "unreachable" (False from reachable(), TransientError from a request): the CLI
    # ran in-process, and a hook exited 6, which the Slurm prolog retries for an hour.
    with _tls_server(tmp_path) as (url, cert):
        with DaemonClient(url, None) as client, pytest.raises(InvalidInput) as info:
            client.reachable()
        assert str(info.value) == (
            f"[api] url {url}: the daemon's TLS certificate failed verification (self-signed "
            "certificate): check the URL's host name and the trusted CA certificates "
            "(SSL_CERT_FILE)"
        )
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusted: the same server answers
        with DaemonClient(url, None) as client:
            assert client.reachable()


def _silent_listener() -> socket.socket:
    """A socket that accepts connections (the kernel does) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


async def test_what_reaching_the_daemon_failed_on_is_in_the_one_line(
    tmp_path: Path, make_site: MakeSite
) -> None:
    # Before: a self-signed certificate and an unknown host were exit 6 ("unreachable",
    # retried by the prolog for an hour), and every exit 6 dropped its cause.
    refused = f"http://127.0.0.1:{_free_port()}"
    with _tls_server(tmp_path) as (tls, _), _silent_listener() as silent:
        quiet = f"127.0.0.1:{silent.getsockname()[1]}"
        cases = [
            (tls, 2, f"[api] url {tls}: the daemon's TLS certificate failed verification"),
            (refused, 6, f"datamover daemon at {refused} unreachable: [Errno 111] Connection"),
            (f"http://{quiet}", 6, f"datamover daemon at http://{quiet} unreachable: timed out"),
            (f"https://{quiet}", 6, f"datamover daemon at https://{quiet} unreachable: "),
        ]
        for n, (url, code, says) in enumerate(cases):
            a = await make_site(f"site-{n}", api={"url": url})
            for args in (
                ("stage", "/proj/x", "--wait", "--daemon"),
                ("release", "--pin", "j", "--daemon"),
                *([("stage", "/proj/x", "--wait")] if code == 2 else []),  # nor run here
            ):
                proc = a.cli(*args)
                assert proc.returncode == code, (url, args, proc.stderr)
                lines = proc.stderr.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith(f"datamover: error: {says}"), lines


async def test_an_unknown_host_is_invalid_input(make_site: MakeSite) -> None:
    host = "datamover-daemon.example.invalid"  # RFC 6761: never resolves
    try:
        socket.getaddrinfo(host, 8650)
    except socket.gaierror as exc:
        if exc.errno != socket.EAI_NONAME:
            pytest.skip(f"this host's resolver does not say EAI_NONAME of {host}: {exc}")
    a = await make_site("site-a", api={"url": f"http://{host}:8650"})
    for args in (("stage", "/proj/x", "--wait", "--daemon"), ("stage", "/proj/x", "--wait")):
        proc = a.cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr == (
            f"datamover: error: [api] url http://{host}:8650: unknown host '{host}' "
            "(Name or service not known)\n"
        )


def test_a_plain_http_server_at_an_https_url_is_invalid_input() -> None:
    # Another TLS failure no retry cures: before, "unreachable" and a local run or exit 6.
    import http.server
    import threading

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_port}"
    try:
        with DaemonClient(url, None) as client, pytest.raises(InvalidInput) as info:
            client.reachable()
    finally:
        server.shutdown()
        server.server_close()
    assert str(info.value).startswith(f"[api] url {url}: the TLS handshake failed (")


def test_a_name_that_resolved_before_and_now_does_not_is_waited_out() -> None:
    # A wait after a submission met a resolver's gap (split DNS, a VPN reconnecting) as an
    # unknown host, exit 2 at once; a name this client reached before is worth a retry.
    client = DaemonClient("http://daemon.example.invalid:8650", None)
    answers: list[Any] = [(200, b"{}"), socket.gaierror(socket.EAI_NONAME, "Name not known")]

    def exchange(*args: Any) -> tuple[int, bytes]:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[no-any-return]

    client._exchange = exchange  # type: ignore[method-assign]
    assert client.request("GET", "/healthz")[0] == 200
    with pytest.raises(TransientError, match="unreachable"):
        client.request("GET", "/v1/transfers/x")
    fresh = DaemonClient("http://daemon.example.invalid:8650", None)
    fresh._exchange = lambda *a: (_ for _ in ()).throw(  # type: ignore[method-assign]
        socket.gaierror(socket.EAI_NONAME, "Name not known")
    )
    with pytest.raises(InvalidInput, match="unknown host"):
        fresh.request("GET", "/healthz")  # never reached: the URL's to check


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)
async def test_a_command_without_a_token_says_which_setting_gives_it_one(
    served_site: StartSite,
) -> None:
    # Before: "a bearer token is required (Authorization: Bearer <token>)", an HTTP header
    # a CLI user never writes, from a stage that had worked until the daemon started.
    d = await served_site("site-a")
    for args in (["stage", "/proj/x"], ["transfer", "list"]):
        proc = d.env.cli(*args)
        assert proc.returncode == 9, proc.stderr
        assert proc.stderr.count("\n") == 1
        assert "needs a token and this command has none" in proc.stderr
        assert "[api] token_file" in proc.stderr and "Authorization" not in proc.stderr


def test_a_proxys_401_is_not_taken_for_the_daemons_want_of_a_token() -> None:
    # An OAuth gateway's {"error": "invalid_token"} was "the daemon needs a token".
    import http.server
    import threading

    class Gateway(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"error": "invalid_token"}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        with (
            DaemonClient(url, None) as client,
            pytest.raises(InvalidInput, match=r"is \[api\] url the address of a"),
        ):
            client.call("GET", "/v1/transfers")
    finally:
        server.shutdown()
        server.server_close()


def test_a_token_with_its_header_word_or_a_space_is_told_what_is_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token file holding `Bearer dm_...` had been told "the token may hold only
    printable ASCII characters", which a space is."""
    monkeypatch.delenv("DATAMOVER_TOKEN", raising=False)
    from datamover.client import load_token
    from datamover.config import load_config
    from datamover.errors import InvalidInput

    token_file = tmp_path / "token"
    config_path = tmp_path / "site.toml"
    config_path.write_text(
        '[site]\nname = "s"\n[store]\nbucket = "bkt"\n'
        f'[api]\nurl = "http://127.0.0.1:1"\ntoken_file = "{token_file}"\n'
    )
    config = load_config(config_path, env={})
    for text, says in (
        ("Bearer dm_abc\n", "give the token alone, without 'Bearer '"),
        ("dm_a b\n", "printable ASCII characters, no spaces"),
    ):
        token_file.write_text(text)
        with pytest.raises(InvalidInput, match=says):
            load_token(config)
    token_file.write_text("dm_abc\n")
    assert load_token(config) == "dm_abc"
