"""Test trees: small deterministic trees with every kind of entry, and helpers to compare them."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path


def make_tree(root: Path, files: int = 30, seed: int = 1, big: int = 3 << 20) -> None:
    """Directories of small text files, one multi-chunk file, an empty file and directory, a
    symlink, an executable and a read-only file, all with set mtimes."""
    rng = random.Random(seed)
    for i in range(files):
        d = root / f"d{i // 10:02d}"
        d.mkdir(parents=True, exist_ok=True)
        body = "".join(f"ATOM {rng.randint(0, 9999)} {rng.random():.6f}\n" for _ in range(60))
        (d / f"lig{i:04d}.pdbqt").write_text(body)
    (root / "big.bin").write_bytes(rng.randbytes(big))
    (root / "empty").write_bytes(b"")
    (root / "emptydir").mkdir()
    (root / "tool.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "tool.sh").chmod(0o755)
    (root / "ro.txt").write_text("read only\n")
    (root / "ro.txt").chmod(0o444)
    (root / "latest").symlink_to("big.bin")
    (root / "d00" / "up").symlink_to("../tool.sh")
    t = 1_700_000_000_000_000_000
    for n, path in enumerate(sorted(root.rglob("*"))):
        os.utime(path, ns=(t + n, t + n), follow_symlinks=False)


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything stage promises to preserve, keyed by relative path."""
    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(path), st.st_mtime_ns)
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
        else:
            out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns, path.read_bytes())
    return out


def three_packs(directory: Path) -> None:
    """40 files of 64 KiB of random (incompressible) bytes: three packs of 1 MiB."""
    directory.mkdir()
    for i in range(40):
        (directory / f"f{i:02d}").write_bytes(os.urandom(64 << 10))
