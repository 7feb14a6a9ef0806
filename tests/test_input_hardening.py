"""Input a user controls never reaches a URL, the catalog or a header unchecked: ids and pins
travel as exact path segments, times are converted to UTC and bounded, text with control
characters is refused, and environment problems end as one line, never "internal error"."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from datamover.catalog.access import Access
from datamover.catalog.models import Token
from datamover.domain.transfers import parse_time
from datamover.errors import CatalogError, InvalidInput
from tests.fixtures_daemon import StartSite, free_port, start_daemon, with_token
from tests.fixtures_sites import MakeSite, SiteEnv, cli_unprivileged
from tests.test_bad_input import fails


def cli_with(env: SiteEnv, extra: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`env.cli` with extra environment variables."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
    return subprocess.run(
        [sys.executable, "-m", "datamover", *args, "--config", str(env.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environ, **extra},
    )


async def pins_of(env: SiteEnv) -> list[str]:
    site = await env.open()
    try:
        return [p.pin for p in await Access(site.catalog.engine).pins()]
    finally:
        await site.close()


# -- the daemon receives exactly what the CLI was given -----------------------------------

ODD = ["job#1", "job?x=1", "a/b", "50%", "%2F", "..", ".", "job"]


async def test_pins_and_ids_are_sent_as_exact_path_segments(served_site: StartSite) -> None:
    d = await served_site("site-b")
    token = d.token("t1", "/proj", "write")
    with_token(d.env, token)
    for pin in [*ODD, "victim"]:
        status, body = d.request("POST", "/v1/pins", token, {"pin": pin, "path": "/proj/x"})
        assert status == 201, body
    for pin in ODD:
        released = d.env.cli("release", "--pin", pin, "--json")
        assert released.returncode == 0, (pin, released.stderr)
        assert json.loads(released.stdout) == {"pin": pin, "released": 1}
        assert pin not in await pins_of(d.env)
    assert await pins_of(d.env) == ["victim"]  # `job#1` did not release `job`, and so on

    for transfer_id in ["../pins/victim", "tr-x?y=1", "tr#1"]:
        for command in ("cancel", "show"):
            proc = d.env.cli("transfer", command, transfer_id, "--json")
            assert proc.returncode == 3, (transfer_id, proc.stderr)  # not found, no crash
            assert "Traceback" not in proc.stderr
    assert await pins_of(d.env) == ["victim"]


async def test_rest_answers_bad_text_with_400_not_500(served_site: StartSite) -> None:
    d = await served_site("site-b")
    token = d.token("t1", "/", "admin")
    for method, path in [
        ("GET", "/v1/transfers/%00"),
        ("DELETE", "/v1/transfers/a%01b"),
        ("GET", "/v1/transfers?after=%00"),
        ("GET", "/v1/transfers?prefix=%00"),
        ("GET", "/v1/datasets?prefix=/proj%00"),
        ("DELETE", "/v1/pins/%00"),
        ("DELETE", "/v1/pins/" + "p" * 201),
    ]:
        status, body = d.request(method, path, token)
        assert status == 400, (method, path, status, body)
        assert body["error"]["code"] == "invalid_input"
    for body in [
        {"kind": "stage", "path": "/proj/x", "pin": "\ud800"},
        {"kind": "stage", "path": "/proj/x", "pin": "a\x85b"},
        {"kind": "stage", "path": "/proj/x", "deadline": "0001-01-01T00:00:00Z"},
        {"kind": "stage", "path": "/proj/x", "deadline": "0001-01-01T00:30:00+01:00"},
    ]:
        status, err = d.request("POST", "/v1/transfers", token, body)
        assert status == 400, (body, status, err)
    status, err = d.request("POST", "/v1/pins", token, {"pin": "\udfff", "path": "/proj/x"})
    assert status == 400 and "pin" in err["error"]["message"]
    assert " 500 " not in d.log() and "unexpected error" not in d.log()


async def test_a_deadline_keeps_its_time_zone(served_site: StartSite) -> None:
    d = await served_site("site-b")
    token = d.token("t1", "/proj", "write")
    body = {"kind": "stage", "path": "/proj/x", "deadline": "2026-12-02T03:00:00+05:00"}
    status, t = d.request("POST", "/v1/transfers", token, body)
    assert status == 201 and t["deadline"] == "2026-12-01T22:00:00.000000Z", t
    status, t = d.request("GET", f"/v1/transfers/{t['id']}", token)
    assert t["deadline"] == "2026-12-01T22:00:00.000000Z"


# -- the CLI checks what it is given, locally too -----------------------------------------


async def test_the_cli_checks_pins_deadlines_tenants_keys_and_tokens(make_site: MakeSite) -> None:
    a = await make_site("site-a", api={"url": f"http://127.0.0.1:{free_port()}"})
    fails(a, "stage", "/proj/x", "--deadline", "garbage", "--local", code=2, says="--deadline")
    fails(a, "stage", "/proj/x", "--deadline", "0001-01-01T00:00:00", code=2, says="1970")
    fails(a, "stage", "/proj/x", "--pin", "a\tb", "--local", code=2, says="--pin contains")
    fails(a, "stage", "/proj/x", "--local", "--no-wait", code=2, says="choose one")
    fails(a, "push", "/proj/x", "--local", "--no-wait", code=2, says="choose one")
    fails(a, "release", "--pin", "a\nb", "--local", code=2, says="--pin contains")
    fails(a, "release", "--pin", "a", "--tenant", " ", "--local", code=2, says="--tenant must not")
    fails(a, "release", "--pin", "a", "--tenant", "x\ty", code=2, says="--tenant contains")
    fails(
        a,
        "token",
        "create",
        "--tenant",
        "x\ty",
        "--prefix",
        "/proj",
        "--scope",
        "read",
        code=2,
        says="--tenant contains",
    )
    fails(
        a,
        "transfer",
        "submit",
        "push",
        "/proj/x",
        "--idempotency-key",
        "a\nb",
        code=2,
        says="Idempotency-Key",
    )
    fails(a, "transfer", "submit", "stage", "/proj/x", "--pin", "\x7f", code=2, says="--pin")
    assert await pins_of(a) == []

    bad = cli_with(a, {"DATAMOVER_TOKEN": "dm_a\nb"}, "transfer", "list", "--json")
    assert bad.returncode == 2 and "DATAMOVER_TOKEN" in bad.stderr, bad.stderr
    token_file = a.state / "token"
    token_file.write_bytes(b"dm_\xff\xfe")
    text = a.config_path.read_text().replace("[api]\n", f'[api]\ntoken_file = "{token_file}"\n')
    a.config_path.write_text(text)
    fails(a, "transfer", "list", code=2, says="is not UTF-8")


async def test_an_admin_token_is_refused_a_prefix_it_would_not_keep_to(
    make_site: MakeSite,
) -> None:
    """An admin token covers every path whatever its prefixes: `token create --scope admin
    --prefix /proj/a` made one for every path, and said nothing."""
    a = await make_site("site-a")
    for args in (
        ("--prefix", "/proj/a", "--scope", "admin"),
        ("--prefix", "/", "--prefix", "/proj/a", "--scope", "admin"),
        ("--prefix", "/proj/a", "--scope", "read", "--scope", "admin"),
    ):
        fails(a, "token", "create", "--tenant", "ops", *args, code=2, says="--prefix /")
    made = a.cli_json("token", "create", "--tenant", "ops", "--prefix", "/", "--scope", "admin")
    assert made["prefixes"] == ["/"] and made["scopes"] == ["admin"]
    site = await a.open()
    try:
        async with site.catalog.engine.connect() as conn:
            assert await conn.scalar(select(func.count()).select_from(Token)) == 1
    finally:
        await site.close()


async def test_a_token_file_that_is_empty_or_not_a_regular_file_is_one_line(
    make_site: MakeSite,
) -> None:
    # Before: an empty one sent no token ("a bearer token is required", exit 9, as if the
    # user had given none); a FIFO made the CLI wait for a writer forever.
    a = await make_site("site-a", api={"url": f"http://127.0.0.1:{free_port()}"})
    a.state.mkdir(parents=True, exist_ok=True)
    token_file = a.state / "token"
    text = a.config_path.read_text().replace("[api]\n", f'[api]\ntoken_file = "{token_file}"\n')
    a.config_path.write_text(text)
    token_file.write_text(" \n")
    fails(a, "transfer", "list", code=2, says=f"the token file '{token_file}' is empty")
    token_file.unlink()
    os.mkfifo(token_file)
    proc = a.cli("transfer", "list", timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        f"datamover: error: the token file '{token_file}' is not a regular file (a FIFO, a "
        "socket or a device)\n"
    )


# -- environment problems are named, not "internal error" ---------------------------------


async def test_directories_that_cannot_be_created_are_named(
    make_site: MakeSite, tmp_path: Path
) -> None:
    a = await make_site("site-a")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    good = a.config_path.read_text()
    a.config_path.write_text(good.replace(f'"{a.state}"', f'"{blocker}/state"'))
    fails(a, "ls", code=2, says=f"state_dir '{blocker}/state' cannot be created")
    fails(a, "db", "upgrade", code=2, says="cannot be created: Not a directory")
    if "sqlite" in good:
        catalog = good.split('catalog = "')[1].split('"')[0]
        a.config_path.write_text(good.replace(catalog, f"sqlite:///{blocker}/sub/catalog.db"))
        fails(a, "ls", code=8, says=f"directory '{blocker}/sub' cannot be created")
    bad_url = "postgresql://postgres@127.0.0.1:99999/x"
    catalog = good.split('catalog = "')[1].split('"')[0]
    a.config_path.write_text(good.replace(catalog, bad_url))
    fails(a, "ls", code=2, says="port must be 1-65535")


async def test_a_config_file_that_is_not_utf8(make_site: MakeSite) -> None:
    a = await make_site("site-a")
    a.config_path.write_bytes(a.config_path.read_bytes() + b"# caf\xe9\n")
    fails(a, "ls", code=2, says="is not UTF-8 text")


async def test_serve_names_the_address_it_cannot_listen_on(make_site: MakeSite) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        a = await make_site("site-a", api={"listen": f"127.0.0.1:{port}"})
        fails(a, "serve", code=4, says=f"cannot listen on 127.0.0.1:{port}")
    good = a.config_path.read_text()
    for listen in ("no-such-host.invalid:8080", "192.0.2.1:8080"):
        a.config_path.write_text(good.replace(f"127.0.0.1:{port}", listen))
        fails(a, "serve", code=2, says=f"cannot listen on {listen}")


async def test_db_upgrade_refuses_a_newer_catalog(make_site: MakeSite) -> None:
    from sqlalchemy import text

    a = await make_site("site-a")
    site = await a.open()
    try:
        async with site.catalog.engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        await site.close()
    fails(a, "db", "upgrade", code=8, says="'9999', unknown to this datamover (is it newer?)")


async def test_db_upgrade_names_the_catalog_as_configured(
    make_site: MakeSite, new_catalog: Any
) -> None:
    # Before: "catalog sqlite+aiosqlite:////...", "catalog postgresql+asyncpg://...": the
    # driver datamover picks, not the URL the user wrote (which every other command names).
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    url = make_url(await new_catalog())
    if url.get_backend_name() == "postgresql":
        url = url.set(password="s3cret")  # the test server trusts; never to be shown
    a = await make_site("site-a", catalog=url.render_as_string(hide_password=False))
    site = await a.open()
    try:
        async with site.catalog.engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        await site.close()
    proc = a.cli("db", "upgrade")
    assert proc.returncode == 8, proc.stderr
    assert proc.stderr == (
        f"datamover: error: catalog {url.render_as_string(hide_password=True)} has schema "
        "revision '9999', unknown to this datamover (is it newer?); refusing to touch it\n"
    )
    assert "s3cret" not in proc.stderr


def _join_aiosqlite_threads() -> None:
    import threading

    for thread in threading.enumerate():
        if "_connection_worker_thread" in thread.name:
            thread.join(10)


def test_os_errors_and_catalog_outages_are_one_line(tmp_path: Path) -> None:
    """The CLI's last resort maps what the environment caused to a clear error."""
    import asyncio

    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from datamover.cli import _expected
    from datamover.errors import CatalogUnavailable, DatamoverError

    async def outage() -> Any:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/gone/catalog.db")
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:
            return exc
        finally:
            await engine.dispose()
            # aiosqlite's thread of the failed connection hands its last result to this loop:
            # let it finish before asyncio.run closes the loop under it.
            await asyncio.to_thread(_join_aiosqlite_threads)

    found = _expected(asyncio.run(outage()))
    assert isinstance(found, CatalogUnavailable) and found.exit_code == 6
    assert found.message.startswith("catalog unavailable: unable to open database file")
    try:
        (tmp_path / "missing" / "f").read_text()
    except OSError as exc:
        mapped = _expected(exc)
    assert type(mapped) is DatamoverError and mapped.exit_code == 1
    assert mapped.message == f"No such file or directory: '{tmp_path}/missing/f'"
    assert _expected(KeyError("x")) is None


def test_an_unexpected_error_is_one_line_even_when_its_text_is_not(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The last resort prints the first line of a library's error text (SQLAlchemy's run on
    with the statement and its parameters), in the text and in the JSON."""
    from datamover import cli

    def explode(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the first line\n[SQL: INSERT INTO t VALUES ($1)]\n[parameters: ('x',)]")

    monkeypatch.setattr(cli, "load_config", explode, raising=False)
    monkeypatch.setattr("datamover.config.load_config", explode)
    monkeypatch.setattr(cli, "_leave", lambda status: (_ for _ in ()).throw(SystemExit(status)))
    monkeypatch.delenv("DATAMOVER_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["datamover", "ls", "--json"])
    with pytest.raises(SystemExit) as ended:
        cli.main()
    out, err = capsys.readouterr()
    assert ended.value.code == 70
    assert err == (
        "datamover: error: internal error (RuntimeError: the first line); "
        "set DATAMOVER_DEBUG=1 for a traceback and report it\n"
    )
    assert json.loads(out)["error"] == {"code": "internal", "message": "the first line"}


async def test_a_catalog_this_user_may_not_write_is_a_catalog_error(make_site: MakeSite) -> None:
    """A catalog that refuses writes (a SQLite file of mode 0o444, a PostgreSQL database
    that is read-only, as a standby is) is no outage a retry cures: exit 8, one line naming
    the setting to check, not the retryable "catalog unavailable" nor an internal error."""
    a = await make_site("site-a")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "f").write_text("x\n")
    assert a.cli("ls").returncode == 0  # the catalog exists
    url = a.config.catalog_url
    if url.startswith("sqlite"):
        catalog = Path(url.removeprefix("sqlite:///"))
        for f in catalog.parent.glob(catalog.name + "*"):
            f.chmod(0o444)
        try:
            r = cli_unprivileged(a, "push", "/proj/ds")
        finally:
            for f in catalog.parent.glob(catalog.name + "*"):
                f.chmod(0o644)
        said = "attempt to write a readonly database"
    else:
        name = url.rsplit("/", 1)[1]
        await _psql(url, f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        try:
            r = a.cli("push", "/proj/ds")
        finally:
            await _psql(url, f'ALTER DATABASE "{name}" SET default_transaction_read_only = off')
        said = "read-only transaction"
    assert r.returncode == CatalogError.exit_code, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert said in r.stderr and "check [site] catalog" in r.stderr, r.stderr


async def _psql(url: str, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET default_transaction_read_only = off")
        await conn.execute(statement)
    finally:
        await conn.close()


async def test_an_api_url_of_something_else_is_named_not_taken_for_an_answer(
    make_site: MakeSite,
) -> None:
    """`[api] url` pointing at a server that is no datamover daemon: its 404 is not "not
    found" (exit 3, which a hook takes for a missing dataset) nor its 501 a bare exit 1."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        a = await make_site("site-a", api={"url": url})
        for args in (("transfer", "list"), ("transfer", "submit", "push", "/proj/x")):
            r = a.cli(*args)
            assert r.returncode == 2, (args, r.stderr)
            assert r.stderr.count("\n") == 1, r.stderr
            assert "without a datamover error: is [api] url the address of a datamover" in (
                r.stderr
            ), r.stderr
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "text",
    [
        "2026-W01-1T00:00:00Z",  # an ISO week date: was taken as 2025-12-29
        "2026-001T00:00:00Z",  # an ordinal date
        "2026-01-01 00:00",  # no seconds
        "20260101T000000Z",  # no separators
        "2026-01-01T00:00:00.1234567Z",  # seven digits: the last was silently cut off
        "2026-01-01T00:00:00+0100",  # an offset without its colon
        "2026-01-01T00:00:00Z junk",
    ],
)
def test_a_deadline_must_be_rfc_3339(text: str) -> None:
    with pytest.raises(InvalidInput, match="is not an RFC 3339 date-time"):
        parse_time(text, "deadline")


def test_rfc_3339_deadlines_are_taken() -> None:
    want = datetime(2026, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)
    for text in [
        "2026-01-01T00:00:00.5Z",
        "2026-01-01t00:00:00.500000z",
        "2026-01-01 01:00:00.5+01:00",
        "2026-01-01T00:00:00.5",  # no offset: UTC
    ]:
        assert parse_time(text, "deadline") == want, text


async def test_no_wait_without_a_daemon_is_refused(make_site: MakeSite) -> None:
    # It ran the whole transfer here and printed its result, where a script expected a
    # transfer id at once.
    a = await make_site("site-a")
    (a.data / "x").mkdir()
    fails(a, "push", "/proj/x", "--no-wait", code=2, says="--no-wait, but no [api] url")
    fails(a, "stage", "/proj/x", "--no-wait", code=2, says="--no-wait, but no [api] url")


async def test_a_repeated_idempotency_key_is_refused(served_site: StartSite) -> None:
    # The first was taken silently, where a repeated query parameter is refused.
    d = await served_site("site-b")
    token = d.token("t1", "/proj", "write")
    host, port = d.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"kind": "stage", "path": "/proj/x"}).encode()
    conn.putrequest("POST", "/v1/transfers")
    for name, value in [
        ("Authorization", f"Bearer {token}"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Idempotency-Key", "a"),
        ("Idempotency-Key", "b"),
    ]:
        conn.putheader(name, value)
    conn.endheaders(body)
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    conn.close()
    assert resp.status == 400, answer
    assert answer["error"]["message"] == "Idempotency-Key given more than once"
    assert d.request("GET", "/v1/transfers", token)[1]["transfers"] == []


async def test_a_probe_of_a_store_that_is_down_tries_once_and_logs_nothing(
    make_site: MakeSite,
) -> None:
    # Each /readyz (open to anyone) ran the store check through every retry: 1-2 s and four
    # warnings in the log per probe.
    env = await make_site("site-b", api={"listen": f"127.0.0.1:{free_port()}"})
    text = env.config_path.read_text()
    down = f'endpoint = "http://127.0.0.1:{free_port()}"'
    env.config_path.write_text(re.sub(r"^endpoint = .*$", down, text, flags=re.M))
    d = start_daemon(env)
    try:
        assert d.request("GET", "/healthz") == (200, {"status": "ok", "site": "site-b"})
        deadline = time.monotonic() + 60
        while "the store does not answer yet" not in d.log():  # the daemon's own check
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.1)
        before = d.log()
        for _ in range(3):
            started = time.monotonic()
            status, ready = d.request("GET", "/readyz")
            assert time.monotonic() - started < 1.5
            assert status == 503 and ready["checks"]["catalog"] == "ok", ready
            assert ready["checks"]["store"].startswith("error: "), ready
        assert d.log()[len(before) :] == ""
    finally:
        d.stop()


async def test_a_deadline_without_an_offset_is_the_users_local_time(
    served_site: StartSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It was taken as UTC: 08:00 typed in Tokyo was 17:00 there.
    d = await served_site("site-b")
    token = d.token("t1", "/proj", "write")
    with_token(d.env, token)
    monkeypatch.setenv("TZ", "Asia/Tokyo")  # the CLI's, a subprocess

    def deadline(when: str, *args: str) -> str:
        out = d.env.cli_json(*args, "--deadline", when)
        transfer_id = out.get("id") or out["transfer"]
        status, transfer = d.request("GET", f"/v1/transfers/{transfer_id}", token)
        assert status == 200, transfer
        return str(transfer["deadline"])

    tokyo = "2026-12-01T08:00:00"
    for args in (("transfer", "submit", "stage", "/proj/x"), ("stage", "/proj/x", "--no-wait")):
        assert deadline(tokyo, *args) == "2026-11-30T23:00:00.000000Z", args
    # An offset given is kept.
    utc = deadline("2026-12-01T08:00:00Z", "transfer", "submit", "stage", "/proj/x")
    assert utc == "2026-12-01T08:00:00.000000Z"


def test_a_usage_error_listing_choices_is_one_line() -> None:
    # Before: Click's "Missing option '--scope'. Choose from:" listed the choices one to a
    # line, four lines on stderr and a message with newlines in the JSON error.
    base = [sys.executable, "-m", "datamover", "token", "create", "--tenant", "t"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
    for extra in ((), ("--json",)):
        r = subprocess.run(
            [*base, "--prefix", "/proj", *extra], capture_output=True, text=True, env=env
        )
        assert r.returncode == 2, r.stderr
        assert r.stderr == (
            "datamover: error: Missing option '--scope'. Choose from: read, write, admin\n"
        ), r.stderr
        if extra:
            message = json.loads(r.stdout)["error"]["message"]
            assert message == "Missing option '--scope'. Choose from: read, write, admin"
    # A value the user gave keeps its spaces: only the line breaks go.
    r = subprocess.run(
        [*base, "--prefix", "/proj", "--scope", "re  ad"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 2 and "'re  ad' is not one of" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
