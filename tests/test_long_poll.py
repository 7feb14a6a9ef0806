"""`GET /v1/transfers/{id}?wait=S`: held until the transfer ends, the time is up, or the
daemon stops; and the `Endings` wake-ups behind it."""

from __future__ import annotations

import asyncio
import json
import signal
import time

from aiohttp import web

from datamover.api.app import Context, make_app
from datamover.catalog.access import Access
from datamover.catalog.transfer_rows import Submission
from datamover.catalog.transfers import Transfers
from datamover.metrics import Metrics
from datamover.scheduler.endings import Endings, until
from tests.fixtures_daemon import Daemon, StartSite, free_port, slow_site
from tests.fixtures_sites import MakeSite

MiB = 1 << 20


async def test_endings_wake_only_their_transfer_and_clean_up() -> None:
    endings = Endings()
    with endings.watch("tr-1") as one, endings.watch("tr-2") as two:
        assert endings.waiting == 2
        endings.ended("tr-1")
        await until(one, 1.0)
        assert one.done() and not two.done()
        endings.ended("tr-1")  # nobody left waiting for it: harmless
    assert endings.waiting == 0
    with endings.watch("tr-3") as three:
        endings.close()
        assert three.done() and endings.closed


async def test_until_returns_after_the_time_without_the_end() -> None:
    endings = Endings()
    with endings.watch("tr-1") as waiter:
        started = time.monotonic()
        await until(waiter, 0.2)
        assert 0.15 < time.monotonic() - started < 5 and not waiter.done()


async def _get(d: Daemon, token: str, transfer_id: str, wait: str) -> tuple[float, int, dict]:
    started = time.monotonic()
    status, body = await asyncio.to_thread(
        d.request, "GET", f"/v1/transfers/{transfer_id}?wait={wait}", token
    )
    return time.monotonic() - started, status, body


async def test_long_poll_holds_then_answers_at_the_end(
    served_site: StartSite, make_site: MakeSite
) -> None:
    d, token = await slow_site(served_site, make_site)
    _, t = d.request("POST", "/v1/transfers", token, {"kind": "stage", "path": "/proj/slow"})
    _, queued = d.request("POST", "/v1/transfers", token, {"kind": "push", "path": "/proj/x"})

    # Held for the time asked while the transfer runs, then answered with its progress.
    seconds, status, body = await _get(d, token, t["id"], "1.5")
    assert status == 200 and body["state"] in ("queued", "running")
    assert seconds >= 1.4

    # A queued transfer cancelled meanwhile: the held request answers with the cancel.
    held = asyncio.create_task(_get(d, token, queued["id"], "50"))
    await asyncio.sleep(0.5)
    assert not held.done()
    status, _ = d.request("DELETE", f"/v1/transfers/{queued['id']}", token)
    assert status == 200
    seconds, status, body = await held
    assert status == 200 and body["state"] == "cancelled" and seconds < 20

    # Held until the stage ends, in one request.
    seconds, status, body = await _get(d, token, t["id"], "60")
    assert status == 200 and body["state"] == "succeeded", body
    assert seconds < 55
    # A terminal transfer is answered at once, whatever the wait.
    seconds, status, body = await _get(d, token, t["id"], "60")
    assert status == 200 and body["state"] == "succeeded" and seconds < 10


async def test_a_stopping_daemon_answers_held_polls(
    served_site: StartSite, make_site: MakeSite
) -> None:
    d, token = await slow_site(served_site, make_site)
    _, t = d.request("POST", "/v1/transfers", token, {"kind": "stage", "path": "/proj/slow"})
    held = asyncio.create_task(_get(d, token, t["id"], "60"))
    await asyncio.sleep(1.0)
    assert not held.done()
    started = time.monotonic()
    assert await asyncio.to_thread(d.stop, signal.SIGTERM) == 0
    seconds, status, body = await held
    assert status == 200 and body["state"] in ("queued", "running")  # drained, resumes later
    assert seconds < 30 and time.monotonic() - started < 30


async def test_bad_wait_is_a_400(served_site: StartSite) -> None:
    d = await served_site("site-b")
    token = d.token("t1", "/proj", "write")
    _, t = d.request("POST", "/v1/transfers", token, {"kind": "stage", "path": "/proj/absent"})
    for wait in ("-1", "61", "nan", "inf", "soon", ""):
        status, body = d.request("GET", f"/v1/transfers/{t['id']}?wait={wait}", token)
        assert status == 400 and "'wait'" in body["error"]["message"], (wait, body)
    status, body = d.request("GET", "/v1/transfers/tr-none?wait=5", token)
    assert status == 404


async def test_a_held_poll_answers_no_token_revoked_meanwhile(
    served_site: StartSite, make_site: MakeSite
) -> None:
    """The token is checked when the request arrives; a long poll answers up to 60 s later,
    and must not hand a transfer's state to a token revoked in between."""
    d, _ = await slow_site(served_site, make_site)
    proc = d.env.cli(
        "token", "create", "--tenant", "t1", "--prefix", "/proj", "--scope", "write", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    created = json.loads(proc.stdout)
    token = created["token"]
    _, t = d.request("POST", "/v1/transfers", token, {"kind": "stage", "path": "/proj/slow"})
    held = asyncio.create_task(_get(d, token, t["id"], "3"))
    await asyncio.sleep(0.5)
    # Revoked in this process, at once: a `token revoke` command could take longer than
    # the poll's 3 s to start on a loaded machine, and the poll would answer before it.
    site = await d.env.open()
    try:
        assert await Access(site.catalog.engine).revoke_token(created["id"])
    finally:
        await site.close()
    assert not held.done(), "the poll answered before the token was revoked"
    _, status, body = await held
    assert status == 401, body


async def test_a_poll_whose_client_went_away_stops_waiting(make_site: MakeSite) -> None:
    """A client that gives up (Ctrl-C on `transfer watch`, a job killed) closes its
    connection; its held request must stop re-reading the transfer every second then, not
    go on for the rest of its `wait`. In-process, to count the waiting requests."""
    env = await make_site("site-b")
    site = await env.open()
    transfers, access = Transfers(site.catalog.engine), Access(site.catalog.engine)
    ctx = Context(site, transfers, access, Metrics("site-b"), frozenset())
    runner = web.AppRunner(make_app(ctx), access_log=None, handle_signals=False)
    await runner.setup()
    port = free_port()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        secret, _ = await access.create_token("t1", ["/proj"], ["read"])
        row, _ = await transfers.submit(Submission(tenant="t1", kind="stage", path="/proj/x"))
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET /v1/transfers/{row.id}?wait=30 HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {secret}\r\n\r\n".encode()
        )
        await writer.drain()
        deadline = time.monotonic() + 10
        while ctx.endings.waiting == 0:
            assert time.monotonic() < deadline, "the request was never held"
            await asyncio.sleep(0.05)
        writer.close()
        await writer.wait_closed()
        deadline = time.monotonic() + 5
        while ctx.endings.waiting:
            assert time.monotonic() < deadline, "still waiting for a client that is gone"
            await asyncio.sleep(0.05)
    finally:
        await runner.cleanup()
        await site.close()
