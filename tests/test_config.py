"""Site configuration: TOML parsing, environment overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from datamover.config import load_config, parse_config
from datamover.errors import InvalidInput

GOOD = """
[site]
name = "hpc-a"
catalog = "sqlite:////var/lib/datamover/hpc-a.db"
[store]
endpoint = "http://127.0.0.1:8333"
bucket = "datamover"
region = "us-east-1"
access_key = "k"
secret_key = "s"
[namespace]
"/proj" = "/public/home/dp/proj"
"""


def test_example_configs_parse() -> None:
    configs = sorted(Path(__file__).parent.parent.joinpath("config").glob("*.toml"))
    assert configs, "config/ must hold an example per role"
    for path in configs:
        cfg = load_config(path, env={})
        assert cfg.site.name
        assert cfg.namespace.prefixes


def test_values_and_environment_override(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(GOOD)
    cfg = load_config(path, env={})
    assert cfg.store.bucket == "datamover"
    assert cfg.namespace.resolve("/proj/x") == Path("/public/home/dp/proj/x")
    env = {
        "DATAMOVER_STORE_BUCKET": "other",
        "DATAMOVER_TRANSFER_PACK_SIZE": "8388608",
        "DATAMOVER_NAMESPACE": "/data=/mnt/data,/proj=/scratch/proj",
    }
    cfg = load_config(path, env=env)
    assert cfg.store.bucket == "other"
    assert cfg.transfer.pack_size == 8 << 20
    assert cfg.namespace.resolve("/proj/x") == Path("/scratch/proj/x")


def test_credentials_fall_back_to_aws_environment(tmp_path: Path) -> None:
    text = GOOD.replace('access_key = "k"\n', "").replace('secret_key = "s"\n', "")
    cfg = parse_config(
        __import__("tomllib").loads(text),
        "x.toml",
        env={"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"},
    )
    assert (cfg.store.access_key, cfg.store.secret_key) == ("AK", "SK")


_T = "[site]\nname='a'\n[store]\nbucket='b'\n[transfer]\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[site]\nname='a'\n[store]\nbucket='b'\n[namespace]\n'/p'='/x'\n[bogus]\n",
            "unknown section",
        ),
        ("[site]\nname='a'\ncolour='red'\n[store]\nbucket='b'\n", "unknown key"),
        ("[site]\nname='A B'\n[store]\nbucket='b'\n", "invalid site name"),
        ("[site]\nname='a'\n[store]\n", "bucket is required"),
        ("[site]\nname='a'\n[store]\nbucket='b'\n[transfer]\npack_size='big'\n", "not a valid int"),
        ("[site]\nname='a'\n[store]\nbucket='b'\n[namespace]\n'proj'='/x'\n", "must start with"),
        ("[site\n", "not valid TOML"),
        (_T + "zstd_level = 23\n", "zstd_level must be between 1 and 22"),
        (_T + "write_workers = -2\n", "write_workers must be -1"),
        (_T + "read_workers = -1\n", "read_workers must not be negative"),
        (_T + "bandwidth_limit = -5\n", "bandwidth_limit must not be negative"),
        (_T + "batch_bytes = 0\n", "batch_bytes must be at least 1"),
        (_T + "pack_size = 1024\n", "pack_size must be between 1 MiB and 1 GiB"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InvalidInput, match=message) as info:
        load_config(path, env={})
    assert "\n" not in str(info.value)


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})
    with pytest.raises(InvalidInput, match="no configuration"):
        load_config(None, env={})
