"""Credentials that botocore gets from another AWS service in the S3 client's session: a
profile's role (STS AssumeRole), a web identity (STS AssumeRoleWithWebIdentity, as on EKS)
and SSO (the SSO portal's GetRoleCredentials), each from a stand-in for that service; and an
unreachable STS, as the store and as the CLI report it. The S3 requests made with such
credentials go to a stand-in too, which shows what they were signed with: SeaweedFS, unless
configured with an STS of its own, refuses a session token it did not issue.

Before: the S3 clients' data loader knew S3 alone, so botocore could not make the STS or
SSO client its credential provider needed (`UnknownServiceError: Unknown service: 'sts'`):
every such store failed, the CLI with aiobotocore's warning and traceback and then
"internal error" (exit 70).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import botocore.credentials
import pytest
from aiohttp import web

from datamover.embedded import EmbeddedSeaweed
from datamover.errors import ObjectNotFound, StoreUnavailable
from datamover.storage.s3 import S3Store
from tests.fixtures_sites import MakeSite

_EXPIRES = "2099-01-01T00:00:00Z"


class StandIn:
    """An HTTP server standing in for STS or SSO: `answer(request, body)` makes each answer;
    `requests` are the (method, path, form or query, headers) it was sent."""

    def __init__(self, answer: Callable[[web.Request, dict[str, str]], web.Response]) -> None:
        self.answer = answer
        self.requests: list[tuple[str, str, dict[str, str], dict[str, str]]] = []
        self.endpoint = ""

    async def handle(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()} or dict(request.query)
        self.requests.append((request.method, request.path, form, dict(request.headers)))
        return self.answer(request, form)


@pytest.fixture
async def stand_in() -> AsyncIterator[Callable[..., StandIn]]:
    runners: list[web.AppRunner] = []
    servers: list[StandIn] = []

    def make(answer: Callable[[web.Request, dict[str, str]], web.Response]) -> StandIn:
        server = StandIn(answer)
        servers.append(server)
        return server

    async def start() -> None:
        for server in servers:
            if server.endpoint:
                continue
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", server.handle)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            runners.append(runner)
            port = runner.addresses[0][1]
            server.endpoint = f"http://127.0.0.1:{port}"

    make.start = start  # type: ignore[attr-defined]
    yield make
    for runner in runners:
        await runner.cleanup()


_ROLE_KEY, _ROLE_SECRET, _ROLE_TOKEN = "ASIAROLEEXAMPLE", "rolesecret", "role-session-token"


def _sts_answer(request: web.Request, form: dict[str, str]) -> web.Response:
    """STS's answer to AssumeRole or AssumeRoleWithWebIdentity: the role's temporary
    credentials."""
    action = form.get("Action", "")
    body = (
        f'<{action}Response xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        f"<{action}Result><Credentials>"
        f"<AccessKeyId>{_ROLE_KEY}</AccessKeyId>"
        f"<SecretAccessKey>{_ROLE_SECRET}</SecretAccessKey>"
        f"<SessionToken>{_ROLE_TOKEN}</SessionToken>"
        f"<Expiration>{_EXPIRES}</Expiration>"
        f"</Credentials><AssumedRoleUser><AssumedRoleId>AROAEXAMPLE:s</AssumedRoleId>"
        f"<Arn>arn:aws:sts::123456789012:assumed-role/x/s</Arn></AssumedRoleUser>"
        f"</{action}Result><ResponseMetadata><RequestId>1</RequestId></ResponseMetadata>"
        f"</{action}Response>"
    )
    return web.Response(text=body, content_type="text/xml")


@pytest.fixture
def aws_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home of its own with an empty AWS config; no AWS_* variable from outside."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / ".aws" / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / ".aws" / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the STS client's retries (S3's are ours)
    return home


_ROLE_PROFILE = (
    "[profile base]\naws_access_key_id = AKIABASEEXAMPLE\naws_secret_access_key = basesecret\n"
    "[profile role]\nrole_arn = arn:aws:iam::123456789012:role/x\nsource_profile = base\n"
)


def _no_object(request: web.Request, form: dict[str, str]) -> web.Response:
    return web.Response(status=404)


async def _signed_with(s3: StandIn, key: str, token: str) -> None:
    """A HEAD through a store without keys of its own (botocore's sources) reaches `s3`
    signed with access key `key` and session token `token`."""
    store = S3Store(s3.endpoint, "b")
    try:
        with pytest.raises(ObjectNotFound):
            await store.head("k")
    finally:
        await store.close()
    ((method, path, _, headers),) = s3.requests
    assert (method, path) == ("HEAD", "/b/k")
    assert f"Credential={key}/" in headers["Authorization"]
    assert headers["X-Amz-Security-Token"] == token


async def test_a_profile_with_a_role_assumes_it_through_sts(
    aws_home: Path, stand_in: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch
) -> None:
    sts, s3 = stand_in(_sts_answer), stand_in(_no_object)
    await stand_in.start()
    (aws_home / ".aws" / "config").write_text(_ROLE_PROFILE)
    monkeypatch.setenv("AWS_PROFILE", "role")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", sts.endpoint)
    await _signed_with(s3, _ROLE_KEY, _ROLE_TOKEN)  # before: UnknownServiceError: 'sts'
    ((method, _, form, headers),) = sts.requests
    assert (method, form["Action"], form["RoleArn"]) == (
        "POST",
        "AssumeRole",
        "arn:aws:iam::123456789012:role/x",
    )
    assert "Credential=AKIABASEEXAMPLE/" in headers["Authorization"]  # the source profile's


async def test_a_web_identity_assumes_its_role_through_sts(
    aws_home: Path, stand_in: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch
) -> None:
    sts, s3 = stand_in(_sts_answer), stand_in(_no_object)
    await stand_in.start()
    token = aws_home / "token"
    token.write_text("a-web-identity-token")
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/pod")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", sts.endpoint)
    await _signed_with(s3, _ROLE_KEY, _ROLE_TOKEN)  # before: UnknownServiceError: 'sts'
    ((_, _, form, _),) = sts.requests
    assert (form["Action"], form["WebIdentityToken"]) == (
        "AssumeRoleWithWebIdentity",
        "a-web-identity-token",
    )


async def test_an_sso_profile_gets_its_role_credentials_from_the_sso_portal(
    aws_home: Path, stand_in: Callable[..., StandIn], monkeypatch: pytest.MonkeyPatch
) -> None:
    def answer(request: web.Request, form: dict[str, str]) -> web.Response:
        credentials = {
            "accessKeyId": "ASIASSOEXAMPLE",
            "secretAccessKey": "ssosecret",
            "sessionToken": "sso-session-token",
            "expiration": int((time.time() + 3600) * 1000),
        }
        return web.json_response({"roleCredentials": credentials})

    sso, s3 = stand_in(answer), stand_in(_no_object)
    await stand_in.start()
    start_url = "https://example.awsapps.com/start"
    (aws_home / ".aws" / "config").write_text(
        f"[profile sso]\nsso_start_url = {start_url}\nsso_region = us-east-1\n"
        "sso_account_id = 123456789012\nsso_role_name = reader\n"
    )
    cache = aws_home / ".aws" / "sso" / "cache"
    cache.mkdir(parents=True)
    name = hashlib.sha1(start_url.encode(), usedforsecurity=False).hexdigest()
    (cache / f"{name}.json").write_text(
        json.dumps({"accessToken": "sso-access-token", "expiresAt": _EXPIRES})
    )
    # botocore fixes the cache's place when it is imported, from the HOME of then.
    monkeypatch.setattr(botocore.credentials.SSOProvider, "_SSO_TOKEN_CACHE_DIR", str(cache))
    monkeypatch.setenv("AWS_PROFILE", "sso")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SSO", sso.endpoint)
    await _signed_with(s3, "ASIASSOEXAMPLE", "sso-session-token")  # before: 'sso'
    ((method, path, query, headers),) = sso.requests
    assert (method, path, query["role_name"]) == ("GET", "/federation/credentials", "reader")
    assert headers["x-amz-sso_bearer_token"] == "sso-access-token"


async def test_an_unreachable_sts_is_the_store_unavailable(
    aws_home: Path, seaweed: EmbeddedSeaweed, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (aws_home / ".aws" / "config").write_text(_ROLE_PROFILE)
    monkeypatch.setenv("AWS_PROFILE", "role")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:9")  # refused
    store = S3Store(seaweed.endpoint, bucket, connect_timeout=1)
    try:
        with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1:9"):
            await store.head("k")  # before: UnknownServiceError: 'sts'
    finally:
        await store.close()


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_the_cli_names_an_unreachable_sts_in_one_line(
    aws_home: Path, make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await make_site("site-a")
    (a.data / "x").mkdir()
    (a.data / "x" / "f").write_text("x")
    config = a.config_path.read_text().splitlines()
    a.config_path.write_text(
        "\n".join(line for line in config if not line.startswith(("access_key", "secret_key")))
    )
    (aws_home / ".aws" / "config").write_text(_ROLE_PROFILE)
    monkeypatch.setenv("AWS_PROFILE", "role")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:9")
    proc = a.cli("push", "/proj/x")
    # Before: aiobotocore's WARNING with a traceback, then "internal error
    # (UnknownServiceError ...)", exit 70.
    assert proc.returncode == 6, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("datamover: error: ")]
    assert "http://127.0.0.1:9/" in line, line
    assert all(x.startswith("datamover: ") for x in proc.stderr.splitlines()), proc.stderr
