"""Stage's trash and batches: setid bits and owners of copies across file systems, a
directory swapped for a symlink while it is moved across, what a batch of small files
fetches at once, and how many trash moves a worker process reports."""

from __future__ import annotations

from pathlib import Path

from datamover.chunking import codec
from datamover.domain.manifest import ChunkRef
from datamover.transfer.fetch import plan_ranges
from datamover.transfer.fsops import TRASHED_SAMPLE
from datamover.transfer.writers import write_batch

PACK = bytes(32)

# -- a worker's trash moves are all counted ---------------------------------------------------


def test_a_worker_reports_every_trash_move_not_only_its_sample(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    data = b"version bytes"
    ref = ChunkRef(codec.digest(data), PACK, 0, len(data), len(data), codec.Codec.RAW)
    ranges = plan_ranges([ref], 0, 1 << 20)
    files = []
    for i in range(TRASHED_SAMPLE + 50):
        # Saved by a user where the walk saw nothing: moved to the trash before the write.
        (tmp_path / "ds" / f"f{i:03}").write_text("a user's file\n")
        files.append((f"f{i:03}", 0o644, 0, (ref,), None))
    written = write_batch(str(tmp_path), ("ds",), ranges, [data], files, str(tmp_path / "trash"))
    assert len(list((tmp_path / "trash").iterdir())) == TRASHED_SAMPLE + 50
    assert written.trashed_count == TRASHED_SAMPLE + 50
    assert written.trashed == [f"f{i:03}" for i in range(TRASHED_SAMPLE)]
