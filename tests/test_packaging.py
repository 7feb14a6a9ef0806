"""The installed package must hold everything the source tree has (an editable install
would hide a package missing from pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_every_package_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "datamover").rglob("__init__.py")
    }
    assert on_disk <= listed, f"missing from pyproject.toml: {sorted(on_disk - listed)}"


def test_built_wheel_contains_modules_and_data(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("datamover-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "datamover/api/openapi.json",
        "datamover/api/routes.py",
        "datamover/scheduler/worker.py",
        "datamover/migrations/env.py",
        "datamover/migrations/script.py.mako",
        "datamover/migrations/versions/0001_initial.py",
    ):
        assert needed in names, needed
