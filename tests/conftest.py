"""Shared fixtures: a real SeaweedFS per session, fresh buckets, catalogs on both engines."""

from tests.fixtures_catalog import *  # noqa: F403
