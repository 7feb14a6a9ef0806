"""Shared fixtures: a real SeaweedFS per session, fresh buckets, catalogs on both engines,
configured sites and running daemons."""

from tests.fixtures_catalog import *  # noqa: F403
from tests.fixtures_daemon import *  # noqa: F403
from tests.fixtures_sites import *  # noqa: F403
from tests.fixtures_store import *  # noqa: F403
