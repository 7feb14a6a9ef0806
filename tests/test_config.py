"""Site configuration: TOML parsing, environment overrides, clear errors."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

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


def test_a_prefix_mapped_twice_in_the_environment_is_refused(tmp_path: Path) -> None:
    """As a key twice in the file is a TOML error; the second mapping had won, silently."""
    path = tmp_path / "site.toml"
    path.write_text(GOOD)
    env = {"DATAMOVER_NAMESPACE": "/proj=/a, /data=/d ,/proj =/b"}
    with pytest.raises(InvalidInput) as caught:
        load_config(path, env=env)
    assert str(caught.value) == (
        "environment DATAMOVER_NAMESPACE: prefix '/proj' is mapped twice ('/a' and '/b'); keep one"
    )


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
        (_T + "read_workers = 100000\n", "read_workers must be at most 256"),
        (_T + "write_workers = 257\n", "write_workers must be at most 256"),
        (_T + "bandwidth_limit = -5\n", "bandwidth_limit must not be negative"),
        (_T + "batch_bytes = 0\n", "batch_bytes must be at least 1"),
        (_T + "lookup_threads = 0\n", "lookup_threads must be at least 1"),
        (_T + "lookup_threads = 257\n", "lookup_threads must be at most 256"),
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


_A = "[site]\nname='a'\n[store]\nbucket='b'\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_A + "[api]\nworkers = 3.9\n", "workers = 3.9 is not a valid int"),
        (_A + "[api]\nworkers = 3.0\n", "is not a valid int"),
        (_A + "[api]\nworkers = true\n", "is not a valid int"),
        (_A + "[api]\nlease_seconds = true\n", "is not a valid finite number"),
        (_A + "[api]\nlease_seconds = nan\n", "is not a valid finite number"),
        (_A + "[api]\nlease_seconds = inf\n", "is not a valid finite number"),
        (_A + "[api]\nhistory_days = nan\n", "[api] history_days = nan is not a valid finite"),
        (_A + "[api]\nhistory_days = inf\n", "[api] history_days = inf is not a valid finite"),
        (_A + "[api]\nhistory_days = '30d'\n", "history_days = '30d' is not a valid finite"),
        (_A + "connect_timeout = inf\n", "[store] connect_timeout = inf"),
        (_A + "connect_timeout = 0\n", "connect_timeout must be more than 0"),
        (_A + "read_timeout = -1.5\n", "read_timeout must be more than 0"),
    ],
)
def test_numbers_are_not_bent(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(path, env={})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATAMOVER_API_LEASE_SECONDS", "nan"),
        ("DATAMOVER_API_LEASE_SECONDS", "inf"),
        ("DATAMOVER_API_LEASE_SECONDS", "1e999"),
        ("DATAMOVER_API_WORKERS", "3.9"),
        ("DATAMOVER_STORE_READ_TIMEOUT", "-inf"),
        ("DATAMOVER_API_HISTORY_DAYS", "nan"),
        ("DATAMOVER_API_HISTORY_DAYS", "1e999"),
    ],
)
def test_bad_numbers_from_the_environment(tmp_path: Path, name: str, value: str) -> None:
    path = tmp_path / "site.toml"
    path.write_text(GOOD)
    with pytest.raises(InvalidInput, match=f"environment: {name} = {value!r}"):
        load_config(path, env={name: value})


def test_good_numbers_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(GOOD)
    env = {"DATAMOVER_API_WORKERS": " 4", "DATAMOVER_API_LEASE_SECONDS": "12.5"}
    cfg = load_config(path, env=env)
    assert (cfg.api.workers, cfg.api.lease_seconds) == (4, 12.5)
    path.write_text(GOOD + "[api]\nlease_seconds = 20\n")  # a TOML integer is a fine float
    assert load_config(path, env={}).api.lease_seconds == 20.0


def test_a_config_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    # Before: "is not valid TOML: Invalid statement (at line 1, column 1)", with no word of
    # the mark a Windows editor had written first.
    plain, marked = tmp_path / "plain.toml", tmp_path / "marked.toml"
    plain.write_text(GOOD)
    marked.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    read = load_config(marked, env={})
    assert dataclasses.replace(read, source=str(plain)) == load_config(plain, env={})


def test_unreadable_config_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(GOOD.replace('"datamover"', '"caf\xe9"').encode("latin-1"))
    with pytest.raises(InvalidInput, match="is not UTF-8 text"):
        load_config(path, env={})
    loop = tmp_path / "loop"
    loop.symlink_to(loop)  # reading it fails with ELOOP, an OSError of its own
    with pytest.raises(InvalidInput, match="cannot be read: Too many levels of symbolic links"):
        load_config(loop, env={})


_P = "[site]\nname='a'\nstate_dir='/tmp/s'\n[store]\nbucket='b'\n[namespace]\n'/proj'='/tmp/p'\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            _P.replace("'/tmp/p'", '"/tmp/x\\u0000y"'),
            "[namespace] '/proj' maps to a path with a NUL",
        ),
        (_P.replace("'/tmp/s'", '"/tmp/x\\u0000y"'), "[site] state_dir contains a NUL character"),
        (_P.replace("'/tmp/s'", '"x\\u0000y"'), "[site] state_dir contains a NUL character"),
        (_P + '[api]\ntoken_file = "x\\u0000y"\n', "[api] token_file contains a NUL character"),
        (
            _P.replace("state_dir", 'catalog = "sqlite:///x\\u0000y"\nstate_dir'),
            "[site] catalog contains a NUL character",
        ),
        (
            _P.replace("state_dir", 'catalog = "sqlite:////tmp/x\\u0000y"\nstate_dir'),
            "[site] catalog contains a NUL character",
        ),
    ],
    ids=["namespace", "state_dir", "relative state_dir", "token_file", "catalog", "abs catalog"],
)
def test_a_nul_in_a_path_setting_is_named(tmp_path: Path, text: str, message: str) -> None:
    # Before: a relative one raised "ValueError: embedded null byte" (an internal error, exit
    # 70) while made absolute; an absolute one was accepted and failed at its first use.
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InvalidInput, match=re.escape(message)) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DATAMOVER_STORE_REGION": "us\neast"}, "DATAMOVER_STORE_REGION"),
        ({"DATAMOVER_SITE_NAME": "a\tb"}, "DATAMOVER_SITE_NAME"),
        ({"DATAMOVER_STORE_BUCKET": "b\x7f"}, "DATAMOVER_STORE_BUCKET"),
    ],
)
def test_a_control_character_in_any_setting_is_named(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    """The region's newline had reached botocore, whose message was cut at it."""
    path = tmp_path / "site.toml"
    path.write_text(_P)
    with pytest.raises(InvalidInput) as info:
        load_config(path, env=env)
    text = str(info.value)
    assert message in text and "contains a control character (U+00" in text
    assert "\n" not in text and "east" not in text  # the value is not shown: it may be a secret


_S = "[site]\nname='a'\n[store]\nbucket='b'\naccess_key='k'\nsecret_key='s'\n"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        (_S + "endpoint='http://user:pw@127.0.0.1:9'\n", {}, "[store] endpoint must not hold"),
        (_S + "endpoint='https://:pw@s3.example.org'\n", {}, "[store] endpoint must not hold"),
        (_S + "endpoint='http://127.0.0.1:21218/some/path'\n", {}, "[store] endpoint 'http"),
        (_S + "endpoint='http://127.0.0.1:21218/?x=1'\n", {}, "has a path, a query"),
        (_S + 'endpoint="http://127.0.0.1:9\\n"\n', {}, "contains a control character"),
        (_S, {"DATAMOVER_STORE_ENDPOINT": "http://u:pw@h"}, "DATAMOVER_STORE_ENDPOINT must not"),
        (_S.replace("'k'", '"AKIA\\n"'), {}, "[store] access_key contains a control character"),
        (_S.replace("'s'", '"pw\\u0007"'), {}, "[store] secret_key contains a control character"),
        (
            _S.replace("access_key='k'\n", ""),
            {"AWS_ACCESS_KEY_ID": "AKIA\t"},
            "environment: AWS_ACCESS_KEY_ID contains a control character",
        ),
    ],
    ids=[
        "user:pw",
        ":pw",
        "path",
        "query",
        "newline",
        "user:pw from the environment",
        "access_key",
        "secret_key",
        "AWS_ACCESS_KEY_ID",
    ],
)
def test_store_settings_that_no_request_can_carry_are_named_without_secrets(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    # Before: accepted, then every request failed ("Potential header injection attack",
    # "Cannot combine AUTHORIZATION header with ... credentials encoded in URL") and was
    # retried as a store outage (exit 6), the password in every line; a path was sent on.
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InvalidInput, match=re.escape(message)) as info:
        load_config(path, env=env)
    assert "pw" not in str(info.value) and "AKIA" not in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:8333", "https://s3.example.org/"])
def test_an_endpoint_of_host_and_port_is_accepted(tmp_path: Path, endpoint: str) -> None:
    path = tmp_path / "site.toml"
    path.write_text(GOOD.replace("http://127.0.0.1:8333", endpoint))
    assert load_config(path, env={}).store.endpoint == endpoint


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_A + "retry_attempts = 0\n", "[store] retry_attempts must be at least 1"),
        (_A + "max_connections = 0\n", "[store] max_connections must be at least 1"),
        (_A + "[api]\nmax_attempts = 0\n", "[api] max_attempts must be at least 1"),
    ],
)
def test_store_and_api_counts_are_named(tmp_path: Path, text: str, message: str) -> None:
    # Before: retry_attempts = 0 was "bad retry settings attempts=0 initial=0.2" from the
    # store's wrapper, naming no setting; max_connections = 0 was botocore's own complaint.
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InvalidInput, match=re.escape(f"{path}: {message}")):
        load_config(path, env={})


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DATAMOVER_STORE_RETRY_ATTEMPTS", "0", " must be at least 1"),
        ("DATAMOVER_TRANSFER_PACK_SIZE", "-1", " must be between 1 MiB and 1 GiB"),
        ("DATAMOVER_TRANSFER_ZSTD_LEVEL", "0", " must be between 1 and 22"),
        ("DATAMOVER_TRANSFER_COMPRESSION", "lz4", " must be 'auto' or 'never'"),
        ("DATAMOVER_STORE_READ_TIMEOUT", "0", " must be more than 0 seconds"),
        ("DATAMOVER_API_WORKERS", "0", " must be at least 1"),
        ("DATAMOVER_API_LISTEN", "nowhere", " must be host:port"),
        ("DATAMOVER_SITE_NAME", "A B", ": invalid site name"),
    ],
)
def test_a_bad_value_from_the_environment_is_blamed_on_its_variable(
    tmp_path: Path, name: str, value: str, message: str
) -> None:
    # Before: "<file>: [transfer] pack_size must be ...", "<file>: [site] name is required":
    # the file was blamed for what the environment set.
    path = tmp_path / "site.toml"
    path.write_text(GOOD)
    with pytest.raises(
        InvalidInput, match="^" + re.escape(f"environment: {name}{message}")
    ) as info:
        load_config(path, env={name: value})
    assert str(path) not in str(info.value)


def test_the_most_workers_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(GOOD + "[transfer]\nread_workers = 256\nwrite_workers = 256\n")
    cfg = load_config(path, env={})
    assert (cfg.transfer.read_workers, cfg.transfer.write_workers) == (256, 256)


def test_a_config_that_is_not_a_regular_file_is_refused_without_waiting(tmp_path: Path) -> None:
    # Before: a FIFO blocked the reader until something wrote to it (here a thread opening
    # it after a while, so a regression fails instead of hanging); a directory was named.
    fifo = tmp_path / "site.toml"
    os.mkfifo(fifo)
    unblock = threading.Timer(5, lambda: os.close(os.open(fifo, os.O_WRONLY)))
    unblock.start()
    try:
        with pytest.raises(InvalidInput, match="is not a regular file") as info:
            load_config(fifo, env={})
    finally:
        unblock.cancel()
    assert str(info.value) == (
        f"config file '{fifo}' is not a regular file (a FIFO, a socket or a device)"
    )
    with pytest.raises(InvalidInput, match=f"config file '{tmp_path}' is a directory"):
        load_config(tmp_path, env={})


def _cli(config: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`datamover ARGS --config CONFIG` in a subprocess, with `env` as the only `DATAMOVER_*`
    variables."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
    return subprocess.run(
        [sys.executable, "-m", "datamover", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environ, **env},
    )


def _refused(proc: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit 2 and `message` as the one line on stderr: no traceback, no other output."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr == f"datamover: error: {message}\n", proc.stderr
    assert proc.stdout == ""


_HUGE = 10**9

#: What the CLI says of `setting = 10**9`, its unit after the bound.
_BOUNDS = [
    ("transfer", "upload_concurrency", "256 (packs uploaded at once, each held in memory)"),
    ("transfer", "download_concurrency", "256 (requests at once, each range held in memory)"),
    ("api", "workers", "64 (transfers at once, each with its own processes and connections)"),
    ("store", "max_connections", "1024 (sockets to the store, each a file descriptor)"),
    ("transfer", "segment_entries", "65536 (entries of a manifest segment, held in memory)"),
    ("api", "max_attempts", "1000 (tries of a transfer, up to 5 minutes apart)"),
    ("api", "history_days", "3650 (ten years; 0 keeps finished transfers for ever)"),
    ("api", "reindex_minutes", "10080 (a week; 0: the daemon never indexes the store's packs)"),
    ("api", "trash_days", "3650 (ten years; 0: the daemon never empties the trash)"),
]


def _site(tmp_path: Path, extra: str = "") -> Path:
    """A config file whose catalog and state live under `tmp_path / "state"`; `extra` goes
    at the end of its `[store]` table."""
    path = tmp_path / "site.toml"
    path.write_text(
        f"[site]\nname = 'a'\nstate_dir = '{tmp_path / 'state'}'\n"
        f"[store]\nbucket = 'b'\nendpoint = 'http://127.0.0.1:9'\n{extra}"
        f"[namespace]\n'/proj' = '{tmp_path / 'proj'}'\n"
    )
    return path


@pytest.mark.parametrize(("section", "key", "bound"), _BOUNDS, ids=[b[1] for b in _BOUNDS])
def test_a_huge_count_in_the_file_is_refused_by_the_cli(
    tmp_path: Path, section: str, key: str, bound: str
) -> None:
    # Before: accepted; `serve` built that many workers, a push held that many packs in
    # memory, a stage that many ranges.
    if section == "store":
        path = _site(tmp_path, f"{key} = {_HUGE}\n")
    else:
        path = _site(tmp_path)
        path.write_text(f"{path.read_text()}[{section}]\n{key} = {_HUGE}\n")
    _refused(_cli(path, {}, "db", "upgrade"), f"{path}: [{section}] {key} must be at most {bound}")
    assert not (tmp_path / "state").exists()  # nothing was created


@pytest.mark.parametrize(("section", "key", "bound"), _BOUNDS[:3], ids=[b[1] for b in _BOUNDS[:3]])
def test_a_huge_count_from_the_environment_is_blamed_on_its_variable(
    tmp_path: Path, section: str, key: str, bound: str
) -> None:
    path = _site(tmp_path)
    name = f"DATAMOVER_{section.upper()}_{key.upper()}"
    _refused(
        _cli(path, {name: str(_HUGE)}, "db", "upgrade"),
        f"environment: {name} must be at most {bound}",
    )
    assert not (tmp_path / "state").exists()


#: Settings that fed clock, socket or float arithmetic unchecked, a value past their bound
#: as the file and a variable would set it, and what the CLI says of it. Before: accepted;
#: lease_seconds = 1e300 failed every claim of `serve` with OverflowError, a timeout of
#: 1e300 every store request, retry_attempts past 1024 a listing's backoff; the others let
#: a typo pass as a limit not applied (a rate) or a range held whole in memory.
_OVERFLOWING = [
    (
        "api",
        "lease_seconds",
        "1e300",
        "86400 (seconds before a dead worker's transfer is taken over)",
    ),
    (
        "store",
        "connect_timeout",
        "1e300",
        "3600 (seconds to wait for the store to accept a connection)",
    ),
    ("store", "read_timeout", "86400.5", "3600 (seconds a request waits on a silent connection)"),
    (
        "store",
        "retry_attempts",
        "2000",
        "100 (tries of a store call, up to 5 s apart; then the transfer's own retries take over)",
    ),
    (
        "transfer",
        "max_request",
        str(1 << 40),
        "1073741824 (1 GiB; each ranged read is held in memory)",
    ),
    (
        "transfer",
        "coalesce_gap",
        str((1 << 30) + 1),
        "1073741824 (1 GiB of unwanted bytes read to save a request)",
    ),
    (
        "transfer",
        "bandwidth_limit",
        str(10**30),
        "1099511627776 (bytes per second, 1 TiB/s; 0: unlimited)",
    ),
]


@pytest.mark.parametrize("source", ["file", "environment"])
@pytest.mark.parametrize(
    ("section", "key", "value", "bound"), _OVERFLOWING, ids=[b[1] for b in _OVERFLOWING]
)
def test_a_time_size_or_rate_past_its_bound_is_refused_by_the_cli(
    tmp_path: Path, source: str, section: str, key: str, value: str, bound: str
) -> None:
    path = _site(tmp_path)
    name = f"DATAMOVER_{section.upper()}_{key.upper()}"
    if source == "file":
        env, blamed = {}, f"{path}: [{section}] {key}"
        if section == "store":
            path = _site(tmp_path, f"{key} = {value}\n")
        else:
            path.write_text(f"{path.read_text()}[{section}]\n{key} = {value}\n")
    else:
        env, blamed = {name: value}, f"environment: {name}"
    _refused(_cli(path, env, "db", "upgrade"), f"{blamed} must be at most {bound}")
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("api", "lease_seconds", "1" + "0" * 400), ("store", "read_timeout", "-1" + "0" * 400)],
)
def test_an_integer_too_large_for_a_float_setting_is_refused_by_the_cli(
    tmp_path: Path, section: str, key: str, value: str
) -> None:
    # Before: "internal error (OverflowError: int too large to convert to float)", exit 70.
    if section == "store":
        path = _site(tmp_path, f"{key} = {value}\n")
    else:
        path = _site(tmp_path)
        path.write_text(f"{path.read_text()}[{section}]\n{key} = {value}\n")
    _refused(
        _cli(path, {}, "db", "upgrade"),
        f"{path}: [{section}] {key} = {value[:20]}... ({len(value)} characters) "
        "is not a valid finite number",
    )
    assert not (tmp_path / "state").exists()


def test_an_integer_too_long_to_read_is_refused_by_the_cli(tmp_path: Path) -> None:
    # Before: "internal error (ValueError: Exceeds the limit (4300 digits) for integer string
    # conversion...)", exit 70: tomllib raises ValueError, not TOMLDecodeError, for it.
    path = _site(tmp_path)
    path.write_text(path.read_text() + "[api]\nworkers = 1" + "0" * 5000 + "\n")
    _refused(
        _cli(path, {}, "db", "upgrade"),
        f"config file '{path}' is not valid TOML: it holds a number too long to read",
    )
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_A + "max_connections = 1025\n", "[store] max_connections must be at most 1024"),
        (_T + "upload_concurrency = 257\n", "[transfer] upload_concurrency must be at most 256"),
        (
            _T + "download_concurrency = 257\n",
            "[transfer] download_concurrency must be at most 256",
        ),
        (_T + "segment_entries = 65537\n", "[transfer] segment_entries must be at most 65536"),
        (
            _T + f"batch_bytes = {(1 << 30) + 1}\n",
            "[transfer] batch_bytes must be at most 1073741824 (1 GiB;",
        ),
        (_A + "[api]\nworkers = 65\n", "[api] workers must be at most 64"),
        # Before: accepted, then every transfer submission failed on PostgreSQL ("value out
        # of int32 range", an internal error), from 2**63 on SQLite too.
        (_A + f"[api]\nmax_attempts = {2**31}\n", "[api] max_attempts must be at most 1000"),
        # Before: no such setting; a retention of a million days reaches back before the
        # year 1, and every prune would have failed.
        (_A + "[api]\nhistory_days = 3650.5\n", "[api] history_days must be at most 3650"),
    ],
)
def test_counts_one_past_their_bound_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InvalidInput, match=re.escape(f"{path}: {message}")) as info:
        load_config(path, env={})
    assert "\n" not in str(info.value)


def test_counts_at_their_bound_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        GOOD.replace('region = "us-east-1"\n', 'region = "us-east-1"\nmax_connections = 1024\n')
        + "[transfer]\nupload_concurrency = 256\ndownload_concurrency = 256\n"
        "segment_entries = 65536\nbatch_bytes = 1073741824\n"
        "max_request = 1073741824\ncoalesce_gap = 1073741824\nbandwidth_limit = 1099511627776\n"
        "[api]\nworkers = 64\nmax_attempts = 1000\nlease_seconds = 86400\nhistory_days = 3650\n"
    )
    env = {
        "DATAMOVER_STORE_CONNECT_TIMEOUT": "3600",
        "DATAMOVER_STORE_READ_TIMEOUT": "3600.0",
        "DATAMOVER_STORE_RETRY_ATTEMPTS": "100",
    }
    cfg = load_config(path, env=env)
    assert (cfg.store.connect_timeout, cfg.store.read_timeout) == (3600, 3600)
    assert (cfg.store.retry_attempts, cfg.api.lease_seconds) == (100, 86400)
    assert (cfg.transfer.max_request, cfg.transfer.coalesce_gap) == (1 << 30, 1 << 30)
    assert cfg.transfer.bandwidth_limit == 1 << 40
    assert cfg.store.max_connections == 1024
    t = cfg.transfer
    assert (t.upload_concurrency, t.download_concurrency) == (256, 256)
    assert (t.segment_entries, t.batch_bytes, cfg.api.workers) == (65536, 1 << 30, 64)
    assert (cfg.api.max_attempts, cfg.api.history_days) == (1000, 3650.0)


@pytest.mark.parametrize(
    ("value", "days"), [(None, 30.0), ("0", 0.0), (repr(1 / 24), 1 / 24), ("90", 90.0)]
)
def test_history_days_is_0_for_ever_or_an_hour_and_more(
    tmp_path: Path, value: str | None, days: float
) -> None:
    path = tmp_path / "site.toml"
    path.write_text(GOOD + (f"[api]\nhistory_days = {value}\n" if value else ""))
    assert load_config(path, env={}).api.history_days == days
    if value is not None:
        path.write_text(GOOD)
        env = {"DATAMOVER_API_HISTORY_DAYS": value}
        assert load_config(path, env=env).api.history_days == days


@pytest.mark.parametrize("value", ["-1", "-0.5", "0.04", "1e-9"])
def test_history_days_below_an_hour_but_0_is_refused(tmp_path: Path, value: str) -> None:
    # A record deleted minutes after it ended is a 404 for the `stage --wait` that asks again
    # after a daemon restart, and a second transfer for a retried submission.
    path = tmp_path / "site.toml"
    path.write_text(GOOD + f"[api]\nhistory_days = {value}\n")
    message = "must be 0 (keep finished transfers for ever) or at least 1/24 (an hour)"
    with pytest.raises(InvalidInput, match=re.escape(f"{path}: [api] history_days {message}")):
        load_config(path, env={})
    path.write_text(GOOD)
    with pytest.raises(
        InvalidInput, match=re.escape(f"environment: DATAMOVER_API_HISTORY_DAYS {message}")
    ):
        load_config(path, env={"DATAMOVER_API_HISTORY_DAYS": value})


@pytest.mark.parametrize(
    ("value", "minutes"), [(None, 0.0), ("0", 0.0), ("1", 1.0), ("10080", 10080.0)]
)
def test_reindex_minutes_is_0_for_never_or_a_minute_to_a_week(
    tmp_path: Path, value: str | None, minutes: float
) -> None:
    path = tmp_path / "site.toml"
    path.write_text(GOOD + (f"[api]\nreindex_minutes = {value}\n" if value else ""))
    assert load_config(path, env={}).api.reindex_minutes == minutes
    if value is not None:
        path.write_text(GOOD)
        env = {"DATAMOVER_API_REINDEX_MINUTES": value}
        assert load_config(path, env=env).api.reindex_minutes == minutes


@pytest.mark.parametrize("value", ["-1", "0.5", "nan"])
def test_reindex_minutes_below_a_minute_but_0_is_refused(tmp_path: Path, value: str) -> None:
    # A reindex every few seconds lists the whole packs/ prefix over and over.
    path = tmp_path / "site.toml"
    path.write_text(GOOD + f"[api]\nreindex_minutes = {value}\n")
    with pytest.raises(InvalidInput, match=re.escape(f"{path}: [api] reindex_minutes")) as info:
        load_config(path, env={})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["DATAMOVER_NAMESPACE_PROJ", "DATAMOVER_NAMESPACE_"])
def test_a_namespace_variable_is_refused_by_the_cli(tmp_path: Path, name: str) -> None:
    # Before: ignored without a word; the file's /proj was used.
    path = _site(tmp_path)
    _refused(
        _cli(path, {name: "/x"}, "db", "upgrade"),
        f"environment: {name} is not a setting: namespaces are set in the config file's "
        "[namespace] table (or all at once by DATAMOVER_NAMESPACE=/logical=/local/dir,...)",
    )
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("name", "section"),
    [("DATAMOVER_TRANSFER_UPLOAD_CONCURENCY", "transfer"), ("DATAMOVER_STORE_ENDPIONT", "store")],
)
def test_a_misspelt_override_is_refused_by_the_cli(tmp_path: Path, name: str, section: str) -> None:
    path = _site(tmp_path)
    proc = _cli(path, {name: "3"}, "db", "upgrade")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(
        f"datamover: error: environment: {name} is not a setting (the [{section}] keys are "
    )
    assert not (tmp_path / "state").exists()


def test_datamover_variables_that_are_no_setting_are_left_alone(tmp_path: Path) -> None:
    # Only DATAMOVER_<SECTION>_ names are settings; these others are read elsewhere (or by
    # the tests) and must not be refused.
    path = _site(tmp_path)
    env = {
        "DATAMOVER_CONFIG": str(path),
        "DATAMOVER_TOKEN": "dm_x",
        "DATAMOVER_DEBUG": "1",
        "DATAMOVER_TEST_POSTGRES_URL": "postgresql://x/y",
        "DATAMOVER_NAMESPACE": f"/proj={tmp_path / 'other'}",
        "DATAMOVER_NAMESPACES": "/x",
        "DATAMOVER_API_URL": "http://127.0.0.1:9",
    }
    proc = _cli(path, env, "db", "upgrade")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "state" / "catalog.db").exists()


def test_an_unsupported_catalog_url_is_named_without_its_password(tmp_path: Path) -> None:
    # Before: "catalog URL 'mysql://dm:s3cret@db.example.org/dm': only sqlite and ...".
    path = _site(tmp_path)
    env = {"DATAMOVER_SITE_CATALOG": "mysql://dm:s3cret@db.example.org/dm"}
    _refused(
        _cli(path, env, "db", "upgrade"),
        "catalog URL 'mysql://dm:***@db.example.org/dm': only sqlite and postgresql are supported",
    )


@pytest.mark.parametrize(
    ("url", "said"),
    [
        # Before: "the driver 'aiosqlite' cannot be used (Invalid SQLite URL ...); give
        # sqlite://... and datamover picks its own", to a user who had given sqlite://.
        (
            "sqlite://relative.db",
            "catalog URL 'sqlite://relative.db': an SQLite catalog is sqlite:/// followed by "
            "the file's path",
        ),
        # Before: "only sqlite and postgresql are supported", to a user of PostgreSQL.
        (
            "postgres://dm:s3cret@db.example.org/dm",
            "catalog URL 'postgres://dm:***@db.example.org/dm': write postgresql://, not "
            "postgres://",
        ),
    ],
)
def test_a_misspelt_catalog_url_is_told_how_to_write_it(
    tmp_path: Path, url: str, said: str
) -> None:
    path = _site(tmp_path)
    proc = _cli(path, {"DATAMOVER_SITE_CATALOG": url}, "db", "upgrade")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert said in proc.stderr
    assert not (tmp_path / "relative.db").exists()


#: Catalog URLs SQLAlchemy cannot parse, and how each is shown: from `[scheme://]user:` to
#: the last `@` hidden. Before: the first four were echoed whole, password and all; the
#: others were "internal error (ValueError: invalid literal for int() ...)", exit 70.
_UNPARSABLE_CATALOGS = [
    ("postgres ql://dm:s3cret@db.example.org/dm", "postgres ql://dm:***@db.example.org/dm"),
    ("dm:s3cret@db.example.org/dm", "dm:***@db.example.org/dm"),
    ("://dm:s3cret@db.example.org/dm", "://dm:***@db.example.org/dm"),
    ("postgresql:/dm:s3cret@db.example.org/dm", "postgresql:***@db.example.org/dm"),
    (
        "postgresql://dm:s3cret@db.example.org:notaport/dm",
        "postgresql://dm:***@db.example.org:notaport/dm",
    ),
    ("postgresql://dm:s3cret@[::1/dm", "postgresql://dm:***@[::1/dm"),
    ("postgresql://dm:s3@cret@db.example.org:x/dm", "postgresql://dm:***@db.example.org:x/dm"),
]


@pytest.mark.parametrize(("url", "shown"), _UNPARSABLE_CATALOGS)
def test_an_unparsable_catalog_url_is_named_without_its_password(
    tmp_path: Path, url: str, shown: str
) -> None:
    message = f"catalog URL {shown!r} is not a valid database URL"
    for command in (["db", "upgrade"], ["ls", "--json"]):
        proc = _cli(_site(tmp_path), {"DATAMOVER_SITE_CATALOG": url}, *command)
        assert proc.returncode == 2, (command, proc.stderr)
        assert proc.stderr == f"datamover: error: {message}\n", (command, proc.stderr)
        assert "s3" not in proc.stdout + proc.stderr and "cret" not in proc.stdout + proc.stderr
    path = _site(tmp_path)  # the same from the file
    path.write_text(path.read_text().replace("[site]\n", f"[site]\ncatalog = {url!r}\n"))
    _refused(_cli(path, {}, "db", "upgrade"), message)


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("bogus=1", "connect() got an unexpected keyword argument 'bogus'"),
        ("sslmode=require", "connect() got an unexpected keyword argument 'sslmode'"),
        ("command_timeout=abc", "invalid command_timeout value"),
        ("prepared_statement_cache_size=x", "invalid literal for int()"),
    ],
)
def test_a_postgresql_catalog_option_the_driver_refuses_is_named(
    tmp_path: Path, query: str, reason: str
) -> None:
    # Before: "internal error (TypeError: connect() got an unexpected keyword argument
    # ...)", exit 70, for every command; the option reaches asyncpg's connect().
    server = os.environ.get("DATAMOVER_TEST_POSTGRES_URL")
    if not server:
        pytest.skip("needs DATAMOVER_TEST_POSTGRES_URL: the option fails as asyncpg connects")
    url = make_url(server).set(password="s3cret").render_as_string(hide_password=False)
    url = f"{url}?{query}"
    for command in (["db", "upgrade"], ["ls", "--json"]):
        proc = _cli(_site(tmp_path), {"DATAMOVER_SITE_CATALOG": url}, *command)
        assert proc.returncode == 2, (command, proc.stderr)
        assert proc.stderr.startswith("datamover: error: catalog URL "), proc.stderr
        assert reason in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert "s3cret" not in proc.stderr + proc.stdout


def test_a_sqlite_catalog_option_the_driver_ignores_or_refuses_is_named(tmp_path: Path) -> None:
    # Before: `?bogus=1` printed SQLAlchemy's warning on every command and was ignored;
    # `?timeout=abc` was "internal error (ValueError ...)", exit 70.
    db = tmp_path / "state" / "c.db"
    for query, reason in (
        ("bogus=1", "'bogus' are not accepted by the pysqlite driver"),
        ("timeout=abc", "could not convert string to float: 'abc'"),
    ):
        env = {"DATAMOVER_SITE_CATALOG": f"sqlite:///{db}?{query}"}
        proc = _cli(_site(tmp_path), env, "db", "upgrade")
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"datamover: error: catalog URL 'sqlite:///{db}?{query}'")
        assert reason in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not db.exists()


def test_a_password_holding_an_at_sign_is_hidden_whole(tmp_path: Path) -> None:
    # Before: "catalog URL 'postgresql://dm:***@cret@db.example.org:99999/dm': ...", the
    # password's part after its `@` shown as the host; SQLAlchemy parses this URL.
    url = "postgresql://dm:s3@cret@db.example.org:99999/dm"
    _refused(
        _cli(_site(tmp_path), {"DATAMOVER_SITE_CATALOG": url}, "db", "upgrade"),
        "catalog URL 'postgresql://dm:***@db.example.org:99999/dm': the port must be 1-65535",
    )


@pytest.mark.parametrize(
    ("url", "shown", "driver"),
    [
        (
            "postgresql+psycopg2://dm:s3cret@127.0.0.1:1/dm",
            "postgresql+psycopg2://dm:***@127.0.0.1:1/dm",
            "psycopg2",
        ),
        ("sqlite+pysqlite:///{dir}/c.db", "sqlite+pysqlite:///{dir}/c.db", "pysqlite"),
    ],
    ids=["not installed", "not asyncio"],
)
def test_a_catalog_driver_that_cannot_be_used_is_bad_input(
    tmp_path: Path, url: str, shown: str, driver: str
) -> None:
    # Before: "internal error (ModuleNotFoundError: No module named 'psycopg2')", exit 70;
    # a sync driver created the SQLite catalog's directory, then was "catalog cannot be
    # upgraded: The asyncio extension requires an async driver" (exit 8, as for a catalog
    # that cannot be used) here and an internal error (exit 70) in other commands.
    path = _site(tmp_path)
    where = tmp_path / "catalog"
    proc = _cli(path, {"DATAMOVER_SITE_CATALOG": url.format(dir=where)}, "db", "upgrade")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(
        f"datamover: error: catalog URL '{shown.format(dir=where)}': the driver {driver!r} "
        "cannot be used ("
    )
    assert "s3cret" not in proc.stderr
    assert not where.exists()


def _datamover(*args: str, env_config: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
    if env_config is not None:
        env["DATAMOVER_CONFIG"] = env_config
    return subprocess.run(
        [sys.executable, "-m", "datamover", *args], capture_output=True, text=True, env=env
    )


def test_config_before_the_command_stands_in_for_the_environment(tmp_path: Path) -> None:
    before, after, env = (str(tmp_path / n) for n in ("before.toml", "after.toml", "env.toml"))
    cases = [
        ((("--config", before, "ls"), None), before),  # as rclone takes it
        ((("--config", before, "ls"), env), before),  # over DATAMOVER_CONFIG
        ((("--config", before, "ls", "--config", after), env), after),  # the command's wins
        ((("ls",), env), env),
    ]
    for (args, env_config), named in cases:
        proc = _datamover(*args, env_config=env_config)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.strip() == f"datamover: error: config file '{named}' does not exist"


async def test_config_before_the_command_opens_that_site(make_site) -> None:
    env = await make_site("a")
    proc = _datamover("--config", str(env.config_path), "ls", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["datasets"] == []


@pytest.mark.parametrize(
    ("value", "debug"), [("1", True), ("yes", True), ("0", False), ("off", False)]
)
def test_datamover_debug_is_read_as_a_boolean(tmp_path: Path, value: str, debug: bool) -> None:
    # Before: any value turned debugging on, "0" included.
    path = _site(tmp_path)
    proc = _cli(path, {"DATAMOVER_DEBUG": value}, "db", "upgrade")
    assert proc.returncode == 0, proc.stderr
    assert ("DEBUG" in proc.stderr) is debug


def test_trash_days_below_0_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(GOOD + "[api]\ntrash_days = -1\n")
    with pytest.raises(InvalidInput, match=r"trash_days must be 0 \(never empty the trash\)"):
        load_config(path, env={})
    path.write_text(GOOD + "[api]\ntrash_days = 7\n")
    assert load_config(path, env={}).api.trash_days == 7


@pytest.mark.parametrize(
    ("drop", "env", "said"),
    [
        ('secret_key = "s"\n', {}, "[store] access_key gives an S3 access key but no secret"),
        ('access_key = "k"\n', {}, "secret_key gives an S3 secret key but no access key is set"),
        (
            'access_key = "k"\nsecret_key = "s"\n',
            {"AWS_ACCESS_KEY_ID": "k"},
            "environment: AWS_ACCESS_KEY_ID gives an S3 access key but no secret key is set "
            "([store] secret_key in ",
        ),
        (
            'access_key = "k"\nsecret_key = "s"\n',
            {"DATAMOVER_STORE_SECRET_KEY": "s"},
            "DATAMOVER_STORE_SECRET_KEY",
        ),
    ],
)
def test_half_a_key_pair_is_named(
    tmp_path: Path, drop: str, env: dict[str, str], said: str
) -> None:
    # Before: botocore's "Partial credentials found in explicit, missing:
    # aws_secret_access_key", at the first request.
    path = tmp_path / "site.toml"
    path.write_text(GOOD.replace(drop, ""))
    with pytest.raises(InvalidInput, match=re.escape(said)):
        load_config(path, env=env)
    path.write_text(GOOD.replace(drop, ""))
    both = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    assert load_config(path, env=both).store.secret_key  # the environment completes it


def test_config_between_a_group_and_its_command_says_where_it_goes(tmp_path: Path) -> None:
    # Before: "No such option '--config'." and nothing more.
    proc = subprocess.run(
        [sys.executable, "-m", "datamover", "db", "--config", str(tmp_path / "x"), "upgrade"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "Give it before the command or at its end: datamover --config FILE db" in proc.stderr
