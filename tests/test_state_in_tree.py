"""The site's state directory and the datasets' trees are kept apart."""

from __future__ import annotations

import re

import pytest

from tests.fixtures_sites import MakeSite
from tests.test_config import _cli


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_a_default_state_dir_in_a_datasets_tree_stops_its_push_and_stage_only(
    make_site: MakeSite,
) -> None:
    # The default state directory (under XDG_STATE_HOME or the home directory) may lie in a
    # mapped tree (`/home` mapped): refusing the configuration refused a daemon's clients,
    # which never use it. A dataset whose tree holds it is refused instead: a push would
    # publish the catalog and trash, a stage --delete move the state into its own trash.
    a = await make_site("site-a")
    text = a.config_path.read_text()
    a.config_path.write_text(re.sub(r"(?m)^state_dir = .*\n", "", text))
    home = a.data / "home"
    (home / "proj").mkdir(parents=True)
    (home / "proj" / "f").write_text("f\n")
    env = {"XDG_STATE_HOME": str(home / ".state")}
    catalog = re.search(r'(?m)^catalog = "(.*)"$', text)
    assert catalog is not None
    env["DATAMOVER_SITE_CATALOG"] = catalog.group(1)

    pushed = _cli(a.config_path, env, "push", "/proj/home/proj", "--json")
    assert pushed.returncode == 0, pushed.stderr  # a tree beside the state: fine
    refused = _cli(a.config_path, env, "push", "/proj/home")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.count("\n") == 1
    assert "the site's state directory" in refused.stderr and "lies in its tree" in refused.stderr
    staged = _cli(a.config_path, env, "stage", "/proj/home", "--delete")
    assert staged.returncode == 2, staged.stderr
    assert (home / ".state").is_dir()  # nothing moved to any trash
    assert _cli(a.config_path, env, "ls").returncode == 0  # other commands are not refused


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_a_state_dir_reached_through_a_symlink_into_a_tree_stops_its_push_and_stage(
    make_site: MakeSite,
) -> None:
    # Before: compared as written only, a state directory configured through a link into
    # the tree was published with it (its lock files staged at other sites), and every
    # `stage --delete` failed moving it into its own trash.
    a = await make_site("site-a")
    ds = a.data / "ds"
    ds.mkdir()
    (ds / "f").write_text("f\n")
    link = a.state.parent / "link-to-ds"
    link.symlink_to(ds)
    text = a.config_path.read_text()
    a.config_path.write_text(
        re.sub(r"(?m)^state_dir = .*$", f'state_dir = "{link / ".state"}"', text)
    )
    env: dict[str, str] = {}
    assert _cli(a.config_path, env, "db", "upgrade").returncode == 0
    refused = _cli(a.config_path, env, "push", "/proj/ds")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.count("\n") == 1
    assert "the site's state directory" in refused.stderr and "lies in its tree" in refused.stderr
    staged = _cli(a.config_path, env, "stage", "/proj/ds", "--delete")
    assert staged.returncode == 2, staged.stderr
    assert (ds / ".state").is_dir()  # nothing moved to any trash
