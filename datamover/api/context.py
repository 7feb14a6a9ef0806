"""What every handler needs: the application context and the caller's identity."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from datamover.catalog.access import Access, Identity
from datamover.catalog.transfers import Transfers
from datamover.errors import Forbidden, Unauthorized
from datamover.metrics import Metrics
from datamover.scheduler.endings import Endings
from datamover.scheduler.runner import Doorbell
from datamover.site import Site


@dataclass
class Context:
    """What handlers work with."""

    site: Site
    transfers: Transfers
    access: Access
    metrics: Metrics
    open_paths: frozenset[str]
    wake: Doorbell | None = None  # rung on each submission: an idle worker claims at once
    endings: Endings = field(default_factory=Endings)  # wakes long polls of ended transfers


CONTEXT = web.AppKey("context", Context)
#: The answer to a token the catalog does not hold as valid: which of the three is not told
#: (a secret guessed is not told it once existed), each named for the user who holds one.
INVALID_TOKEN = "the bearer token is not valid (unknown, revoked or expired)"
IDENTITY = web.RequestKey("identity", Identity)
SECRET = web.RequestKey("secret", str)  # the bearer token as sent, for `reidentify`


def context(request: web.Request) -> Context:
    """The application's context."""
    return request.app[CONTEXT]


def identity(request: web.Request) -> Identity:
    """The caller's identity (set by the auth middleware)."""
    return request[IDENTITY]


async def reidentify(request: web.Request) -> None:
    """Check the caller's token again: a held request (a long poll) answers long after the
    auth middleware checked it, and must not answer a token revoked meanwhile."""
    if await context(request).access.identify(request[SECRET]) is None:
        raise Unauthorized(INVALID_TOKEN)


def require(request: web.Request, scope: str, path: str | None = None) -> Identity:
    """The caller's identity, if it grants `scope` (and `path`), else `Forbidden`."""
    who = identity(request)
    if not who.allows(scope):
        raise Forbidden(f"this token does not have the {scope!r} scope")
    if path is not None and not who.allows("admin") and not who.covers(path):
        raise Forbidden(f"this token does not cover {path!r}")
    return who
