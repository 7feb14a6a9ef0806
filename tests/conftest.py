"""Shared fixtures: a real SeaweedFS per session, fresh buckets, catalogs on both engines,
configured sites and running daemons."""

import os

import pytest

from tests.fixtures_catalog import *  # noqa: F403
from tests.fixtures_daemon import *  # noqa: F403
from tests.fixtures_sites import *  # noqa: F403
from tests.fixtures_store import *  # noqa: F403


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """What `-n auto` means: `PYTEST_XDIST_AUTO_NUM_WORKERS` where set (as without this
    hook), else one worker per core this process may run on and one more (the tests mostly
    wait on servers and subprocesses; see pyproject.toml). `-n logical` is xdist's own."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS") or config.option.numprocesses != "auto":
        return None
    return len(os.sched_getaffinity(0)) + 1
