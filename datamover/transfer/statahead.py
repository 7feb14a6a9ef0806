"""Looking up a directory's next names ahead of a walk, on threads, where `lstat` is slow.

A walk `lstat`s its entries one after another. On a local file system each answer takes a
few microseconds and nothing is gained by asking several at once. On a network or parallel
file system (NFS, Lustre, GPFS, CephFS) each is a round trip to a metadata server of 0.1 to
a few milliseconds, and a tree of hundreds of millions of files is walked in hours instead
of minutes: the walk waits, the server and the network idle. Asked many at a time, the
server answers them together.

`Lookups` (one per walk) times samples of the walk's own `lstat`s (`SAMPLE` in a row,
then `UNTIMED` not). Once more than half of a sample took over `SLOW_NS` each, it starts
`THREADS` threads. The median decides, not the mean: an `lstat` that waited for the GIL,
held by another thread of the process (a push's event loop), takes the 5 ms switch
interval, and a mean takes one such for a slow file system. Each directory listing walked
from then on gets an `Ahead`: the `lstat`s of the next `WINDOW` names the walk will look
at are asked for in pieces of `PIECE` names, and the walk takes each answer when it gets
there. Nothing else changes: an answer is the `lstat` of the same name relative to the same
directory descriptor, taken a little earlier. An answer that was an error is not trusted,
as the walk may have changed something since (given a directory its owner's search bit):
the name is looked up again, by the walk itself. Nothing past the next subdirectory is
looked up before the walk has been through it, and lookups of names the walk passed
without a look are cancelled (`Ahead`). Memory: about `WINDOW` answers per directory level
being walked, whatever its size.

A directory's descriptor must stay open while lookups in it may run: `Ahead.close` cancels
those not started and waits for the others, and the walk calls it before closing the
descriptor (but for a walk the garbage collector closes: see `Ahead.close`).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

#: Median `lstat` time, in nanoseconds, above which a walk looks names up ahead: local file
#: systems answer in 1-5 us (measured here: 1.7 us on ext4), network ones in 100 us or more.
SLOW_NS = 50_000
#: `lstat`s timed to decide, and how many are not timed after a sample found them fast
#: (timing costs a tenth of a local `lstat`); then a sample decides again.
SAMPLE = 64
UNTIMED = 7 * SAMPLE
#: Lookups in flight at most (threads), names per lookup, and names looked up ahead.
THREADS = 16
PIECE = 8
WINDOW = 512

Answer = os.stat_result | OSError

log = logging.getLogger(__name__)


def _lstat(name: str, fd: int) -> os.stat_result:
    return os.stat(name, dir_fd=fd, follow_symlinks=False)


def _look_up(fd: int, names: list[str]) -> dict[str, Answer]:
    answers: dict[str, Answer] = {}
    for name in names:
        try:
            answers[name] = _lstat(name, fd)
        except OSError as exc:
            answers[name] = exc
    return answers


class Ahead:
    """The lookups of one directory listing. `names` is the walk's list of the names still
    to come, last first (the walk `pop`s them); `wanted(name)` says whether the walk will
    `lstat` a name, `is_dir(name)` whether it is a directory the walk may go down into
    (both asked when the name's turn to be looked up comes).

    Nothing past the next directory is looked up until the walk is past it: the walk goes
    down into it first, which may take hours, and an answer is meant to be a little
    earlier than the walk's own look, not older than the subtree below it. The walk drops
    a directory's `Ahead` as it goes down (`close`) and makes a new one as it comes back.
    The answer of a name the walk passed without looking at it (a file push has no parent
    entry for) is dropped as the walk moves on: at most `WINDOW` answers are held, and the
    name the walk is at.
    """

    def __init__(
        self,
        pool: ThreadPoolExecutor,
        fd: int,
        names: list[str],
        wanted: Callable[[str], bool],
        is_dir: Callable[[str], bool],
        at_dir: bool = False,
    ) -> None:
        """`at_dir`: the name the walk is at (popped last) is a directory, which it may
        go down into next: nothing is asked for until the walk is past it."""
        self._pool = pool
        self._fd = fd
        self._names = names
        self._wanted = wanted
        self._is_dir = is_dir
        self._total = len(names)  # the names left when the lookups began
        self._sent = 0  # of those, how many were considered for a lookup, in walk order
        # Past a directory at position `_wall - 1` (-1: the name the walk is at), nothing
        # is sent until the walk is past it.
        self._wall: int | None = 0 if at_dir else None
        self._answers: dict[str, Future[dict[str, Answer]]] = {}
        self._asked: deque[tuple[int, str]] = deque()  # (position, name) of `_answers`
        # (last position, lookup) of the lookups not known to be done, in walk order
        self._futures: deque[tuple[int, Future[dict[str, Answer]]]] = deque()

    def advance(self) -> None:
        """Ask for the names up to `WINDOW` past the walk's position, and no further than
        the next directory, a piece of `PIECE` names at a time; drop the answers of names
        the walk passed, and cancel lookups of those alone. Call it as the walk moves on:
        after each `pop`."""
        taken = self._total - len(self._names)  # names the walk has popped
        passed = taken - 1  # positions below it the walk passed (it is at `passed`)
        while self._asked and self._asked[0][0] < passed:  # passed, never looked at
            self._answers.pop(self._asked.popleft()[1], None)
        while self._futures and self._futures[0][1].done():
            self._futures.popleft()  # their answers are in `_answers`, or not wanted
        if self._wall is not None and taken > self._wall:
            self._wall = None  # the walk came past the directory without going down
        self._sent = max(self._sent, taken)
        end = min(self._total, taken + WINDOW)
        if self._wall is not None:
            end = min(end, self._wall)
        elif end - self._sent < PIECE and end < self._total:
            return  # less than a piece free in the window: wait for the walk to move on
        # Kept: the lookups still running or wanted (`close` waits for them); those of
        # names the walk passed alone are cancelled if not started.
        self._futures = deque(
            (last, future)
            for last, future in self._futures
            if not (future.done() or (last < passed and future.cancel()))
        )
        while self._sent < end:
            piece: list[str] = []
            stop = min(end, self._sent + PIECE)
            while self._sent < stop:
                # walk position i is names[total - 1 - i] while the walk has not popped it
                position, name = self._sent, self._names[self._total - 1 - self._sent]
                self._sent += 1
                if self._wanted(name):
                    piece.append(name)
                    self._asked.append((position, name))
                if self._is_dir(name):
                    self._wall = end = stop = self._sent
            if piece:
                future = self._pool.submit(_look_up, self._fd, piece)
                self._futures.append((self._sent - 1, future))
                for name in piece:
                    self._answers[name] = future

    def stat(self, name: str) -> os.stat_result:
        """The `lstat` of `name`: the answer looked up ahead, else (not asked for, or an
        error) looked up now. Raises what `lstat` raises."""
        future = self._answers.pop(name, None)
        if future is not None:
            answer = future.result().get(name)
            if isinstance(answer, os.stat_result):
                return answer
        return _lstat(name, self._fd)

    def close(self, wait_running: bool = True) -> None:
        """Cancel the lookups not started and (`wait_running`) wait for those running: the
        descriptor may be closed once this returns. Without waiting, a lookup may still
        look a name up in the descriptor after it is closed, or in another directory that
        got its number: for a walk being thrown away only, whose answers nobody takes."""
        futures = [future for _, future in self._futures]
        self._futures.clear()
        self._answers.clear()
        self._asked.clear()
        for future in futures:
            future.cancel()
        if wait_running:
            wait(futures)


class Lookups:
    """One walk's `lstat`s: timed until they prove slow, then looked up ahead (`ahead`)."""

    def __init__(self, threads: int = THREADS, slow_ns: int | None = None) -> None:
        self.threads = threads
        self.slow_ns = SLOW_NS if slow_ns is None else slow_ns
        self._pool: ThreadPoolExecutor | None = None
        self._timed = 0  # `lstat`s timed in the current sample
        self._slow = 0  # of those, how many took more than `slow_ns`
        self._untimed = 0  # `lstat`s left before the next sample

    @property
    def on(self) -> bool:
        """Whether names are looked up ahead (the walk's `lstat`s proved slow)."""
        return self._pool is not None

    def stat(self, name: str, fd: int) -> os.stat_result:
        """`lstat` `name` in directory `fd` now, timing it while the decision is open."""
        if self._pool is not None or self.threads <= 1:
            return _lstat(name, fd)
        if self._untimed:
            self._untimed -= 1
            return _lstat(name, fd)
        start = time.perf_counter_ns()
        try:
            return _lstat(name, fd)
        finally:
            self._slow += time.perf_counter_ns() - start > self.slow_ns
            self._timed += 1
            if self._timed == SAMPLE:
                if self._slow > SAMPLE // 2:
                    log.debug(
                        "lstat is slow here (%d of %d took over %d us): looking names up "
                        "ahead on %d threads",
                        self._slow,
                        SAMPLE,
                        self.slow_ns // 1000,
                        self.threads,
                    )
                    self._pool = ThreadPoolExecutor(self.threads, "datamover-lstat")
                self._timed = self._slow = 0
                self._untimed = UNTIMED

    def ahead(
        self,
        fd: int,
        names: list[str],
        wanted: Callable[[str], bool],
        is_dir: Callable[[str], bool],
        at_dir: bool = False,
    ) -> Ahead:
        """Lookups for the listing of directory `fd` whose names still to come are `names`
        (last first); see `Ahead`. Only when `on`."""
        if self._pool is None:
            raise RuntimeError("names are not looked up ahead")
        return Ahead(self._pool, fd, names, wanted, is_dir, at_dir)

    def close(self, wait_running: bool = True) -> None:
        """Stop the threads (every `Ahead` must be closed first). Without `wait_running`,
        for a walk closed by the garbage collector, which may run on one of these threads:
        it would wait for itself."""
        if self._pool is not None:
            self._pool.shutdown(wait=wait_running, cancel_futures=True)
            self._pool = None
