"""Store fixtures: one real SeaweedFS per test session, a fresh bucket per test.

`seaweed` starts `weed server` once (about 4 s); `bucket` creates a uniquely named bucket and
drops it with its contents afterwards (each bucket holds SeaweedFS volumes, so they are not
left to pile up); `store_factory` makes `S3Store`s on that bucket, closed after the test.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from datamover.embedded import EmbeddedSeaweed
from datamover.storage.s3 import S3Store

StoreFactory = Callable[..., S3Store]


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedSeaweed]:
    """A running SeaweedFS with an S3 gateway, shared by the whole session."""
    with EmbeddedSeaweed(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture
def bucket(seaweed: EmbeddedSeaweed) -> Iterator[str]:
    """A new, empty bucket, deleted after the test."""
    name = f"test-{secrets.token_hex(6)}"
    seaweed.create_bucket(name)
    yield name
    seaweed.delete_bucket(name)


@pytest.fixture
async def store_factory(seaweed: EmbeddedSeaweed, bucket: str) -> AsyncIterator[StoreFactory]:
    """`make(**overrides)` -> an `S3Store` on `bucket` with the server's keys; any constructor
    argument can be overridden (`secret_key="wrong"`, `bucket="missing"`)."""
    made: list[S3Store] = []

    def make(**overrides: Any) -> S3Store:
        kwargs: dict[str, Any] = {
            "endpoint": seaweed.endpoint,
            "bucket": bucket,
            "access_key": seaweed.access_key,
            "secret_key": seaweed.secret_key,
        }
        kwargs.update(overrides)
        store = S3Store(**kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


@pytest.fixture
def s3_store(store_factory: StoreFactory) -> S3Store:
    """An `S3Store` on a fresh bucket."""
    return store_factory()
