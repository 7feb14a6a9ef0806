#!/usr/bin/env python3
"""How long listing the packs takes: the store's ordered walk of `packs/` against
`reindex.pack_listing` (the 256 prefixes, 16 at once), directly and through a proxy that
holds every request back by `--delay-ms`, as a store across a WAN answers.

    python bench/listing.py --packs 1000 --delay-ms 20 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from datamover.chunking.pack import pack_key
from datamover.embedded import EmbeddedSeaweed
from datamover.repo.reindex import pack_listing
from datamover.storage.s3 import S3Store


async def _delaying_proxy(upstream: str, delay: float) -> tuple[web.AppRunner, str]:
    """A proxy that forwards each request to `upstream` after `delay` seconds."""
    session = aiohttp.ClientSession(auto_decompress=False)

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        await asyncio.sleep(delay)
        headers = {k: v for k, v in request.headers.items() if k.lower() != "connection"}
        async with session.request(
            request.method, upstream + request.path_qs, headers=headers, data=body or None
        ) as up:
            data = await up.read()
            keep = [(k, v) for k, v in up.headers.items() if k.lower() not in _HOP]
            return web.Response(status=up.status, body=data, headers=keep)

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_cleanup.append(lambda _: session.close())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


_HOP = {"content-length", "transfer-encoding", "connection"}


async def _time(store: S3Store, ordered: bool) -> tuple[float, int]:
    started = time.perf_counter()
    listing = store.list("packs/") if ordered else pack_listing(store)
    n = len([o async for o in listing])
    return time.perf_counter() - started, n


async def main(args: argparse.Namespace, seaweed: EmbeddedSeaweed) -> None:
    def store(endpoint: str) -> S3Store:
        return S3Store(
            endpoint, "listing", access_key=seaweed.access_key, secret_key=seaweed.secret_key
        )

    direct = store(seaweed.endpoint)
    keys = [pack_key(os.urandom(32)) for _ in range(args.packs)]
    for i in range(0, len(keys), 64):
        await asyncio.gather(*(direct.put(k, b"x") for k in keys[i : i + 64]))
    runner, endpoint = await _delaying_proxy(seaweed.endpoint, args.delay_ms / 1000)
    delayed = store(endpoint)
    try:
        for name, s in (("direct", direct), (f"+{args.delay_ms} ms a request", delayed)):
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(args.repeat):
                for ordered in (True, False):
                    seconds, n = await _time(s, ordered)
                    assert n == args.packs, n
                    times[ordered].append(seconds)
            walk, fan = statistics.median(times[True]), statistics.median(times[False])
            print(
                f"{args.packs} packs, {name}: ordered walk {walk:.2f} s, "
                f"pack_listing {fan:.2f} s ({walk / fan:.1f}x), median of {args.repeat}"
            )
    finally:
        await direct.close()
        await delayed.close()
        await runner.cleanup()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--packs", type=int, default=1000)
    p.add_argument("--delay-ms", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    with EmbeddedSeaweed(Path(tempfile.mkdtemp(prefix="dm-listing-"))) as weed:
        weed.create_bucket("listing")
        asyncio.run(main(a, weed))
    sys.exit(0)
