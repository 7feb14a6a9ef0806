"""Temporary credentials from the environment (`aws sts assume-role`, a CI step): the
session token goes with the key pair taken from `AWS_*`. Before: the pair was copied into
the settings and handed to botocore, which then read no token, and AWS refused every
request (exit 7, "the credentials were refused")."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web

from datamover.config import parse_config
from datamover.errors import ObjectNotFound
from datamover.site import make_store


def _config(tmp_path: Path, endpoint: str, env: dict[str, str], **store: str) -> object:
    return parse_config(
        {
            "site": {"name": "s", "state_dir": str(tmp_path / "state")},
            "store": {"endpoint": endpoint, "bucket": "b", "retry_attempts": 1, **store},
            "namespace": {"/proj": str(tmp_path / "proj")},
        },
        "site.toml",
        env=env,
    )


@pytest.mark.parametrize("from_file", [False, True], ids=["env-pair", "file-pair"])
async def test_a_session_token_goes_with_the_key_it_was_issued_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, from_file: bool
) -> None:
    seen: list[dict[str, str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    endpoint = f"http://127.0.0.1:{runner.addresses[0][1]}"
    env = {
        "AWS_ACCESS_KEY_ID": "ASIATEMPEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "tempsecret",
        "AWS_SESSION_TOKEN": "the-session-token",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    pair = {"access_key": "AKIAFILEKEY", "secret_key": "filesecret"} if from_file else {}
    store = make_store(_config(tmp_path, endpoint, env, **pair))  # type: ignore[arg-type]
    try:
        with pytest.raises(ObjectNotFound):
            await store.head("k")
    finally:
        await store.close()
        await runner.cleanup()
    if from_file:  # the file's own pair: the environment's token is not mixed in
        assert "Credential=AKIAFILEKEY/" in seen[0]["Authorization"]
        assert "X-Amz-Security-Token" not in seen[0]
    else:
        assert "Credential=ASIATEMPEXAMPLE/" in seen[0]["Authorization"]
        assert seen[0].get("X-Amz-Security-Token") == "the-session-token"
