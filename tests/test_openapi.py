"""The served OpenAPI document is the contract: schemathesis generates requests from it
against a real daemon and checks there is no server error and every response conforms."""

from __future__ import annotations

import json
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.fixtures_daemon import StartSite

SPEC = Path(__file__).parent.parent / "datamover" / "api" / "openapi.json"


def test_the_document_in_the_repo_is_valid_openapi() -> None:
    doc = json.loads(SPEC.read_text())
    assert doc["openapi"].startswith("3.")
    schema = schemathesis.openapi.from_dict(doc)
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) == 13


def test_every_route_on_the_catalog_documents_its_outage() -> None:
    """The error middleware answers 503 `catalog_unavailable` on every `/v1` route that
    reads the catalog (all but the document itself): a hook retries on it, so the contract
    must say it can come."""
    doc = json.loads(SPEC.read_text())
    missing = [
        f"{method.upper()} {path}"
        for path, operations in doc["paths"].items()
        if path.startswith("/v1/") and path != "/v1/openapi.json"
        for method, operation in operations.items()
        if method != "parameters" and "503" not in operation["responses"]
    ]
    assert missing == []


async def test_metrics_documents_the_token_a_site_may_ask_for(served_site: StartSite) -> None:
    """`[api] open_metrics = false` closes /metrics: it answers 401 without a valid bearer
    token, where the document said it needs none and answers only 200."""
    operation = json.loads(SPEC.read_text())["paths"]["/metrics"]["get"]
    assert {} in operation["security"] and {"bearer": []} in operation["security"]
    d = await served_site("site-b", api={"open_metrics": False})
    token = d.token("t1", "/proj", "read")
    for who, expected in ((None, 401), ("dm_unknown", 401), (token, 200)):
        status, body = d.request("GET", "/metrics", who)
        assert status == expected and str(status) in operation["responses"], (who, body)


async def test_api_conforms_to_its_openapi_document(served_site: StartSite) -> None:
    d = await served_site("site-b")
    token = d.token("t1", "/", "admin")
    status, served = d.request("GET", "/v1/openapi.json")
    assert status == 200 and served == json.loads(SPEC.read_text())
    schema = schemathesis.openapi.from_url(d.url + "/v1/openapi.json")
    # Requests valid by the schema may still name paths this site does not map: that is a
    # 4xx by design, so "positive data must be accepted" does not apply.
    excluded = [positive_data_acceptance]
    problems: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(case=operation.as_strategy())
        def exercise(case) -> None:  # type: ignore[no-untyped-def]
            case.call_and_validate(
                base_url=d.url,
                headers={"Authorization": f"Bearer {token}"},
                excluded_checks=excluded,
            )

        try:
            exercise()
        except Exception as exc:  # collect every operation's failure, not just the first
            problems.append(f"{operation.label}: {str(exc)[:2000]}")
    assert not problems, "\n\n".join(problems)
    assert " 500 " not in d.log() and "unexpected error" not in d.log()
