"""Store retries are counted for the daemon's `/metrics`: whole calls and multipart steps,
through the store stack a site builds (`make_store`), against SeaweedFS behind a proxy that
injects the faults."""

from __future__ import annotations

import os
from pathlib import Path

from aiohttp import web
from prometheus_client import generate_latest

from datamover.config import parse_config
from datamover.embedded import EmbeddedSeaweed
from datamover.metrics import Metrics
from datamover.site import make_store
from tests.fixtures_store import FaultProxy, s3_error

MiB = 1 << 20


async def test_retries_of_calls_and_parts_are_counted(
    proxy: FaultProxy, seaweed: EmbeddedSeaweed, bucket: str, tmp_path: Path
) -> None:
    failures = {"get": 1, "part": 2}

    async def rule(request: web.Request, body: bytes) -> web.StreamResponse | None:
        if request.method == "GET" and request.path.endswith("/small") and failures["get"]:
            failures["get"] -= 1
            return s3_error(503, "SlowDown")
        if request.query.get("partNumber") == "3" and failures["part"]:
            failures["part"] -= 1
            return s3_error(500, "InternalError")
        return None

    config = parse_config(
        {
            "site": {"name": "hpc-a", "state_dir": str(tmp_path / "state")},
            "store": {
                "endpoint": proxy.endpoint,
                "bucket": bucket,
                "access_key": seaweed.access_key,
                "secret_key": seaweed.secret_key,
            },
        },
        "test.toml",
        env={},
    )
    metrics = Metrics("hpc-a")
    store = make_store(config, on_retry=metrics.store_retry)
    try:
        await store.put("small", b"x" * 100)
        await store.put("big", os.urandom(72 * MiB))  # multipart: 64 MiB and more
        proxy.rule = rule
        assert await store.get("small") == b"x" * 100
        await store.put("big", os.urandom(72 * MiB))
    finally:
        await store.close()
    assert failures == {"get": 0, "part": 0}
    text = generate_latest(metrics.registry).decode()
    assert 'datamover_store_retries_total{op="get",site="hpc-a"} 1.0' in text
    assert 'datamover_store_retries_total{op="part",site="hpc-a"} 2.0' in text
    assert 'op="put"' not in text  # the part was retried, not the whole put
