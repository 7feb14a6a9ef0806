"""deploy/slurm/prolog.sh and epilog.sh, run by bash as Slurm would, with stand-ins for the
datamover CLI (which records its arguments and exits as told), scontrol and logger."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
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
if [[ -e $d/out ]]; then cat "$d/out"; else echo '{}'; fi
exit "${rc:-0}"
"""
_SCONTROL = """#!/bin/bash
d=$(dirname "$0")
printf '%s\\t' "$@" >>"$d/scontrol.log"
printf '\\n' >>"$d/scontrol.log"
if [[ $1 == show && $2 == hostnames ]]; then  # the job's nodes, one a line
    cat "$d/hostnames" 2>/dev/null
fi
if [[ $1 == update ]]; then  # keep the job's AdminComment, as slurmctld would
    for arg in "${@:2}"; do
        [[ $arg != AdminComment=* ]] || printf '%s' "${arg#AdminComment=}" >"$d/admin_comment"
    done
fi
"""
# squeue answers the job's AdminComment as `-O admin_comment:0` prints it: the text whole,
# "(null)" when there is none, and its comment (`--format=%k`) from the file `comment`; it
# fails when the file `squeue.fails` exists. Each call is logged in `squeue.log`.
_SQUEUE = """#!/bin/bash
d=$(dirname "$0")
printf '%s\\n' "$*" >>"$d/squeue.log"
[[ ! -e $d/squeue.fails ]] || { echo 'squeue: error: Socket timed out' >&2; exit 1; }
[[ " $* " != *" --format=%k "* ]] || { cat "$d/comment"; echo; exit; }
[[ " $* " == *" --Format=admin_comment:0 "* ]] || { echo "unexpected: $*" >&2; exit 1; }
if [[ -e $d/admin_comment ]]; then cat "$d/admin_comment"; echo; else echo '(null)'; fi
"""


@dataclass
class Hooks:
    """A directory with the stand-ins and a settings file pointing at them."""

    dir: Path

    def run(
        self,
        script: Path,
        comment: str,
        rcs: list[int] = (),
        *,
        conf_lines: str = "",
        env: dict[str, str] | None = None,
        user: int | None = None,
        **settings: str,
    ) -> subprocess.CompletedProcess[str]:
        """Run SCRIPT for job 42 with COMMENT, as USER if given; the settings file holds
        SETTINGS, quoted, then CONF_LINES as they are; ENV is added to the environment."""
        (self.dir / "rcs").write_text("".join(f"{rc}\n" for rc in rcs))
        (self.dir / "calls").unlink(missing_ok=True)
        conf = {
            "PATH": f"{self.dir}:/usr/sbin:/usr/bin:/sbin:/bin",
            "DM_HOOK_BIN": str(self.dir / "datamover"),
            # Run as root here (a container): the CLI then runs as this user.
            "DM_HOOK_RUN_AS": "nobody",
            "DM_HOOK_MARK_DIR": str(self.dir / "marks"),
            **settings,
        }
        (self.dir / "hooks.conf").write_text(
            "".join(f"{k}='{v}'\n" for k, v in conf.items()) + conf_lines
        )
        env = {
            "DM_HOOK_CONF": str(self.dir / "hooks.conf"),
            "SLURM_JOB_ID": "42",
            "SLURM_JOB_COMMENT": comment,
            **(env or {}),
        }
        return subprocess.run(
            ["bash", str(script)],
            env=env,
            capture_output=True,
            text=True,
            errors="surrogateescape",  # the hooks log what they are given, UTF-8 or not
            timeout=60,
            user=user,
        )

    def calls(self) -> list[list[str]]:
        """Each CLI call: the uid it ran as, then its arguments."""
        path = self.dir / "calls"
        if not path.exists():
            return []
        return [line.split("\t")[:-1] for line in path.read_text().splitlines()]

    def admin_comment(self) -> str | None:
        """The job's AdminComment as the prolog left it (None: never set)."""
        path = self.dir / "admin_comment"
        return path.read_text(encoding="utf-8") if path.exists() else None

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
            ("squeue", _SQUEUE),
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


@pytest.mark.parametrize(
    ("comment", "says"),
    [
        ("datamover:/proj/ds*", "holds a quote or '*'"),
        ('datamover:/proj/"ds1"', "holds a quote or '*'"),
        ("datamover:/proj/d's1", "holds a quote or '*'"),
        ("datamover:/proj/ds1@bogus", "'@' must be followed by a version id"),
        ("datamover:/proj/ds1@v2", "'@' must be followed by a version id"),
        ("datamover:/proj/ds1@v2/", "'@' must be followed by a version id"),
        ("datamover:/", "'/' in the job comment is not a dataset path"),  # was "''"
    ],
)
def test_a_word_a_shell_would_read_otherwise_or_a_bad_version_fails(
    hooks: Hooks, comment: str, says: str
) -> None:
    # Before: passed to datamover as paths ("/proj/ds*", "/proj/ds1@bogus"), which failed
    # the job with a misleading "no published version"; the README said they are refused.
    r = hooks.run(PROLOG, comment)
    assert r.returncode == 1, r.stderr
    assert says in r.stderr, r.stderr
    assert hooks.staged() == []


def test_an_at_sign_above_the_last_component_is_part_of_the_path(hooks: Hooks) -> None:
    r = hooks.run(PROLOG, f"datamover:/proj/user@host/run1,/proj/u@h/r2@{V1}/,/proj/c@{V1}/")
    assert r.returncode == 0, r.stderr
    assert hooks.staged() == [["/proj/user@host/run1"], ["/proj/u@h/r2", V1], ["/proj/c", V1]]


def test_the_comment_word_is_read_in_any_case(hooks: Hooks) -> None:
    # Before: "DATAMOVER:/proj/a" was taken for a note, and the job started without its data.
    r = hooks.run(PROLOG, "DATAMOVER:/proj/a Datamover:/proj/b")
    assert r.returncode == 0, r.stderr
    assert hooks.staged() == [["/proj/a"], ["/proj/b"]]


def test_the_epilog_releases_for_the_comment_word_in_any_case_without_a_mark(
    hooks: Hooks,
) -> None:
    # Before: the prolog staged for "DATAMOVER:" but the epilog, finding no mark (the prolog
    # could not write one), took the comment for one asking for nothing: the pin stayed.
    r = hooks.run(EPILOG, "DATAMOVER:/proj/a")
    assert r.returncode == 0, r.stderr
    assert [c[1:2] for c in hooks.calls()] == [["release"]], hooks.calls()


@pytest.mark.parametrize("script", [PROLOG, EPILOG])
def test_a_job_id_that_is_not_digits_is_refused(hooks: Hooks, script: Path) -> None:
    # It names the pin and the mark file: "../../etc/x" had the mark written outside its
    # directory, as root.
    r = hooks.run(script, "datamover:/proj/a", env={"SLURM_JOB_ID": "../../etc/x"})
    assert r.returncode == (1 if script == PROLOG else 0), r.stderr
    assert "is not a job id" in r.stderr, r.stderr
    assert hooks.calls() == []


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
    r = hooks.run(EPILOG, "datamover:/proj/a", rcs=[9])
    assert r.returncode == 0 and "release it by hand" in r.stderr
    assert hooks.calls()[0][1:] == [
        "release",
        "--daemon",
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


def test_a_failure_keeps_the_jobs_admin_comment(hooks: Hooks) -> None:
    # The prolog wrote its reason over the job's AdminComment, losing what the site had
    # put there (an accounting tag, an operator's note). It is kept, and a later failure
    # of the requeued job replaces only the datamover part.
    r = hooks.run(PROLOG, "datamover:/proj/a", rcs=[3])
    assert r.returncode == 1, r.stderr
    assert hooks.admin_comment() == "datamover prolog: stage /proj/a failed (exit 3): {}"
    site = "project=abc; note: held by ops"
    (hooks.dir / "admin_comment").write_text(site)
    for rc in (3, 2):
        r = hooks.run(PROLOG, "datamover:/proj/a", rcs=[rc])
        assert r.returncode == 1, r.stderr
        assert hooks.admin_comment() == (
            f"{site}; datamover prolog: stage /proj/a failed (exit {rc}): {{}}"
        )


def test_the_admin_comment_stays_within_slurms_limit(hooks: Hooks) -> None:
    # The reason is cut to fit 1024 bytes after the site's text, never within a character.
    for site, name in (("x" * 900, "p" * 300), ("x" * 901, "\u00e9" * 150)):
        (hooks.dir / "admin_comment").write_text(site)
        r = hooks.run(PROLOG, f"datamover:/proj/{name}", rcs=[3])
        assert r.returncode == 1, r.stderr
        comment = hooks.admin_comment()  # read as UTF-8: a cut character would not decode
        assert comment is not None and 1022 <= len(comment.encode()) <= 1024, comment
        assert comment.startswith(f"{site}; datamover prolog: stage /proj/{name[:40]}")
    # No room left for a reason worth reading, or the comment cannot be read: the
    # AdminComment is left as it is (the reason is in syslog and the prolog's log).
    for fill, squeue_fails in (("y" * 1010, False), ("z", True)):
        (hooks.dir / "admin_comment").write_text(fill)
        if squeue_fails:
            (hooks.dir / "squeue.fails").touch()
        r = hooks.run(PROLOG, "datamover:/proj/a", rcs=[3])
        assert r.returncode == 1 and "AdminComment" in r.stderr, r.stderr
        assert "stage /proj/a failed (exit 3)" in r.stderr
        assert hooks.admin_comment() == fill


def test_the_hooks_go_through_the_daemon_only_unless_told(hooks: Hooks) -> None:
    # With the daemon down, the CLI staged in-process on a host whose config names only the
    # daemon: exit 7 (no store credentials), and the failing prolog drained the node.
    r = hooks.run(PROLOG, "datamover:/proj/a")
    assert r.returncode == 0, r.stderr
    (stage_call,) = hooks.calls()
    assert stage_call[1] == "stage" and "--daemon" in stage_call
    r = hooks.run(PROLOG, "datamover:/proj/a", DM_HOOK_FALLBACK="1")
    assert r.returncode == 0, r.stderr
    assert "--daemon" not in hooks.calls()[0]
    r = hooks.run(EPILOG, "datamover:/proj/a", DM_HOOK_FALLBACK="1")
    assert hooks.calls()[0][1:3] == ["release", "--config"]


def test_the_epilog_releases_a_job_the_prolog_marked_whatever_its_comment(
    hooks: Hooks,
) -> None:
    # A user who rewrote the comment during the run (`scontrol update job=42 comment=...`)
    # left the pin behind: the epilog read the new comment and released nothing.
    assert hooks.run(PROLOG, "datamover:/proj/a").returncode == 0
    assert (hooks.dir / "marks" / "42").exists()
    r = hooks.run(EPILOG, "run 42 finished, see notes", rcs=[9])
    assert r.returncode == 0 and [c[1] for c in hooks.calls()] == ["release"]
    assert (hooks.dir / "marks" / "42").exists()  # a failed release keeps the mark
    r = hooks.run(EPILOG, "run 42 finished, see notes")
    assert r.returncode == 0 and [c[1] for c in hooks.calls()] == ["release"]
    assert not (hooks.dir / "marks" / "42").exists()
    r = hooks.run(EPILOG, "run 42 finished, see notes")
    assert r.returncode == 0 and hooks.calls() == []  # released: nothing more to do


def test_the_epilog_asks_again_while_the_daemon_does_not_answer(hooks: Hooks) -> None:
    # A pin left behind holds its dataset at its version for every later job: a daemon
    # restarting at the epilog (exit 6) was the end of it.
    r = hooks.run(EPILOG, "datamover:/proj/a", rcs=[6, 0])
    assert r.returncode == 0 and "released pin slurm-42" in r.stderr, r.stderr
    assert [c[1] for c in hooks.calls()] == ["release", "release"]
    r = hooks.run(EPILOG, "datamover:/proj/a", rcs=[6, 6, 6, 6], DM_HOOK_RELEASE_TIMEOUT="7")
    assert r.returncode == 0 and "release it by hand" in r.stderr
    assert len(hooks.calls()) == 2  # within its time limit


def test_the_prolog_waits_for_pins_and_says_so_when_time_runs_out(hooks: Hooks) -> None:
    r = hooks.run(PROLOG, "datamover:/proj/a", rcs=[11, 0], DM_HOOK_STAGE_TIMEOUT="40")
    assert r.returncode == 0, r.stderr
    assert [c[1] for c in hooks.calls()] == ["stage", "stage"]
    r = hooks.run(PROLOG, "datamover:/proj/a", rcs=[11], DM_HOOK_STAGE_TIMEOUT="10")
    assert r.returncode == 1 and "other jobs still hold another version" in r.stderr


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("DM_HOOK_NODES = all", "exit 127: line 5: DM_HOOK_NODES: command not found"),
        ("DM_HOOK_STAGE_TIMEOUT=$((2*3600)", "exit 2: line 5: unexpected EOF"),
        ("DM_HOOK_CONFIG=$SITE_TOML", "exit 1: line 5: SITE_TOML: unbound variable"),
        ("exit 3", "exit 3)"),
    ],
)
def test_a_broken_settings_file_fails_only_the_jobs_asking_for_data(
    hooks: Hooks, line: str, error: str
) -> None:
    # Sourced under `set -euo pipefail`, a typo in the settings file ended the prolog
    # non-zero, unlogged, for every job: under `Prolog=` every job drained its node.
    r = hooks.run(PROLOG, "no data here", conf_lines=line + "\n")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert hooks.admin_comment() is None
    r = hooks.run(PROLOG, "datamover:/proj/a", conf_lines=line + "\n")
    assert r.returncode == 1, r.stderr
    reason = f"the settings file {hooks.dir / 'hooks.conf'} is broken ({error}"
    # Reported as any failure is (the AdminComment is tried too, but its squeue and
    # scontrol stand-ins are on the PATH the settings file sets).
    assert reason in r.stderr and "the job is not started" in r.stderr
    assert hooks.calls() == []
    # The epilog says so and still releases, with the defaults (DM_HOOK_BIN and
    # DM_HOOK_RUN_AS given here in the environment, as the settings file is not used).
    stand_in = {"DM_HOOK_BIN": str(hooks.dir / "datamover"), "DM_HOOK_RUN_AS": "nobody"}
    r = hooks.run(EPILOG, "no data here", conf_lines=line + "\n", env=stand_in)
    assert r.returncode == 0 and reason in r.stderr, r.stderr
    assert [c[1] for c in hooks.calls()] == ["release"]


def test_a_bad_comment_source_fails_only_the_jobs_asking_for_data(hooks: Hooks) -> None:
    r = hooks.run(PROLOG, "no data here", DM_HOOK_COMMENT_SOURCE="sqeue")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = hooks.run(PROLOG, "datamover:/proj/a", DM_HOOK_COMMENT_SOURCE="sqeue")
    assert r.returncode == 1 and "DM_HOOK_COMMENT_SOURCE must be" in r.stderr, r.stderr
    assert hooks.calls() == []


NODES = {"SLURM_JOB_NODELIST": "n[1-2]"}


@pytest.mark.parametrize(
    ("comment", "settings"),
    [
        ("datamover:proj/a", {}),
        (f"datamover:/proj/a@{V1},/proj/a@{V2}", {}),
        ("datamover:/proj/a,/proj/b", {"DM_HOOK_MAX_PATHS": "1"}),
        ("datamover:/proj/a", {"DM_HOOK_STAGE_TIMEOUT": "1h"}),
        ("datamover:/proj/a", {"DM_HOOK_NODES": "First"}),
    ],
)
def test_a_mistake_fails_the_job_on_its_first_node_only(
    hooks: Hooks, comment: str, settings: dict[str, str]
) -> None:
    # The comment and the settings were checked before the other nodes of the job left
    # the staging to the first: under `Prolog=` a mistake drained every node of the job,
    # each writing the AdminComment.
    (hooks.dir / "hostnames").write_text("n1\nn2\n")
    r = hooks.run(PROLOG, comment, env={**NODES, "SLURMD_NODENAME": "n2"}, **settings)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert hooks.admin_comment() is None
    r = hooks.run(PROLOG, comment, env={**NODES, "SLURMD_NODENAME": "n1"}, **settings)
    assert r.returncode == 1 and "the job is not started" in r.stderr, r.stderr
    assert "datamover prolog: " in (hooks.admin_comment() or "")
    assert hooks.calls() == []


def test_only_the_staging_node_asks_slurmctld_for_the_comment(hooks: Hooks) -> None:
    (hooks.dir / "hostnames").write_text("n1\nn2\n")
    (hooks.dir / "comment").write_text("datamover:/proj/a")
    r = hooks.run(
        PROLOG, "", env={**NODES, "SLURMD_NODENAME": "n2"}, DM_HOOK_COMMENT_SOURCE="squeue"
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert not (hooks.dir / "squeue.log").exists() and hooks.calls() == []
    r = hooks.run(
        PROLOG, "", env={**NODES, "SLURMD_NODENAME": "n1"}, DM_HOOK_COMMENT_SOURCE="squeue"
    )
    assert r.returncode == 0, r.stderr
    assert (hooks.dir / "squeue.log").read_text().count("--format=%k") == 1
    assert hooks.staged() == [["/proj/a"]]


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only (runs the hooks as nobody)")
def test_a_hook_that_cannot_write_the_mark_directory_marks_in_one_of_its_own(
    hooks: Hooks,
) -> None:
    # Run as SlurmUser (the controller set-up), the prolog could not create its default
    # mark directory /run/datamover-slurm (/run is root's) and said nothing; the epilog
    # of a job whose comment had been edited meanwhile then released nothing, and the pin
    # held its dataset at its version for every later job.
    nobody = pwd.getpwnam("nobody").pw_uid
    as_nobody = {"user": nobody, "env": {"TMPDIR": str(hooks.dir)}, "DM_HOOK_MARK_DIR": ""}
    own = hooks.dir / f"datamover-slurm-{nobody}"
    r = hooks.run(PROLOG, "datamover:/proj/a", **as_nobody)
    assert r.returncode == 0, r.stderr
    assert (own / "42").exists() and f"marked in {own}" in r.stderr
    assert own.stat().st_uid == nobody and stat.S_IMODE(own.stat().st_mode) == 0o700
    r = hooks.run(EPILOG, "run 42 finished, see notes", **as_nobody)
    assert r.returncode == 0 and [c[1] for c in hooks.calls()] == ["release"], r.stderr
    assert not (own / "42").exists()
    # Not a directory of its own (planted by another user): not used, and said so.
    theirs = hooks.dir / "theirs"
    theirs.mkdir()
    os.chown(theirs, nobody, -1)
    own.rmdir()
    own.symlink_to(theirs)
    for mode in ("symlink", "root's", "0777"):
        if mode == "root's":
            own.unlink()
            own.mkdir(mode=0o700)
        elif mode == "0777":
            os.chown(own, nobody, -1)
            own.chmod(0o777)
        r = hooks.run(PROLOG, "datamover:/proj/a", **as_nobody)
        assert r.returncode == 0 and hooks.staged() == [["/proj/a"]], r.stderr
        assert "no mark written" in r.stderr, (mode, r.stderr)
        assert not (own / "42").exists() and not (theirs / "42").exists()


def test_the_admin_comment_is_utf8_however_the_reason_is_cut(hooks: Hooks) -> None:
    # The reason was cut to 400 bytes in the C locale the prolog runs in, leaving part of
    # a character at its end when that was within the room left (no second cut then).
    tag = "datamover prolog: "
    r = hooks.run(PROLOG, "datamover:/proj/a" + "\u00e9" * 300, rcs=[3])
    assert r.returncode == 1, r.stderr
    comment = hooks.admin_comment()  # read as UTF-8: a cut character would not decode
    assert comment is not None and 397 <= len(comment.encode()) - len(tag) <= 400
    assert comment.startswith(f"{tag}stage /proj/a\u00e9\u00e9")
    # The CLI's answer was cut to 300 bytes the same way, within the reason.
    (hooks.dir / "admin_comment").unlink()
    (hooks.dir / "out").write_text("datamover: error: no dataset at /proj/a" + "\u00e9" * 200)
    r = hooks.run(PROLOG, "datamover:/proj/a", rcs=[3])
    assert r.returncode == 1, r.stderr
    r.stderr.encode()  # the log too: no byte that is not UTF-8 (surrogate-escaped here)
    comment = hooks.admin_comment()
    assert comment is not None and comment.startswith(f"{tag}stage /proj/a failed (exit 3): ")
    assert 297 <= len(comment.encode()) - len(f"{tag}stage /proj/a failed (exit 3): ") <= 300
    # Bytes that are not UTF-8 in the job comment (Slurm passes them on) are dropped.
    (hooks.dir / "out").unlink()
    (hooks.dir / "admin_comment").unlink()
    r = hooks.run(PROLOG, "datamover:/proj/a\udcffb\udcc3", rcs=[3])
    assert r.returncode == 1, r.stderr
    assert hooks.admin_comment() == f"{tag}stage /proj/ab failed (exit 3): {{}}"
