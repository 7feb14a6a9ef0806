"""Shared fixtures: a real SeaweedFS per session, fresh buckets, catalogs on both engines,
configured sites and running daemons."""

import asyncio
import compileall
import os
from pathlib import Path

import pytest

import datamover
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


def pytest_configure(config: pytest.Config) -> None:
    """Byte-compile the package once, in the controller (not in each xdist worker).

    Hundreds of tests run `python -m datamover` in a subprocess. An editable install is not
    compiled by pip, so where `PYTHONDONTWRITEBYTECODE` is set (as on the CI machine) each of
    those would compile every module it imports from source again: about 0.15 s a command,
    a tenth of the suite's time. `compileall` writes the `__pycache__` files whatever the
    variable says; readers use them either way. A read-only checkout just stays uncompiled.
    """
    if not hasattr(config, "workerinput"):
        compileall.compile_dir(Path(datamover.__file__).parent, quiet=2)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Drop the PostgreSQL test databases left to drop (`fixtures_catalog._UNDROPPED`)."""
    from tests.fixtures_catalog import _UNDROPPED, drop_undropped

    if _UNDROPPED:
        asyncio.run(drop_undropped())
