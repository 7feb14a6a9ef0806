"""Untimed bucket housekeeping for the benchmark, straight over the S3 API (botocore).

Every repetition that must start empty gets its own bucket, dropped afterwards: in SeaweedFS
a bucket is a collection, and dropping it frees its volumes at once (deleted objects would
otherwise keep their disk space until a vacuum).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class S3Target:
    """Where the store is and how to sign requests to it."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"


class S3Admin:
    """Create, measure and drop buckets."""

    def __init__(self, target: S3Target) -> None:
        import botocore.session
        from botocore.config import Config

        self.target = target
        self._client: Any = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=target.endpoint,
            region_name=target.region,
            aws_access_key_id=target.access_key,
            aws_secret_access_key=target.secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 10, "mode": "standard"},
                max_pool_connections=16,
            ),
        )

    def create_bucket(self, name: str) -> None:
        """Create `name` (an existing bucket of ours is emptied instead), ready to write.

        SeaweedFS allocates a bucket's first volume on its first upload, a stall of about a
        second that a store in service has long paid; one tiny write and delete here keeps
        it out of whichever tool uploads first.
        """
        existing = {b["Name"] for b in self._client.list_buckets().get("Buckets", [])}
        if name in existing:
            self.empty_bucket(name)
            return
        self._client.create_bucket(Bucket=name)
        self._client.put_object(Bucket=name, Key=".bench-warmup", Body=b"\0")
        self._client.delete_object(Bucket=name, Key=".bench-warmup")

    def usage(self, bucket: str, prefix: str = "") -> tuple[int, int]:
        """Objects and bytes under `prefix` in `bucket`."""
        count = size = 0
        for page in self._client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix
        ):
            for obj in page.get("Contents", []):
                count += 1
                size += obj["Size"]
        return count, size

    def empty_bucket(self, bucket: str) -> None:
        """Delete every object in `bucket`, 1,000 per request."""
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                self._client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})

    def drop_bucket(self, bucket: str) -> None:
        """Empty and delete `bucket`; a missing bucket is fine."""
        from botocore.exceptions import ClientError

        try:
            self.empty_bucket(bucket)
            self._client.delete_bucket(Bucket=bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchBucket":
                raise
