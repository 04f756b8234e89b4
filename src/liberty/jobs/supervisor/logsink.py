"""Run-log lines from every attempt, batched into the history off the hot path.

Producers `await put(line)`; a byte budget gives backpressure (a child that
logs faster than SQLite commits ends up blocked on its pipe rather than
growing the supervisor's memory; lines may be 64 KiB wide, so counting lines
would not bound it).  One flusher task commits batches.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from ..history import HistoryStore, LogLine

BATCH = 2000
CAPACITY = 20000
BUDGET_BYTES = 8 * 1024 * 1024
_LINE_OVERHEAD = 200  # the LogLine object around the text


def _cost(line: LogLine) -> int:
    return len(line.message) + _LINE_OVERHEAD


class LogSink:
    def __init__(self, store: HistoryStore, listeners: list[Callable[[LogLine], None]]) -> None:
        self._store = store
        self._listeners = listeners
        self._send, self._receive = trio.open_memory_channel[LogLine | trio.Event](CAPACITY)
        self._spill: list[LogLine] = []
        self._in_flight = 0
        self._drained = trio.Event()

    async def put(self, line: LogLine) -> None:
        for listener in self._listeners:
            listener(line)
        cost = _cost(line)
        while self._in_flight and self._in_flight + cost > BUDGET_BYTES:
            await self._drained.wait()
        self._in_flight += cost
        try:
            self._send.send_nowait(line)  # no scheduling point per line while there is room
        except trio.WouldBlock:
            await self._send.send(line)

    def put_nowait(self, line: LogLine) -> None:
        """For synchronous callers (connector call notes); a full buffer spills into the next batch."""
        for listener in self._listeners:
            listener(line)
        self._in_flight += _cost(line)
        try:
            self._send.send_nowait(line)
        except trio.WouldBlock:
            self._spill.append(line)

    async def flush(self) -> None:
        """Return once every line put before this call is committed."""
        done = trio.Event()
        await self._send.send(done)
        await done.wait()

    async def close(self) -> None:
        await self.flush()
        await self._send.aclose()

    async def run(self) -> None:
        """The flusher: runs until `close()`."""
        async with self._receive:
            async for first in self._receive:
                batch: list[LogLine] = []
                barriers: list[trio.Event] = []
                item: LogLine | trio.Event = first
                while True:
                    if isinstance(item, trio.Event):
                        barriers.append(item)
                    else:
                        batch.append(item)
                    if len(batch) >= BATCH:
                        break
                    try:
                        item = self._receive.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                if self._spill:
                    batch.extend(self._spill)
                    self._spill = []
                if batch:
                    await trio.to_thread.run_sync(self._store.append_logs, batch)
                    self._in_flight -= sum(_cost(line) for line in batch)
                    self._drained.set()
                    self._drained = trio.Event()
                for barrier in barriers:
                    barrier.set()
