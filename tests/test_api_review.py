"""Findings of a review of the REST API, the daemon and its client: a query parameter the
route does not take is refused, not ignored; a second `serve` on one SQLite catalog is
refused whatever its state directory; the client takes only the daemon's answers; a pin
names a version that exists; an IPv6 listen address binds; a dataset's versions are paged."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from datamover.config import listen_address, load_config
from datamover.errors import InvalidInput
from tests.fixtures_daemon import StartSite, free_port, with_token
from tests.fixtures_sites import MakeSite

SQLITE_ONLY = pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)


@SQLITE_ONLY  # no catalog question
async def test_an_unknown_query_parameter_is_a_400_and_releases_nothing(
    served_site: StartSite,
) -> None:
    # Before: `?tennant=t2` was ignored, so the admin released its own tenant's pin (200,
    # released 1), and `?stat=failed&limt=1` listed a page of 100 of every state.
    d = await served_site("site-b")
    admin = d.token("ops", "/", "admin")
    t2 = d.token("t2", "/proj", "write")
    for tok in (admin, t2):
        assert d.request("POST", "/v1/pins", tok, {"pin": "slurm-7", "path": "/proj/x"})[0] == 201
    s, body = d.request("DELETE", "/v1/pins/slurm-7?tennant=t2", admin)
    assert s == 400 and "unknown query parameter 'tennant'" in body["error"]["message"], body
    s, body = d.request("GET", "/v1/transfers?stat=failed&limt=1", admin)
    assert s == 400, body
    for target in (
        "/v1/transfers/tr-20240101T000000000000-00000000?wiat=5",
        "/v1/datasets?prefx=/proj",
        "/v1/replicas?limt=1",
        "/v1/datasets/proj/x/versions?verbose=1",
    ):
        s, body = d.request("GET", target, admin)
        assert s == 400 and "unknown query parameter" in body["error"]["message"], (target, body)
    s, body = d.request("POST", "/v1/pins?version=x", t2, {"pin": "p", "path": "/proj/x"})
    assert s == 400, body
    # one given twice: which counts is anyone's guess
    s, body = d.request("GET", "/v1/transfers?limit=1&limit=1000", admin)
    assert s == 400 and "appears twice" in body["error"]["message"], body
    # nothing was released: both tenants' pins are still there
    s, body = d.request("DELETE", "/v1/pins/slurm-7?tenant=t2", admin)
    assert (s, body["released"]) == (200, 1), body
    s, body = d.request("DELETE", "/v1/pins/slurm-7", admin)
    assert (s, body["released"]) == (200, 1), body


@SQLITE_ONLY  # no catalog question
async def test_numbers_in_the_query_take_ascii_digits_only(served_site: StartSite) -> None:
    # Before: int() and float() took a fullwidth `5` (U+FF15), `1_0` and ` 5`: 200.
    d = await served_site("site-b")
    token = d.token("t1", "/proj", "read")
    for query in ("limit=%EF%BC%95", "limit=1_0", "limit=%205", "limit=+5"):
        s, body = d.request("GET", f"/v1/transfers?{query}", token)
        assert s == 400 and "must be an integer" in body["error"]["message"], (query, body)
    transfer = "/v1/transfers/tr-20240101T000000000000-00000000"
    for query in ("wait=%EF%BC%95", "wait=1_0", "wait=inf", "wait=nan", "wait=%201"):
        s, body = d.request("GET", f"{transfer}?{query}", token)
        assert s == 400 and "seconds" in body["error"]["message"], (query, body)
    assert d.request("GET", "/v1/transfers?limit=5", token)[0] == 200
    s, body = d.request("GET", f"{transfer}?wait=0.1", token)
    assert s == 404, body


@SQLITE_ONLY  # a SQLite catalog's lock
async def test_a_second_serve_on_one_sqlite_catalog_is_refused_whatever_its_state_dir(
    served_site: StartSite, tmp_path: Path
) -> None:
    # Before: the only lock was serve.lock in the state directory, so a second `serve` with
    # another one (another account's default, DATAMOVER_SITE_STATE_DIR) started on the same
    # SQLite catalog.
    d = await served_site("site-b")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
    environ["DATAMOVER_SITE_STATE_DIR"] = str(tmp_path / "elsewhere")
    environ["DATAMOVER_API_LISTEN"] = f"127.0.0.1:{free_port()}"
    second = subprocess.Popen(
        [sys.executable, "-m", "datamover", "serve", "--config", str(d.env.config_path)],
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
    )
    try:
        _, stderr = second.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        second.kill()
        second.communicate()
        raise AssertionError("a second serve runs on the same SQLite catalog") from None
    assert second.returncode == 4, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "another datamover serve already uses" in lines[0], lines
    assert ".serve.lock" in lines[0]
    assert d.proc.poll() is None
    assert d.request("GET", "/healthz")[0] == 200


@SQLITE_ONLY  # a SQLite catalog's lock
async def test_serve_does_not_lock_through_a_symbolic_link(
    make_site: MakeSite, tmp_path: Path
) -> None:
    # Before: no lock beside the database was taken (nor refused through a link).
    a = await make_site("site-a", api={"listen": f"127.0.0.1:{free_port()}"})
    database = a.config.sqlite_file
    assert database is not None
    target = tmp_path / "victim"
    await asyncio.to_thread(Path(database + ".serve.lock").symlink_to, target)
    r = a.cli("serve")
    assert r.returncode == 8, r.stderr
    assert "is a symbolic link" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not target.exists()


class _Elsewhere(http.server.BaseHTTPRequestHandler):
    """Something else at `[api] url`: the `answer` of its class for every request."""

    answer: tuple[int, str, bytes] = (200, "text/html", b"<html>Welcome to nginx!</html>")

    def _any(self) -> None:
        status, kind, body = self.answer
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        if 300 <= status < 400:
            self.send_header("Location", "https://login.example/")
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _any

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _elsewhere(status: int, kind: str, body: bytes) -> Iterator[str]:
    handler = type("Handler", (_Elsewhere,), {"answer": (status, kind, body)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@SQLITE_ONLY  # no catalog question
@pytest.mark.parametrize(
    "answer",
    [
        (200, "text/html", b"<html>Welcome to nginx!</html>"),
        (302, "text/html", b""),
        (200, "application/json", b'{"status": "ok"}'),
    ],
    ids=["html", "redirect", "another-service-json"],
)
async def test_an_answer_that_is_not_the_daemons_is_named_not_taken_for_one(
    make_site: MakeSite, answer: tuple[int, str, bytes]
) -> None:
    # Before: any answer below 400 was taken for the daemon's, and reachable() took any 200:
    # transfer list/show/submit/cancel/watch, release, push and stage --wait exited 70
    # "internal error (TypeError ...)" or KeyError.
    with _elsewhere(*answer) as url:
        a = await make_site("site-a", api={"url": url})
        (a.data / "x").mkdir()
        commands = [
            ("transfer", "list"),
            ("transfer", "show", "tr-20240101T000000000000-00000000"),
            ("transfer", "cancel", "tr-20240101T000000000000-00000000"),
            ("transfer", "watch", "tr-20240101T000000000000-00000000"),
            ("transfer", "submit", "stage", "/proj/x"),
            ("release", "--pin", "job-1"),
            ("push", "/proj/x", "--daemon"),
            ("stage", "/proj/x", "--wait"),
        ]
        for args in commands:
            r = a.cli(*args)
            if answer[0] != 200 and args[0] in ("release", "push", "stage"):
                # /healthz's redirect: reachable() named it before too
                assert r.returncode == 2 and "check [api] url" in r.stderr, (args, r.stderr)
                continue
            assert r.returncode == 2, (args, r.stderr)
            assert "is [api] url the address of a datamover" in r.stderr, (args, r.stderr)
            assert r.stderr.count("\n") == 1, (args, r.stderr)


@SQLITE_ONLY  # no catalog question: the version is looked up in the store
async def test_a_pin_at_a_version_the_store_does_not_hold_is_a_404(
    served_site: StartSite, make_site: MakeSite
) -> None:
    # Before: stored with 201, and then another tenant's stage of the dataset was refused
    # as "held at version ... by another tenant's pin", a version no one can stage.
    a = await make_site("site-a")
    (a.data / "x").mkdir()
    (a.data / "x" / "f").write_bytes(b"one")
    pushed = a.cli_json("push", "/proj/x")["version"]
    d = await served_site("site-b")
    t1 = d.token("t1", "/proj", "write")
    missing = "20200101T000000.000000Z-nosite-00000000"
    pin = {"pin": "j1", "path": "/proj/x"}
    s, body = d.request("POST", "/v1/pins", t1, {**pin, "version": missing})
    assert s == 404 and missing in body["error"]["message"], body
    s, body = d.request("POST", "/v1/pins", t1, {**pin, "path": "/proj/y", "version": pushed})
    assert s == 404, body  # a version of another dataset
    s, body = d.request("POST", "/v1/pins", t1, {**pin, "version": pushed})
    assert (s, body["version"]) == (201, pushed), body
    s, body = d.request("POST", "/v1/pins", t1, {"pin": "j2", "path": "/proj/never"})
    assert s == 201, body  # without a version: allowed, as before
    # j1 holds /proj/x once, at the pushed version: the refused ones left nothing
    s, body = d.request("DELETE", "/v1/pins/j1", t1)
    assert body["released"] == 1, body


def test_a_bracketed_ipv6_listen_address_is_read_without_its_brackets(tmp_path: Path) -> None:
    # Before: `[::1]:8080` passed the config check and `serve` handed "[::1]" to
    # getaddrinfo, which cannot bind it; `::1:8080` passed too, with "::1" as the host.
    assert listen_address("[::1]:8080") == ("::1", 8080)
    assert listen_address("[::]:8080") == ("::", 8080)
    assert listen_address("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert listen_address("daemon.example:443") == ("daemon.example", 443)
    path = tmp_path / "site.toml"
    for bad in ("::1:8080", "[::1]", "[127.0.0.1]:80", "[::1:80", "host:0", "host:\uff18"):
        path.write_text(
            f'[site]\nname = "a"\n[store]\nbucket = "b"\n[api]\nlisten = {json.dumps(bad)}\n'
        )
        with pytest.raises(InvalidInput, match="in brackets"):
            load_config(path, env={})
    path.write_text('[site]\nname = "a"\n[store]\nbucket = "b"\n[api]\nlisten = "[::1]:8080"\n')
    assert load_config(path, env={}).api_url == "http://[::1]:8080"


def _ipv6_loopback_port() -> int | None:
    """A free port on ::1, or None when this host has no IPv6 loopback."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            return s.getsockname()[1]
    except OSError:
        return None


@SQLITE_ONLY  # no catalog question
async def test_serve_binds_a_bracketed_ipv6_listen_address(served_site: StartSite) -> None:
    # Before: "cannot listen on [::1]:...: Name or service not known (check [api] listen)".
    port = _ipv6_loopback_port()
    if port is None:
        pytest.skip("no IPv6 loopback here (the parsing test above still runs)")
    d = await served_site("site-b", api={"listen": f"[::1]:{port}"})
    assert d.url == f"http://[::1]:{port}"
    assert d.request("GET", "/healthz") == (200, {"status": "ok", "site": "site-b"})
    r = d.env.cli("transfer", "list")  # the CLI reaches it at http://[::1]:port too
    # The daemon's answer: it wants a token this command does not have.
    assert f"the daemon at http://[::1]:{port} needs a token" in r.stderr, r.stderr


@SQLITE_ONLY  # no catalog question
async def test_a_datasets_versions_come_in_pages(
    served_site: StartSite, make_site: MakeSite
) -> None:
    # Before: no limit nor cursor: every version in one answer (a dataset pushed every few
    # minutes grows it past the 16 MiB the client reads); `?limit=2` was ignored.
    a = await make_site("site-a")
    (a.data / "x").mkdir()
    pushed = []
    for i in range(5):
        (a.data / "x" / "f").write_bytes(b"v%d" % i)
        pushed.append(a.cli_json("push", "/proj/x")["version"])
    assert pushed == sorted(pushed)
    d = await served_site("site-b")
    token = d.token("t1", "/proj", "read")
    target = "/v1/datasets/proj/x/versions"
    seen: list[str] = []
    after = ""
    pages = 0
    while True:
        s, body = d.request("GET", f"{target}?limit=2{after}", token)
        assert s == 200 and body["errors"] == [], body
        assert len(body["versions"]) <= 2
        seen += [v["version"] for v in body["versions"]]
        pages += 1
        if body["next"] is None:
            break
        assert body["next"] == seen[-1]
        after = f"&after={body['next']}"
    assert seen == pushed and pages == 3
    s, body = d.request("GET", target, token)  # the default page holds them all
    assert [v["version"] for v in body["versions"]] == pushed and body["next"] is None
    s, body = d.request("GET", f"{target}?after={pushed[-1]}", token)
    assert (s, body["versions"], body["next"]) == (200, [], None), body
    # An empty `after` counts as absent, as in the other listings (a pager sending
    # `after=${next:-}` was refused on this route alone).
    s, body = d.request("GET", f"{target}?after=", token)
    assert s == 200 and [v["version"] for v in body["versions"]] == pushed, body
    s, body = d.request("GET", f"{target}?limit=5", token)  # full: a next, then an empty page
    assert body["next"] == pushed[-1], body
    for bad in ("after=x", "limit=0", "limit=10001"):
        s, body = d.request("GET", f"{target}?{bad}", token)
        assert s == 400, (bad, body)


@SQLITE_ONLY  # no catalog question
async def test_a_path_in_api_url_the_daemon_does_not_serve_is_named_not_taken_for_a_missing_id(
    served_site: StartSite,
) -> None:
    # Before: with `[api] url` at `/api` (the daemon serves at `/`), `transfer show`,
    # `cancel`, `submit` and `list` said "Not Found" (exit 3), as for a missing transfer.
    d = await served_site("site-b")
    token = d.token("t1", "/proj", "write")
    status, body = d.request("GET", "/v1/nowhere", token)
    assert status == 404 and body["error"]["code"] == "no_route", body
    assert "no API route GET /v1/nowhere" in body["error"]["message"], body
    status, body = d.request("GET", "/v1/transfers/tr-20240101T000000000000-00000000", token)
    assert status == 404 and body["error"]["code"] == "not_found", body  # a missing id still
    env = with_token(d.env, token)
    env.config_path.write_text(
        env.config_path.read_text().replace("[api]\n", f'[api]\nurl = "{d.url}/api"\n', 1)
    )
    for args in (
        ("transfer", "show", "tr-20240101T000000000000-00000000"),
        ("transfer", "cancel", "tr-20240101T000000000000-00000000"),
        ("transfer", "submit", "stage", "/proj/x"),
        ("transfer", "list"),
    ):
        r = env.cli(*args)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert "check [api] url (a path in it must be one a proxy strips" in r.stderr, (
            args,
            r.stderr,
        )
        assert r.stderr.count("\n") == 1, (args, r.stderr)


@SQLITE_ONLY  # no catalog question
async def test_an_authorization_header_given_twice_is_refused(served_site: StartSite) -> None:
    # Before: the first was taken silently, as a repeated query parameter no longer is.
    import http.client

    d = await served_site("site-b")
    token = d.token("t1", "/proj", "write")
    host, port = d.url.removeprefix("http://").rsplit(":", 1)
    for second in (token, "dm_other"):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.putrequest("GET", "/v1/transfers")
            conn.putheader("Authorization", f"Bearer {token}")
            conn.putheader("Authorization", f"Bearer {second}")
            conn.endheaders()
            resp = conn.getresponse()
            body = json.loads(resp.read())
        finally:
            conn.close()
        assert resp.status == 401, body
        assert body["error"]["message"] == "the Authorization header is given more than once"
    assert d.request("GET", "/v1/transfers", token)[0] == 200
