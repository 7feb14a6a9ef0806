"""Object storage behind one interface: the `Store` contract and its drivers.

`base` defines the contract; `memory`, `posix` and `s3` implement it; `retry` holds the
wrappers (retries, concurrency limits) that are themselves Stores. Drivers are imported from
their modules so that importing this package never pulls in aiobotocore.
"""

from datamover.storage.base import ObjectInfo, Store

__all__ = ["ObjectInfo", "Store"]
