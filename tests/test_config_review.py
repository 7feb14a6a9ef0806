"""Review of the configuration: each test shows one defect that was fixed (it failed before
the fix), in the namespace map, the store keys, the state directory and the TOML reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from datamover.config import load_config
from datamover.domain.namespace import Namespace
from datamover.errors import InvalidInput
from tests.test_config import GOOD

# -- a namespace directory written with a leading '//' ---------------------------------------


def test_a_local_directory_with_a_leading_double_slash_is_the_same_directory() -> None:
    # Before: kept as '//gpfs/proj', so a link to '/gpfs/proj/run5' was not seen as inside it
    # and was stored verbatim, and stage wrote paths as '//gpfs/proj/...'.
    ns = Namespace.from_mapping({"/proj": "//gpfs/proj"})
    assert ns.prefixes == (("/proj", Path("/gpfs/proj")),)
    assert ns.resolve("/proj/x") == Path("/gpfs/proj/x")
    assert ns.link_to_logical("/gpfs/proj/run5") == "/proj/run5"
    assert ns.link_to_local("/proj/run5") == "/gpfs/proj/run5"


@pytest.mark.parametrize(
    "mapping",
    [
        {"/proj": "//gpfs/proj", "/ref": "/gpfs/proj/ref"},
        {"/proj": "/gpfs/proj", "/ref": "//gpfs/proj/ref"},
        {"/proj": "//gpfs//proj/", "/ref": "//gpfs/proj//ref"},
    ],
    ids=["outer", "inner", "both"],
)
def test_an_alias_through_a_double_slash_is_refused(mapping: dict[str, str]) -> None:
    # Before: accepted, one local tree under two logical paths.
    with pytest.raises(InvalidInput, match="one local directory cannot have two logical paths"):
        Namespace.from_mapping(mapping, "c.toml")


def test_an_alias_through_a_double_slash_from_the_environment_is_refused(tmp_path: Path) -> None:
    # DATAMOVER_NAMESPACE="/proj=$BASE/proj" with BASE=/ gives '//gpfs/proj'.
    path = tmp_path / "site.toml"
    path.write_text(GOOD)
    env = {"DATAMOVER_NAMESPACE": "/proj=//gpfs/proj,/ref=/gpfs/proj/ref"}
    with pytest.raises(InvalidInput) as info:
        load_config(path, env=env)
    assert str(info.value) == (
        "environment DATAMOVER_NAMESPACE: [namespace] '/ref' maps to '/gpfs/proj/ref', which "
        "'/proj' already maps as '/proj/ref' (one local directory cannot have two logical paths)"
    )
