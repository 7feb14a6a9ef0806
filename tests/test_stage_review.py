"""Stage: a planted partial file, a swapped dataset directory, a lagging writer thread."""

from __future__ import annotations

import os
from pathlib import Path

from datamover.transfer import fsops
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from tests.fixtures_sites import MakeSite


async def test_a_partial_file_hard_linked_elsewhere_is_not_written_through(
    make_site: MakeSite, tmp_path: Path
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b", batch_bytes=4 << 20)
    (a.data / "ds").mkdir()
    content = os.urandom(3 << 20)  # above batch_bytes / 4: a large file, resumable
    (a.data / "ds" / "big").write_bytes(content)
    victim = tmp_path / "victim"  # a file outside the tree, on the same file system
    victim.write_bytes(b"somebody else's data\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        doc = await site_b.repo.resolve("/proj/ds", None)
        [entry] = site_b.repo.iter_cached(await site_b.repo.prefetch(doc), check=True)
        (b.data / "ds").mkdir()
        os.link(victim, b.data / "ds" / fsops.partial_name(entry))  # planted by a user
        await stage(site_b, "/proj/ds")
        assert victim.read_bytes() == b"somebody else's data\n"
        assert (b.data / "ds" / "big").read_bytes() == content
        assert os.stat(b.data / "ds" / "big").st_ino != os.stat(victim).st_ino
    finally:
        await site_a.close()
        await site_b.close()
