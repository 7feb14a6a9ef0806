"""One error hierarchy, sorted by what the caller should do.

Every error a user can cause is a `DatamoverError` whose message is one clear line naming
what was wrong. The CLI prints that line and exits with `exit_code`; the API maps `code` to an
HTTP status in one place. Only `TransientError` is worth retrying: everything else fails at
once, because doing the same thing again will give the same answer.
"""

from __future__ import annotations


class DatamoverError(Exception):
    """Base of every expected failure. `code` is stable and machine-readable; `paths` names
    the files concerned (relative to the dataset), when there are any."""

    code = "error"
    exit_code = 1
    retryable = False

    def __init__(self, message: str, paths: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.paths = paths or []

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type[DatamoverError], tuple[str, list[str]]]:
        # Errors cross process boundaries (worker pools): keep the paths, not just the text.
        return (type(self), (self.message, self.paths))


class InvalidInput(DatamoverError):
    """The request itself is wrong (bad path, bad name, bad option); nothing was changed."""

    code = "invalid_input"
    exit_code = 2


class NoRoute(InvalidInput):
    """The daemon has no API route at the path asked (404): its client's `[api] url` holds
    a path the daemon does not serve under, which no dataset or transfer id explains."""

    code = "no_route"


class NotFound(DatamoverError):
    """A dataset, version or object named by the caller does not exist."""

    code = "not_found"
    exit_code = 3


class Conflict(DatamoverError):
    """The world changed under us (a source file changed while read, another run holds a lock)."""

    code = "conflict"
    exit_code = 4


class Busy(Conflict):
    """Another process runs a push or stage of the dataset (or holds the claim of one that
    died where its death cannot be seen from here): a daemon tries the transfer again
    after a backoff rather than failing it, since the holder ends, or its claim goes stale;
    the CLI exits 4, as for any conflict."""

    retryable = True


class Pinned(Conflict):
    """Jobs' pins hold the replica (or one nested with it) at another version: a stage would
    change files they are reading. Waiting for their release mends it (or `--force`)."""

    code = "pinned"
    exit_code = 11


class Corrupt(DatamoverError):
    """Data or metadata failed verification: a digest mismatch, a malformed pack or manifest."""

    code = "corrupt"
    exit_code = 5


class TransientError(DatamoverError):
    """A failure that may go away by itself (connection refused, timeout, 5xx, throttling)."""

    code = "unavailable"
    exit_code = 6
    retryable = True


class CatalogUnavailable(TransientError):
    """The catalog database could not be reached or dropped the connection (a restart)."""

    code = "catalog_unavailable"


class PermanentError(DatamoverError):
    """A failure that will not go away by retrying (access denied, missing bucket)."""

    code = "permanent"
    exit_code = 7


class CatalogError(DatamoverError):
    """The catalog cannot be used as it is (schema too old or too new, unreachable)."""

    code = "catalog"
    exit_code = 8


class RunsExhausted(PermanentError):
    """A transfer was run `[api] max_attempts` times and its last run was cut off (its
    process died or lost its lease): it is not run again."""

    code = "runs_exhausted"


class InternalError(DatamoverError):
    """A daemon's answer to an error it did not expect (a bug; its log holds the
    traceback): exit 70 at its client, as for one in the CLI's own process."""

    code = "internal"
    exit_code = 70


class Interrupted(DatamoverError):
    """The user interrupted the command (Ctrl-C); the message says what goes on without it."""

    code = "interrupted"
    exit_code = 130


class Cancelled(DatamoverError):
    """The transfer was cancelled (`DELETE /v1/transfers/{id}`): someone decided it should
    not run, so a hook that waited for it fails rather than submitting it again."""

    code = "cancelled"
    exit_code = 10


# Store-level refinements: drivers raise these so wrappers can decide without parsing text.


class ObjectNotFound(NotFound):
    """The store has no object under the requested key (a normal answer, not a fault)."""

    code = "object_not_found"


class StoreUnavailable(TransientError):
    """The store could not be reached or answered with a retryable fault."""

    code = "store_unavailable"


class StoreRetriesExhausted(StoreUnavailable):
    """A step inside one store call (a part or the completion of a multipart upload) failed
    transiently as many times as the retry policy allows. Still transient for the transfer,
    which may run again later, but `RetryingStore` does not repeat the call: that would
    repeat every step of it as many times again. Its code is `StoreUnavailable`'s: to a
    client it is that."""


class UploadLost(StoreUnavailable):
    """A multipart upload vanished under a put (aborted elsewhere or by a lifecycle rule, or
    completed by a completion whose answer was lost, where the key does not prove to hold
    the object it made). None of its parts can be sent again, so a driver's retry of a
    step passes this up at once; a new put can succeed, so `RetryingStore` retries the
    call."""


class StoreAccessDenied(PermanentError):
    """The store refused the credentials or the operation."""

    code = "store_access_denied"


class BucketNotFound(PermanentError):
    """The configured bucket does not exist at the configured endpoint."""

    code = "bucket_not_found"


# API-level refusals.


class Unauthorized(DatamoverError):
    """No valid bearer token was presented."""

    code = "unauthorized"
    exit_code = 9


class Forbidden(DatamoverError):
    """The token is valid but does not grant this scope or path."""

    code = "forbidden"
    exit_code = 9


#: HTTP status of each error class, most specific first: the API answers with it and its
#: client maps a status back to a class when a body names no known code.
HTTP_STATUS: tuple[tuple[type[DatamoverError], int], ...] = (
    (Unauthorized, 401),
    (Forbidden, 403),
    (InvalidInput, 400),
    (NotFound, 404),
    (Conflict, 409),
    (Corrupt, 502),  # the store handed back bad data
    (PermanentError, 502),  # the store refused us (credentials, bucket)
    (TransientError, 503),
    (CatalogError, 503),
)


def http_status(exc: DatamoverError) -> int:
    """The HTTP status for an expected error (500 if unclassified)."""
    for cls, status in HTTP_STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_class(code: str) -> type[DatamoverError] | None:
    """The error class whose stable `code` this is, if any."""
    pending: list[type[DatamoverError]] = [DatamoverError]
    while pending:
        cls = pending.pop()
        if cls.code == code:
            return cls
        pending.extend(cls.__subclasses__())
    return None
