"""The aiohttp application: context, authentication and the route table.

`make_app` wires a `Context` (the site, the transfer queue, tokens and pins, metrics) into
an application whose handlers live in `api.routes`. Authentication is a middleware: every
route needs a bearer token except those listed as open (`/healthz`, `/metrics` and the
OpenAPI document by default; `[api] open_metrics = false` closes `/metrics`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from datamover.api import routes
from datamover.api.context import CONTEXT, IDENTITY, INVALID_TOKEN, SECRET, Context, context
from datamover.api.errors import errors_middleware
from datamover.api.validate import MAX_BODY
from datamover.errors import Unauthorized

__all__ = ["Context", "make_app"]


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Resolve the bearer token of every request to a non-open route."""
    ctx = context(request)
    if request.path in ctx.open_paths:
        return await handler(request)
    given = request.headers.getall("Authorization", [])
    if len(given) > 1:  # which one counts is anyone's guess, as for a repeated parameter
        raise Unauthorized("the Authorization header is given more than once")
    header = given[0] if given else ""
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized("a bearer token is required (Authorization: Bearer <token>)")
    who = await ctx.access.identify(secret.strip())
    if who is None:
        raise Unauthorized(INVALID_TOKEN)
    request[IDENTITY] = who
    request[SECRET] = secret.strip()
    return await handler(request)


def make_app(ctx: Context) -> web.Application:
    """The application; errors middleware outermost so auth failures are JSON too."""
    app = web.Application(
        middlewares=[errors_middleware, auth_middleware], client_max_size=MAX_BODY
    )
    app[CONTEXT] = ctx
    app.router.add_get("/healthz", routes.healthz)
    app.router.add_get("/readyz", routes.readyz)
    app.router.add_get("/metrics", routes.metrics)
    app.router.add_get("/v1/openapi.json", routes.openapi)
    app.router.add_post("/v1/transfers", routes.submit_transfer)
    app.router.add_get("/v1/transfers", routes.list_transfers)
    app.router.add_get("/v1/transfers/{id}", routes.get_transfer)
    app.router.add_delete("/v1/transfers/{id}", routes.cancel_transfer)
    app.router.add_get("/v1/datasets", routes.list_datasets)
    app.router.add_get("/v1/datasets/{path:.+}/versions", routes.list_versions)
    app.router.add_get("/v1/replicas", routes.list_replicas)
    app.router.add_post("/v1/pins", routes.add_pin)
    app.router.add_delete("/v1/pins/{pin}", routes.release_pin)
    return app
