"""A site's live resources: config, store (with retries), repository and catalog.

The composition root for one process: the CLI opens a `Site`, calls a transfer function with
it, and closes it. Nothing here decides anything; it only wires the pieces together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datamover.catalog.engine import open_engine
from datamover.catalog.queries import Catalog
from datamover.config import Config
from datamover.errors import InvalidInput
from datamover.repo.repository import Repository
from datamover.storage.bandwidth import ThrottledStore
from datamover.storage.base import Store
from datamover.storage.retry import RetryingStore, RetryPolicy


def make_state_dir(config: Config) -> Path:
    """Create the site's state directory (and its parents) if missing; return it. A directory
    that cannot be created is `InvalidInput` naming it, why, and where it was set: the
    variable `DATAMOVER_SITE_STATE_DIR` or else the file (a configuration problem)."""
    path = config.state_dir
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInput(
            f"{config.origin('site', 'state_dir')} {str(path)!r} cannot be created: "
            f"{exc.strerror or exc}"
        ) from None
    return path


def make_store(config: Config, on_retry: Callable[[str], None] | None = None) -> Store:
    """The configured S3 store, with retries on transient faults and the bandwidth budget;
    `on_retry` is told of each retry (`RetryPolicy.on_retry`).

    One retry policy serves both levels: `RetryingStore` retries a whole call, the S3 driver
    a failed part, or the failed completion, of a multipart upload. A part or completion
    that fails every try ends the put without a retry of the whole, so a part is sent at most
    `retry_attempts` times in one upload; only a failure outside them (starting the upload,
    or the upload vanishing) runs the put again, up to `retry_attempts` times, so
    `retry_attempts`**2 sends of one part in all at worst (docs/design.md, "Store access")."""
    from datamover.storage.s3 import S3Store

    s = config.store
    retry = RetryPolicy(attempts=s.retry_attempts, on_retry=on_retry)
    inner = S3Store(
        s.endpoint or None,
        s.bucket,
        s.region,
        s.access_key or None,
        s.secret_key or None,
        session_token=s.session_token or None,
        max_connections=s.max_connections,
        # Packs (tens of MiB) go up in one PUT each, several at once; parts would only add
        # copies and requests. Larger objects still use multipart.
        multipart_threshold=64 << 20,
        retry_part=retry,
        connect_timeout=s.connect_timeout,
        read_timeout=s.read_timeout,
        # Every ranged GET on threads, whatever its size (docs/design.md, "Large GETs leave
        # the event loop"): a GET through botocore cost the event loop 1.6-3 ms of CPU, one
        # of a kept presigned URL 0.4-0.9 ms. As many threads as the transfers a daemon runs
        # at once send GETs (made as they are needed).
        direct_min=1,
        direct_threads=_get_threads(config),
    )
    # The pacer sits under the retries, so each attempt waits for its turn: above them, a
    # call took one turn however often its bytes were sent (5 puts of 1 MB failing twice
    # each moved 15 MB in 4 s under a 1 MB/s limit).
    limit = config.transfer.bandwidth_limit
    paced: Store = ThrottledStore(inner, upload=limit, download=limit) if limit > 0 else inner
    return RetryingStore(paced, policy=retry)


#: Most threads a store runs its ranged GETs on (each keeps one connection to the store).
MAX_GET_THREADS = 256


def _get_threads(config: Config) -> int:
    """Threads for a store's ranged GETs: one for each GET that `[api] workers` transfers
    at once send (`download_concurrency` each), 8 to `MAX_GET_THREADS`."""
    wanted = config.transfer.download_concurrency * max(1, config.api.workers)
    return max(8, min(MAX_GET_THREADS, wanted))


@dataclass
class Site:
    """Everything a transfer needs at one site."""

    config: Config
    store: Store
    repo: Repository
    catalog: Catalog

    @property
    def name(self) -> str:
        """The site's name."""
        return self.config.site.name

    @property
    def state_dir(self) -> Path:
        """The site's state directory (manifest cache, trash)."""
        return self.config.state_dir

    @classmethod
    async def open(
        cls,
        config: Config,
        store: Store | None = None,
        on_retry: Callable[[str], None] | None = None,
    ) -> Site:
        """Open the catalog (creating it on first use) and the store (`make_store`, told
        `on_retry`, unless `store` is given)."""
        make_state_dir(config)
        engine = await open_engine(config.catalog_url, config.site.name)
        store = store or make_store(config, on_retry)
        repo = Repository(store, config.state_dir, config.transfer.download_concurrency)
        return cls(config, store, repo, Catalog(engine))

    async def close(self) -> None:
        """Release the store's connections and the catalog's engine."""
        try:
            await self.store.close()
        finally:
            await self.catalog.close()
