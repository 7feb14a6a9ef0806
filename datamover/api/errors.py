"""The one place that turns an exception into an HTTP status and a JSON error body.

Every error response is `{"error": {"code", "message", "paths"?}}` with a stable `code`;
the status of each error class is `datamover.errors.HTTP_STATUS`.
Unexpected exceptions are logged with their traceback and answered 500 with code
`internal`; the API's tests (schemathesis included) treat any 500 as a bug.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from datamover.errors import DatamoverError, NoRoute, http_status

log = logging.getLogger(__name__)

_HTTP_CODES = {
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}


def error_response(
    status: int, code: str, message: str, paths: list[str] | None = None
) -> web.Response:
    """A JSON error response."""
    body: dict = {"error": {"code": code, "message": message}}
    if paths:
        body["error"]["paths"] = paths
    headers = {"WWW-Authenticate": 'Bearer realm="datamover"'} if status == 401 else None
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Map every failure of a handler to a JSON error."""
    try:
        return await handler(request)
    except DatamoverError as exc:
        return error_response(http_status(exc), exc.code, exc.message, exc.paths)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if isinstance(exc, web.HTTPNotFound):  # only the router raises it: no such route
            # Its own code: to a client whose `[api] url` has a path the daemon does not
            # serve under, a "not found" read as a missing transfer or dataset (exit 3).
            return error_response(
                404,
                NoRoute.code,
                f"the daemon has no API route {request.method} {request.path}: check [api] "
                "url (a path in it must be one a proxy strips before the daemon)",
            )
        code = _HTTP_CODES.get(exc.status, f"http_{exc.status}")
        return error_response(exc.status, code, exc.reason)
    except Exception as exc:
        from datamover.catalog.engine import catalog_outage

        # A restart of the catalog's server is no bug: 503. `catalog_only`: a handler
        # reaches the store only through `Store`, which turns each of its failures into a
        # `DatamoverError` (caught above), so a bare connection refused or reset here is
        # the catalog's (asyncpg raises them unwrapped, as the token lookup that starts
        # every authenticated request met a PostgreSQL server that was down: a 500, which
        # a job's prolog took for a failure, not a later try).
        outage = catalog_outage(exc, catalog_only=True)
        if outage is not None:
            log.warning("%s %s: %s", request.method, request.path, outage.message)
            return error_response(http_status(outage), outage.code, outage.message)
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error; see the daemon's log")
