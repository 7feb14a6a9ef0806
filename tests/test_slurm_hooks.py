"""deploy/slurm/prolog.sh and epilog.sh, run by bash as Slurm would, with stand-ins for the
datamover CLI (which records its arguments and exits as told), scontrol and logger."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PROLOG = ROOT / "deploy" / "slurm" / "prolog.sh"
EPILOG = ROOT / "deploy" / "slurm" / "epilog.sh"
V1 = "20261129T181500.123456Z-hpc-a-3f9a1c0b"
V2 = "20261130T090000.000000Z-hpc-a-3f9a1c0b"

_CLI = """#!/bin/bash
d=$(dirname "$0")
printf '%s\\t' "$(id -u)" "$@" >>"$d/calls"
printf '\\n' >>"$d/calls"
rc=$(sed -n "$(wc -l <"$d/calls")p" "$d/rcs" 2>/dev/null)
echo '{}'
exit "${rc:-0}"
"""
_SCONTROL = """#!/bin/bash
printf '%s\\t' "$@" >>"$(dirname "$0")/scontrol.log"
printf '\\n' >>"$(dirname "$0")/scontrol.log"
"""


@dataclass
class Hooks:
    """A directory with the stand-ins and a settings file pointing at them."""

    dir: Path

    def run(
        self, script: Path, comment: str, rcs: list[int] = (), **settings: str
    ) -> subprocess.CompletedProcess[str]:
        (self.dir / "rcs").write_text("".join(f"{rc}\n" for rc in rcs))
        (self.dir / "calls").unlink(missing_ok=True)
        conf = {
            "PATH": f"{self.dir}:/usr/sbin:/usr/bin:/sbin:/bin",
            "DM_HOOK_BIN": str(self.dir / "datamover"),
            # Run as root here (a container): the CLI then runs as this user.
            "DM_HOOK_RUN_AS": "nobody",
            **settings,
        }
        (self.dir / "hooks.conf").write_text("".join(f"{k}='{v}'\n" for k, v in conf.items()))
        env = {
            "DM_HOOK_CONF": str(self.dir / "hooks.conf"),
            "SLURM_JOB_ID": "42",
            "SLURM_JOB_COMMENT": comment,
        }
        return subprocess.run(
            ["bash", str(script)], env=env, capture_output=True, text=True, timeout=60
        )

    def calls(self) -> list[list[str]]:
        """Each CLI call: the uid it ran as, then its arguments."""
        path = self.dir / "calls"
        if not path.exists():
            return []
        return [line.split("\t")[:-1] for line in path.read_text().splitlines()]

    def staged(self) -> list[list[str]]:
        """The arguments after `--` of each `stage` call, with `--version V` if given."""
        out = []
        for call in self.calls():
            args = call[1:]
            if args[0] == "stage":
                version = args[args.index("--version") + 1 :][:1] if "--version" in args else []
                out.append(args[args.index("--") + 1 :] + version)
        return out


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    # Not under pytest's tmp_path (0700): as root the CLI stand-in runs as `nobody`.
    d = Path(tempfile.mkdtemp(prefix="dm-hooks-"))
    try:
        d.chmod(0o777)
        for name, text in [
            ("datamover", _CLI),
            ("scontrol", _SCONTROL),
            ("logger", "#!/bin/sh\nexit 0\n"),
        ]:
            (d / name).write_text(text)
            (d / name).chmod(0o755)
        yield Hooks(d)
    finally:
        shutil.rmtree(d)


def test_hook_scripts_parse() -> None:
    for script in (PROLOG, EPILOG):
        subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize(
    "comment",
    [
        "datamover:/proj/a, /proj/b",  # a space after the comma
        "datamover: /proj/a,/proj/b",  # a space after the colon
        "datamover:/proj/a ,/proj/b",
        "datamover:\t/proj/a,\n/proj/b notes",
    ],
)
def test_a_list_with_spaces_stages_every_path(hooks: Hooks, comment: str) -> None:
    # The list ended at the first space: "/proj/b" (or, after "datamover: ", every path)
    # was ignored and the job started without its data, the prolog exiting 0.
    r = hooks.run(PROLOG, comment)
    assert r.returncode == 0, r.stderr
    assert hooks.staged() == [["/proj/a"], ["/proj/b"]]


@pytest.mark.parametrize(
    "comment",
    [
        f"datamover:/proj/a datamover:/proj/a@{V1}",
        f"datamover:/proj/a@{V1},/proj/a@{V2}",
        f"datamover:/proj/a/@{V1},/proj/a",
    ],
)
def test_one_dataset_named_with_two_versions_fails(hooks: Hooks, comment: str) -> None:
    # The first one named was staged and the other dropped without a word: the job ran on
    # a version it had not asked for.
    r = hooks.run(PROLOG, comment)
    assert r.returncode == 1, r.stderr
    assert "/proj/a" in r.stderr and "two versions" in r.stderr
    assert hooks.staged() == []


def test_the_same_dataset_twice_is_staged_once(hooks: Hooks) -> None:
    r = hooks.run(PROLOG, f"datamover:/proj/a@{V1},/proj/b datamover:/proj/a/@{V1},/proj/b/")
    assert r.returncode == 0, r.stderr
    assert hooks.staged() == [["/proj/a", V1], ["/proj/b"]]


def test_comment_text_is_never_run(hooks: Hooks) -> None:
    marker = hooks.dir / "ran"
    r = hooks.run(PROLOG, f"datamover:/proj/$(touch${{IFS}}{marker}),/proj/`touch {marker}`")
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    assert hooks.staged() == [[f"/proj/$(touch${{IFS}}{marker})"], ["/proj/`touch"]]


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only")
@pytest.mark.parametrize("run_as", ["", "root"])
def test_as_root_the_cli_never_runs_as_root(hooks: Hooks, run_as: str) -> None:
    # An empty DM_HOOK_RUN_AS (or one naming uid 0) ran the CLI as root: an in-process
    # stage (daemon unreachable) then wrote the cache and the catalog as root.
    r = hooks.run(PROLOG, "datamover:/proj/a", DM_HOOK_RUN_AS=run_as)
    assert r.returncode == 1 and "DM_HOOK_RUN_AS" in r.stderr, r.stderr
    assert hooks.calls() == []
    r = hooks.run(EPILOG, "datamover:/proj/a", DM_HOOK_RUN_AS=run_as)
    assert r.returncode == 0 and "DM_HOOK_RUN_AS" in r.stderr, r.stderr
    assert hooks.calls() == []
    r = hooks.run(PROLOG, "datamover:/proj/a")
    assert r.returncode == 0 and hooks.calls()[0][0] != "0"


@pytest.mark.parametrize("limit", ["0", "abc", "-5"])
def test_the_epilog_releases_with_the_default_limit_when_its_setting_is_bad(
    hooks: Hooks, limit: str
) -> None:
    # `timeout 0` waits forever (a hung release kept the node completing), and a value
    # `timeout` refuses failed the release without running it: the pin stayed.
    r = hooks.run(EPILOG, "datamover:/proj/a", DM_HOOK_RELEASE_TIMEOUT=limit)
    assert r.returncode == 0, r.stderr
    assert "DM_HOOK_RELEASE_TIMEOUT" in r.stderr and "using 60" in r.stderr
    assert [c[1:2] for c in hooks.calls()] == [["release"]]


def test_the_epilog_releases_the_pin_and_never_fails(hooks: Hooks) -> None:
    r = hooks.run(EPILOG, "datamover:/proj/a", rcs=[6])
    assert r.returncode == 0 and "release it by hand" in r.stderr
    assert hooks.calls()[0][1:] == [
        "release",
        "--config",
        "/etc/datamover/site.toml",
        "--pin",
        "slurm-42",
        "--json",
    ]
    r = hooks.run(EPILOG, "no data")
    assert r.returncode == 0 and hooks.calls() == []


def test_carriage_returns_and_other_whitespace_separate_words(hooks: Hooks) -> None:
    # A comment filled from a file with CRLF line ends ("$(cat datasets.txt)") gave the
    # last path a trailing CR, a control character datamover refuses: the prolog failed.
    r = hooks.run(PROLOG, "datamover:/proj/a,\r\n/proj/b\r\n\vdatamover:/proj/c\f")
    assert r.returncode == 0, r.stderr
    assert hooks.staged() == [["/proj/a"], ["/proj/b"], ["/proj/c"]]
