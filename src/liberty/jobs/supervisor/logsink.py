"""Run-log lines from every attempt, batched into the history off the hot path.

Producers `await put(line)`, or `put_lines(...)` for a run of lines of one
attempt (a chatty step's pipe read: rows, no object per line); a byte budget
gives backpressure (a child that logs faster than SQLite commits ends up
blocked on its pipe rather than growing the supervisor's memory; lines may be
64 KiB wide, so counting lines would not bound it).  One flusher task commits
whatever queued up while the previous commit ran, so batches grow with the
load and a quiet run still has each line committed at once.  A small batch
(a quiet run's few lines) is committed on the event loop when the store can
take it at once (`HistoryStore.write_now`), a bigger one on a worker thread.

A run's lines may come before its row is in the history (its step starts
while the row is written): `hold` keeps them queued until `release`, and
`discard` drops them, and any that follow, if the row never comes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from .._notnow import NOT_NOW
from ..history import HistoryStore, LogLine
from ..history.store import LogRow, log_row

BUDGET_BYTES = 8 * 1024 * 1024
INLINE_ROWS = 32  # a batch up to this many rows may be committed on the event loop
_LINE_OVERHEAD = 200  # the row around the text


class LogSink:
    def __init__(
        self,
        store: HistoryStore,
        listeners: list[Callable[[LogLine], None]],
        *,
        write_now: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self._store = store
        self._listeners = listeners
        self._write_now = write_now or store.write_now  # the supervisor's also checkpoints when due
        self._queue: list[LogRow] = []
        self._queued_cost = 0
        self._barriers: list[trio.Event] = []
        self._in_flight = 0  # bytes put and not yet committed: queued plus the batch being written
        self._drained = trio.Event()
        self._wake = trio.Event()
        self._closed = False
        self._held: set[str] = set()  # runs whose row is being written
        self._discarded: set[str] = set()  # runs whose row could not be written

    def hold(self, run_id: str) -> None:
        """Keep this run's lines queued (not written) until `release`."""
        self._held.add(run_id)

    def release(self, run_id: str) -> None:
        """The run's row exists: its lines may be written."""
        self._held.discard(run_id)
        self._wake.set()

    def discard(self, run_id: str) -> None:
        """The run's row will never exist: drop its queued lines and every later one."""
        self._held.discard(run_id)
        self._discarded.add(run_id)
        dropped = _rows_cost([row for row in self._queue if row[0] == run_id])
        self._queue = [row for row in self._queue if row[0] != run_id]
        self._queued_cost -= dropped
        self._in_flight -= dropped
        self._drained.set()
        self._drained = trio.Event()

    async def put(self, line: LogLine) -> None:
        self._check_open()
        for listener in self._listeners:
            listener(line)
        await self._admit([log_row(line)], len(line.message) + _LINE_OVERHEAD)

    async def put_lines(
        self, run_id: str, step: str | None, attempt: int | None, stream: str, entries: list[tuple[str, str]]
    ) -> None:
        """Queue (level, message) lines of one attempt's stream in order, all stamped now."""
        self._check_open()
        ts = time.time()
        rows = [(run_id, ts, level, stream, message, step, attempt) for level, message in entries]
        if self._listeners:
            for row in rows:
                line = LogLine(*row)
                for listener in self._listeners:
                    listener(line)
        await self._admit(rows, sum(len(message) for _, message in entries) + _LINE_OVERHEAD * len(entries))

    def put_nowait(self, line: LogLine) -> None:
        """For synchronous callers (connector call notes): never waits, the budget may overshoot by these."""
        self._check_open()
        for listener in self._listeners:
            listener(line)
        self._enqueue([log_row(line)], len(line.message) + _LINE_OVERHEAD)

    async def _admit(self, rows: list[LogRow], cost: int) -> None:
        # Waits only while the budget is spent, so there is no scheduling point per line.
        # An oversize group still gets in once nothing is in flight: the bound is budget + one group.
        while self._in_flight and self._in_flight + cost > BUDGET_BYTES:
            await self._drained.wait()
        self._enqueue(rows, cost)

    def _enqueue(self, rows: list[LogRow], cost: int) -> None:
        if self._discarded and rows and rows[0][0] in self._discarded:
            return  # one run per call: the producers put one attempt's lines at a time
        self._queue += rows
        self._queued_cost += cost
        self._in_flight += cost
        self._wake.set()

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the log sink is closed")

    async def flush(self) -> None:
        """Return once every line put before this call is committed."""
        self._check_open()
        if not self._in_flight:
            return  # none queued, none being written
        done = trio.Event()
        self._barriers.append(done)
        self._wake.set()
        await done.wait()

    async def close(self) -> None:
        await self.flush()
        self._closed = True
        self._wake.set()

    async def run(self) -> None:
        """The flusher: runs until `close()`."""
        while True:
            if not self._writable() and not self._barriers:
                if self._closed:
                    return
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            batch, self._queue = self._queue, []
            cost, self._queued_cost = self._queued_cost, 0
            if self._held:
                self._queue = [row for row in batch if row[0] in self._held]
                if self._queue:
                    batch = [row for row in batch if row[0] not in self._held]
                    self._queued_cost = _rows_cost(self._queue)
                    cost -= self._queued_cost
            barriers, self._barriers = self._barriers, []
            if batch:
                if len(batch) > INLINE_ROWS or self._write_now(lambda: self._store.append_log_rows(batch)) is NOT_NOW:
                    await trio.to_thread.run_sync(self._store.append_log_rows, batch)
                self._in_flight -= cost
                self._drained.set()
                self._drained = trio.Event()
            for barrier in barriers:
                barrier.set()

    def _writable(self) -> bool:
        """Whether a queued line may be written now (not all of them wait for their run's row)."""
        if not self._held:
            return bool(self._queue)
        return any(row[0] not in self._held for row in self._queue)


def _rows_cost(rows: list[LogRow]) -> int:
    """What `put` and `put_lines` counted for these rows against the budget."""
    return sum(len(row[4]) for row in rows) + _LINE_OVERHEAD * len(rows)
