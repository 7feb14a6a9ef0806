"""Review of the configuration: each test shows one defect that was fixed (it failed before
the fix), in the namespace map, the store keys, the state directory and the TOML reader."""

from __future__ import annotations

import dataclasses
import os
import pwd
import re
import subprocess
import sys
from pathlib import Path

import pytest

from datamover.config import _SECTIONS, load_config
from datamover.domain.namespace import Namespace
from datamover.errors import InvalidInput
from datamover.site import make_state_dir
from tests.test_config import GOOD, _cli, _refused, _site

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


# -- a store key that is not valid UTF-8 -----------------------------------------------------

_NO_KEYS = "[site]\nname='a'\n[store]\nbucket='b'\n"


@pytest.mark.parametrize(
    "name",
    [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "DATAMOVER_STORE_ACCESS_KEY",
        "DATAMOVER_STORE_SECRET_KEY",
    ],
)
def test_a_key_that_is_not_utf8_is_named(tmp_path: Path, name: str) -> None:
    # A byte the environment's text cannot hold reaches Python as a lone surrogate. Before:
    # accepted; every request then failed inside botocore and was retried as a store outage
    # (exit 6), or ended as an internal error (UnicodeEncodeError).
    path = tmp_path / "site.toml"
    path.write_text(_NO_KEYS)
    with pytest.raises(InvalidInput) as info:
        load_config(path, env={name: "AKIA\udcff"})
    assert str(info.value) == f"environment: {name} is not valid UTF-8 text (not shown here)"


def test_a_key_that_is_not_utf8_is_refused_by_the_cli(tmp_path: Path) -> None:
    path = _site(tmp_path)
    _refused(
        _cli(path, {"AWS_SECRET_ACCESS_KEY": "pw\udcff"}, "db", "upgrade"),
        "environment: AWS_SECRET_ACCESS_KEY is not valid UTF-8 text (not shown here)",
    )
    assert not (tmp_path / "state").exists()


def test_the_s3_store_refuses_a_key_that_is_not_utf8() -> None:
    from datamover.storage.s3 import S3Store

    with pytest.raises(InvalidInput, match=r"^S3 secret key is not valid UTF-8 text "):
        S3Store("http://127.0.0.1:9", "b", "us-east-1", "AK", "pw\udcff")


def test_a_key_of_other_valid_utf8_is_accepted(tmp_path: Path) -> None:
    # Servers compare keys as they are: a non-ASCII key is refused by the store, not by us.
    path = tmp_path / "site.toml"
    path.write_text(_NO_KEYS)
    cfg = load_config(path, env={"AWS_ACCESS_KEY_ID": "clé", "AWS_SECRET_ACCESS_KEY": "sé"})
    assert (cfg.store.access_key, cfg.store.secret_key) == ("clé", "sé")


# -- no home directory for the default state directory ---------------------------------------

_NO_HOME = (
    "[site] state_dir is not set and there is no home directory for its default (HOME is "
    "unset and this user has no passwd entry): set [site] state_dir or XDG_STATE_HOME"
)


def _no_passwd_entry(uid: int) -> pwd.struct_passwd:
    raise KeyError(f"getpwuid(): uid not found: {uid}")


def test_no_home_directory_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: Path.home() raised RuntimeError("Could not determine home directory."), which
    # the CLI reported as an internal error (exit 70).
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", _no_passwd_entry)
    path = tmp_path / "site.toml"
    path.write_text(_NO_KEYS)
    with pytest.raises(InvalidInput) as info:
        load_config(path, env={})
    assert str(info.value) == f"{path}: {_NO_HOME}"
    # Either way out of it works without a home directory.
    env = {"XDG_STATE_HOME": str(tmp_path / "xdg")}
    assert load_config(path, env=env).state_dir == tmp_path / "xdg" / "datamover" / "a"
    path.write_text(_NO_KEYS.replace("[store]", "state_dir = 's'\n[store]"))
    assert load_config(path, env={}).state_dir == tmp_path / "s"


def test_no_home_directory_is_refused_by_the_cli(tmp_path: Path) -> None:
    # The CLI itself, in a process where HOME is unset and the user has no passwd entry (as
    # a container's made-up uid has none).
    path = tmp_path / "site.toml"
    path.write_text(_NO_KEYS)
    program = (
        "import pwd, sys\n"
        "def none(uid): raise KeyError(uid)\n"
        "pwd.getpwuid = none\n"
        "from datamover.cli import main\n"
        "sys.argv[0] = 'datamover'\n"
        "main()\n"
    )
    drop = ("HOME", "XDG_STATE_HOME")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
    proc = subprocess.run(
        [sys.executable, "-c", program, "db", "upgrade", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in environ.items() if k not in drop},
    )
    _refused(proc, f"{path}: {_NO_HOME}")


# -- a TOML value nested too deeply to read --------------------------------------------------


def _deep(tmp_path: Path, depth: int) -> Path:
    """A config file whose `[site] name` is an array nested `depth` levels deep."""
    path = tmp_path / "deep.toml"
    path.write_text(f"[site]\nname = {'[' * depth}{']' * depth}\n[store]\nbucket = 'b'\n")
    return path


def test_a_value_nested_too_deeply_is_not_valid_toml(tmp_path: Path) -> None:
    # Before: tomllib's RecursionError ended the CLI as an internal error (exit 70).
    path = _deep(tmp_path, 3000)
    with pytest.raises(InvalidInput) as info:
        load_config(path, env={})
    assert str(info.value) == (
        f"config file '{path}' is not valid TOML: it nests arrays or tables too deeply to read"
    )


def test_a_value_nested_too_deeply_is_refused_by_the_cli(tmp_path: Path) -> None:
    path = _deep(tmp_path, 3000)
    _refused(
        _cli(path, {}, "db", "upgrade"),
        f"config file '{path}' is not valid TOML: it nests arrays or tables too deeply to read",
    )


def test_a_value_nested_deeply_but_readable_is_named(tmp_path: Path) -> None:
    # Nested as deeply as tomllib reads, the value is refused as any other of the wrong type.
    path = _deep(tmp_path, 200)
    with pytest.raises(InvalidInput, match=re.escape(f"{path}: [site] name = [[[[")):
        load_config(path, env={})


# -- a state directory from the environment that cannot be created ---------------------------


def test_a_state_dir_from_the_environment_is_blamed_on_its_variable(tmp_path: Path) -> None:
    # Before: "<file>: [site] state_dir '...' cannot be created", though the file did not
    # set it.
    path = tmp_path / "site.toml"
    path.write_text(GOOD)
    taken = tmp_path / "a-file"
    taken.write_text("")
    cfg = load_config(path, env={"DATAMOVER_SITE_STATE_DIR": str(taken)})
    with pytest.raises(InvalidInput) as info:
        make_state_dir(cfg)
    assert str(info.value) == (
        f"environment: DATAMOVER_SITE_STATE_DIR '{taken}' cannot be created: File exists"
    )
    # Set in the file, the file is still named.
    path.write_text(GOOD.replace("[store]", f"state_dir = '{taken}'\n[store]"))
    with pytest.raises(InvalidInput) as info:
        make_state_dir(load_config(path, env={}))
    assert str(info.value) == f"{path}: [site] state_dir '{taken}' cannot be created: File exists"


def test_a_state_dir_from_the_environment_is_blamed_on_its_variable_by_the_cli(
    tmp_path: Path,
) -> None:
    path = _site(tmp_path)
    taken = tmp_path / "a-file"
    taken.write_text("")
    _refused(
        _cli(path, {"DATAMOVER_SITE_STATE_DIR": str(taken / "state")}, "db", "upgrade"),
        f"environment: DATAMOVER_SITE_STATE_DIR '{taken / 'state'}' cannot be created: "
        "Not a directory",
    )


# -- an empty variable counts as not set -------------------------------------------------------

HPC = Path(__file__).parent.parent / "config" / "hpc-site.toml"

_EVERY_KEY = [
    f"DATAMOVER_{section.upper()}_{f.name.upper()}"
    for section, cls in _SECTIONS.items()
    for f in dataclasses.fields(cls)
]


@pytest.mark.parametrize("name", [*_EVERY_KEY, "DATAMOVER_NAMESPACE"])
def test_an_empty_variable_leaves_the_files_value(name: str) -> None:
    # Before: the empty string replaced the file's value, and was then read as "not set":
    # DATAMOVER_SITE_CATALOG= swapped the PostgreSQL catalog for a default SQLite file (a
    # daemon on an empty catalog), DATAMOVER_STORE_ENDPOINT= sent requests to AWS,
    # DATAMOVER_NAMESPACE= emptied the namespace map; a bool or a number was an error.
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    assert load_config(HPC, env={**env, name: ""}) == load_config(HPC, env=env)


def test_an_empty_catalog_variable_keeps_the_postgresql_catalog() -> None:
    cfg = load_config(HPC, env={"DATAMOVER_SITE_CATALOG": "", "DATAMOVER_STORE_ENDPOINT": ""})
    assert cfg.catalog_url == "postgresql://datamover@db.hpc-a.example.org/datamover"
    assert cfg.store.endpoint == "https://s3.example.org"
    assert cfg.overrides == frozenset()  # nothing is blamed on a variable that set nothing
    assert cfg.origin("site", "catalog") == f"{HPC}: [site] catalog"


def test_an_empty_variable_of_a_required_key_missing_from_the_file_names_both(
    tmp_path: Path,
) -> None:
    path = tmp_path / "site.toml"
    path.write_text(GOOD.replace('bucket = "datamover"\n', ""))
    with pytest.raises(InvalidInput) as info:
        load_config(path, env={"DATAMOVER_STORE_BUCKET": ""})
    assert str(info.value) == (
        f"{path}: [store] bucket is required (environment: DATAMOVER_STORE_BUCKET is empty, "
        "which counts as not set)"
    )


def test_a_namespace_variable_that_names_no_pair_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(GOOD)
    with pytest.raises(InvalidInput) as info:
        load_config(path, env={"DATAMOVER_NAMESPACE": " , "})
    assert str(info.value) == (
        "environment DATAMOVER_NAMESPACE = ' , ' names no /logical=/local/dir pair (unset it, "
        "or set it empty, to keep the file's [namespace])"
    )


def test_an_empty_misspelt_variable_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(GOOD)
    with pytest.raises(InvalidInput, match="DATAMOVER_STORE_ENDPIONT is not a setting"):
        load_config(path, env={"DATAMOVER_STORE_ENDPIONT": ""})


def test_serve_with_an_empty_listen_variable_blames_the_file(tmp_path: Path) -> None:
    # The file sets no [api] listen and the variable is empty: the file is what lacks it.
    path = _site(tmp_path)
    _refused(
        _cli(path, {"DATAMOVER_API_LISTEN": ""}, "serve"),
        f"{path}: [api] listen is not set; nothing to serve on",
    )
    path.write_text(path.read_text() + "[api]\nlisten = '127.0.0.1:8650'\n")
    assert load_config(path, env={"DATAMOVER_API_LISTEN": ""}).api.listen == "127.0.0.1:8650"


# -- the false spellings of a boolean variable ---------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("no", False),
        ("off", False),
        ("NO", False),
        ("Off", False),
        ("0", False),
        ("false", False),
        ("yes", True),
        ("on", True),
        ("ON", True),
        (" true ", True),
    ],
)
def test_a_boolean_variable_takes_the_usual_spellings(
    tmp_path: Path, value: str, expected: bool
) -> None:
    # Before: yes and on were read, their opposites no and off refused.
    path = tmp_path / "site.toml"
    path.write_text(GOOD)
    cfg = load_config(path, env={"DATAMOVER_TRANSFER_FSYNC": value})
    assert cfg.transfer.fsync is expected
    cfg = load_config(path, env={"DATAMOVER_API_OPEN_METRICS": value})
    assert cfg.api.open_metrics is expected


def test_a_boolean_variable_of_another_word_is_one_line(tmp_path: Path) -> None:
    path = _site(tmp_path)
    _refused(
        _cli(path, {"DATAMOVER_TRANSFER_SPARSE": "nope"}, "db", "upgrade"),
        "environment: DATAMOVER_TRANSFER_SPARSE = 'nope' is not a valid bool",
    )


# -- the state directory and a SQLite catalog outside every mapped tree --------------------


def _mapped(tmp_path: Path, site: str) -> Path:
    """A config mapping '/proj' to `tmp_path/proj`, with `site` as its [site] lines."""
    path = tmp_path / "site.toml"
    path.write_text(
        f"[site]\nname = 'a'\n{site}\n[store]\nbucket = 'b'\n"
        f"[namespace]\n'/proj' = '{tmp_path / 'proj'}'\n'/ref' = '/srv/ref'\n"
    )
    return path


_INSIDE = (
    "(a push would publish it and a stage --delete move it to its own trash): keep them apart "
    "(set it outside every mapped tree)"
)


def test_the_default_catalog_under_a_mapped_home_directory_is_accepted(tmp_path: Path) -> None:
    # Before: the default state directory was let be in a mapped tree (push and stage refuse
    # a dataset whose tree holds it), but the default catalog in it was refused, naming a
    # `[site] catalog` never set: every command failed where `/home` is mapped.
    home = tmp_path / "proj" / "me"
    cfg = load_config(_mapped(tmp_path, ""), env={"XDG_STATE_HOME": f"{home}/.local/state"})
    assert cfg.catalog_url == f"sqlite:///{home}/.local/state/datamover/a/catalog.db"
    # One set by hand is refused there, as before.
    with pytest.raises(InvalidInput, match=r"\[site\] catalog .* is inside the tree"):
        load_config(_mapped(tmp_path, f"catalog = 'sqlite:///{home}/c.db'"), env={})


def test_a_state_dir_inside_a_mapped_tree_is_refused(tmp_path: Path) -> None:
    # Before: accepted; every `stage --delete` of /proj then failed for ever ("cannot move
    # '.dmstate' to the trash ... Invalid argument") and a push published the state files.
    proj = tmp_path / "proj"
    path = _mapped(tmp_path, f"state_dir = '{proj}/.dmstate'")
    with pytest.raises(InvalidInput) as info:
        load_config(path, env={})
    assert str(info.value) == (
        f"{path}: [site] state_dir '{proj}/.dmstate' is inside the tree of [namespace] "
        f"'/proj' = '{proj}' {_INSIDE}"
    )


@pytest.mark.parametrize(
    ("site", "env", "says"),
    [
        ("state_dir = 'proj'", {}, "[site] state_dir '{proj}' is inside"),  # the tree itself
        ("state_dir = 'proj/../proj//s'", {}, "[site] state_dir '{proj}/s' is inside"),
        ("state_dir = '/srv/ref/x/../s'", {}, "[site] state_dir '/srv/ref/s' is inside"),
        ("state_dir = '.'", {}, "[site] state_dir '{tmp}' holds the tree of [namespace] '/proj'"),
        ("state_dir = '/'", {}, "[site] state_dir '/' holds the tree of [namespace] '/proj'"),
        ("state_dir = '//srv/ref/st'", {}, "[site] state_dir '/srv/ref/st' is inside"),
        (
            "state_dir = '/var/tmp/s'",
            {"DATAMOVER_SITE_STATE_DIR": "/srv/ref/st"},
            "environment: DATAMOVER_SITE_STATE_DIR '/srv/ref/st' is inside the tree of {file}: "
            "[namespace] '/ref'",
        ),
        (
            "state_dir = '/var/tmp/s'",
            {"DATAMOVER_NAMESPACE": "/p=/var"},
            "[site] state_dir '/var/tmp/s' is inside the tree of DATAMOVER_NAMESPACE's '/p' = "
            "'/var'",
        ),
        (
            "state_dir = '/var/tmp/s'\ncatalog = 'sqlite:///proj/db/catalog.db'",
            {},
            "[site] catalog '{proj}/db/catalog.db' is inside the tree of [namespace] '/proj' = "
            "'{proj}' (a push would publish it and a stage --delete move it to the trash)",
        ),
        (
            "state_dir = '/var/tmp/s'",
            {"DATAMOVER_SITE_CATALOG": "sqlite+aiosqlite:////srv/ref/c.db?timeout=5"},
            "environment: DATAMOVER_SITE_CATALOG '/srv/ref/c.db' is inside",
        ),
    ],
)
def test_state_and_catalog_nested_with_a_mapped_tree_are_refused(
    tmp_path: Path, site: str, env: dict[str, str], says: str
) -> None:
    path = _mapped(tmp_path, site)
    expected = says.format(proj=tmp_path / "proj", tmp=tmp_path, file=path)
    with pytest.raises(InvalidInput) as info:
        load_config(path, env=env)
    assert expected in str(info.value)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize(
    "site",
    [
        "state_dir = 'state'",
        "state_dir = 'project'",  # beside 'proj', not in it
        "state_dir = '/srv/reference'",
        "state_dir = 'state'\ncatalog = 'sqlite:///:memory:'",
        "state_dir = 'state'\ncatalog = 'postgresql://u@db/proj'",
        "state_dir = 'state'\ncatalog = 'sqlite:///project.db'",
    ],
)
def test_state_and_catalog_beside_the_mapped_trees_are_accepted(tmp_path: Path, site: str) -> None:
    assert load_config(_mapped(tmp_path, site), env={}).site.name == "a"


def test_a_state_dir_inside_a_mapped_tree_is_one_line_from_the_cli(tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    path = _mapped(tmp_path, f"state_dir = '{proj}/.dmstate'")
    _refused(
        _cli(path, {}, "ls", "/proj"),
        f"{path}: [site] state_dir '{proj}/.dmstate' is inside the tree of [namespace] "
        f"'/proj' = '{proj}' {_INSIDE}",
    )
    assert not proj.exists()  # nothing was created


def test_a_token_file_inside_a_mapped_tree_is_refused(tmp_path: Path) -> None:
    # A token is a secret: in a tree, the next push put it in the store for every site.
    path = _mapped(tmp_path, "state_dir = 'state'")
    path.write_text(path.read_text() + f"[api]\ntoken_file = '{tmp_path}/proj/.token'\n")
    with pytest.raises(InvalidInput, match=r"\[api\] token_file '.*/proj/\.token' is inside"):
        load_config(path, env={})
    path.write_text(path.read_text().replace("/proj/.token", "/token"))
    assert load_config(path, env={}).api.token_file == f"{tmp_path}/token"
