"""Stages queued while one ran are answered by it, batch after batch."""

from __future__ import annotations

import json
from typing import Any

import pytest

from datamover.catalog.access import Access
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from tests.fixtures_sites import MakeSite


async def test_answering_waiting_stages_goes_on_after_a_short_batch(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch cut short (a stage cancelled or claimed while it was answered) ended the
    # answering: the stages behind it each waited to be claimed and checked on their own.
    from datamover.catalog.transfer_rows import Submission
    from datamover.catalog.transfers import Transfers
    from datamover.domain.transfers import State
    from datamover.scheduler.satisfied import answer_waiting

    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "f").write_text("data\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        staged = await stage(site_b, "/proj/ds")
        queue = Transfers(site_b.catalog.engine)
        queue.answer_batch = 2

        def sub() -> Submission:
            return Submission(tenant="t1", kind="stage", path="/proj/ds")

        lead, _ = await queue.submit(sub())
        await queue.claim("w", 30)
        waiting = [(await queue.submit(sub()))[0].id for _ in range(5)]
        done = await queue.transition(
            lead.id, State.SUCCEEDED, owner="w", result=json.dumps(staged.to_json())
        )
        real = queue.answer_stages
        calls: list[int] = []

        async def first_short(*args: Any, **kw: Any) -> Any:
            got = await real(*args, **kw)
            calls.append(len(got))
            return got[:1] if len(calls) == 1 else got  # as if one were cancelled meanwhile

        monkeypatch.setattr(queue, "answer_stages", first_short)
        answered = await answer_waiting(site_b, queue, Access(site_b.catalog.engine), done)
        assert len(answered) == 4 and calls[0] == 2  # all but the one cut off the first batch
        states = [(await queue.get(t)).state for t in waiting]
        assert states.count("succeeded") == 5  # the cut one was answered too, just not listed
    finally:
        await site_a.close()
        await site_b.close()
