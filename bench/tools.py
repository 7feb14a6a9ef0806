"""Command lines and environments for the contenders: datamover, s5cmd, rclone and tar.

Only argv lists and environments are built here; `measure.run_measured` runs them. Each tool
gets the environment it needs and nothing that confuses it (Debian's rclone 1.60 refuses to
start while `AWS_CA_BUNDLE` is set).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from s3admin import S3Target

RCLONE_REMOTE = "bench"
WORKERS = 64


def _base_env() -> dict[str, str]:
    """The caller's environment without settings that would redirect a tool elsewhere."""
    drop = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN")
    return {
        k: v
        for k, v in os.environ.items()
        if k not in drop and not k.startswith(("DATAMOVER_", "RCLONE_"))
    }


def find_binary(name: str, *extra: Path) -> str | None:
    """`name` next to this interpreter (the venv), on PATH, or at one of `extra`."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found:
        return found
    for path in extra:
        if path.exists():
            return str(path)
    return None


@dataclass(frozen=True)
class S5cmd:
    """s5cmd with 64 workers; credentials by environment."""

    binary: str
    target: S3Target

    def env(self) -> dict[str, str]:
        """Credentials and region for the AWS SDK inside s5cmd."""
        env = _base_env()
        env.update(
            AWS_ACCESS_KEY_ID=self.target.access_key,
            AWS_SECRET_ACCESS_KEY=self.target.secret_key,
            AWS_REGION=self.target.region,
        )
        return env

    def _cmd(self, *args: str) -> list[str]:
        return [
            self.binary,
            "--endpoint-url",
            self.target.endpoint,
            "--numworkers",
            str(WORKERS),
            *args,
        ]

    def upload(self, src: Path, bucket: str, prefix: str) -> list[str]:
        """Copy every file under `src` to `s3://bucket/prefix/`."""
        return self._cmd("cp", f"{src}/*", f"s3://{bucket}/{prefix}/")

    def download(self, bucket: str, prefix: str, dst: Path) -> list[str]:
        """Copy every object under the prefix into `dst`."""
        return self._cmd("cp", f"s3://{bucket}/{prefix}/*", f"{dst}/")

    def sync_up(self, src: Path, bucket: str, prefix: str) -> list[str]:
        """Upload only files whose size differs or whose mtime is newer than the object's."""
        return self._cmd("sync", f"{src}/", f"s3://{bucket}/{prefix}/")


@dataclass(frozen=True)
class Rclone:
    """rclone with a remote defined purely by environment variables."""

    binary: str
    target: S3Target
    config_file: Path

    def env(self) -> dict[str, str]:
        """A `bench:` remote for the store; no AWS_CA_BUNDLE (rclone 1.60 refuses to start)."""
        env = _base_env()
        env.pop("AWS_CA_BUNDLE", None)
        prefix = f"RCLONE_CONFIG_{RCLONE_REMOTE.upper()}_"
        env.update(
            {
                "RCLONE_CONFIG": str(self.config_file),
                prefix + "TYPE": "s3",
                prefix + "PROVIDER": "SeaweedFS",
                prefix + "ENDPOINT": self.target.endpoint,
                prefix + "ACCESS_KEY_ID": self.target.access_key,
                prefix + "SECRET_ACCESS_KEY": self.target.secret_key,
                prefix + "REGION": self.target.region,
                prefix + "FORCE_PATH_STYLE": "true",
            }
        )
        return env

    def _copy(self, src: str, dst: str) -> list[str]:
        return [
            self.binary,
            "copy",
            src,
            dst,
            "--transfers",
            str(WORKERS),
            "--checkers",
            str(WORKERS),
        ]

    def upload(self, src: Path, bucket: str, prefix: str) -> list[str]:
        """`rclone copy` the tree up (also the incremental form: it skips same size+mtime)."""
        return self._copy(str(src), f"{RCLONE_REMOTE}:{bucket}/{prefix}")

    def download(self, bucket: str, prefix: str, dst: Path) -> list[str]:
        """`rclone copy` the prefix down into `dst`."""
        return self._copy(f"{RCLONE_REMOTE}:{bucket}/{prefix}", str(dst))


@dataclass(frozen=True)
class Tar:
    """`tar -x` of a tarball on local disk: the floor for writing the tree."""

    binary: str

    def env(self) -> dict[str, str]:
        """The caller's environment."""
        return _base_env()

    def create(self, tarball: Path, parent: Path, name: str) -> list[str]:
        """Pack `parent/name` (untimed setup)."""
        return [self.binary, "-cf", str(tarball), "-C", str(parent), name]

    def extract(self, tarball: Path, dst: Path) -> list[str]:
        """Unpack into `dst`."""
        return [self.binary, "-xf", str(tarball), "-C", str(dst)]


@dataclass(frozen=True)
class SiteFiles:
    """One datamover site on disk: its config file and the directories it names."""

    name: str
    config: Path
    bucket: str
    state_dir: Path
    data_dir: Path


_WARM_IMPORTS = (
    "import datamover.cli, datamover.site, datamover.storage.s3, "
    "datamover.transfer.push, datamover.transfer.stage"
)


@dataclass(frozen=True)
class Datamover:
    """The `datamover` CLI; one process per command, one config file per site."""

    argv0: tuple[str, ...]
    target: S3Target

    @classmethod
    def locate(cls, target: S3Target) -> Datamover:
        """The venv's console script, else `python -m datamover`."""
        script = find_binary("datamover")
        argv0 = (script,) if script else (sys.executable, "-m", "datamover")
        return cls(argv0, target)

    def env(self) -> dict[str, str]:
        """No `DATAMOVER_*` overrides from the caller's shell."""
        return _base_env()

    def warm_command(self) -> list[str]:
        """A command that loads what a datamover transfer loads (interpreter and modules)."""
        python = self.argv0[0]
        if len(self.argv0) == 1:  # the console script: its interpreter is on the #! line
            with open(python, "rb") as f:
                first = f.readline().decode(errors="replace")
            python = first[2:].strip() if first.startswith("#!") else sys.executable
        return [python, "-c", _WARM_IMPORTS]

    def write_site(
        self, name: str, root: Path, bucket: str, data_dir: Path | None = None
    ) -> SiteFiles:
        """Write `root/<name>.toml` for a site whose `/bench` maps to `data_dir`."""
        data = data_dir or root / f"{name}-data"
        state = root / f"{name}-state"
        data.mkdir(parents=True, exist_ok=True)
        config = root / f"{name}.toml"
        config.write_text(
            "[site]\n"
            f'name = "{name}"\n'
            f'state_dir = "{state}"\n'
            "[store]\n"
            f'endpoint = "{self.target.endpoint}"\n'
            f'bucket = "{bucket}"\n'
            f'region = "{self.target.region}"\n'
            f'access_key = "{self.target.access_key}"\n'
            f'secret_key = "{self.target.secret_key}"\n'
            "[namespace]\n"
            f'"/bench" = "{data}"\n'
        )
        return SiteFiles(name, config, bucket, state, data)

    def push(self, logical: str, site: SiteFiles) -> list[str]:
        """Publish the site's tree of `logical`."""
        return [*self.argv0, "push", logical, "--config", str(site.config), "--json"]

    def stage(self, logical: str, site: SiteFiles) -> list[str]:
        """Materialise the latest version of `logical` at the site."""
        return [*self.argv0, "stage", logical, "--config", str(site.config), "--json"]

    def verify(self, logical: str, site: SiteFiles) -> list[str]:
        """Exit 0 iff the site's tree matches the latest version."""
        return [*self.argv0, "verify", logical, "--config", str(site.config), "--json"]
