"""LogSink: lines reach the history in order, and a flood waits on the byte budget instead of piling up."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from liberty.jobs.history import HistoryStore, LogLine
from liberty.jobs.supervisor.logsink import BUDGET_BYTES, INLINE_ROWS, LogSink

pytestmark = pytest.mark.trio


@pytest.fixture
def store(tmp_path: Path):
    with HistoryStore(tmp_path / "history.db") as s:
        s.create_run("run-1", "demo", session_user="u", params={}, steps=["s"], supervisor_pid=os.getpid())
        yield s


@asynccontextmanager
async def flushing(sink: LogSink) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run)
        yield
        await sink.close()


async def test_put_lines_stores_each_line_with_its_attempt_in_order(store: HistoryStore) -> None:
    sink = LogSink(store, [])
    async with flushing(sink):
        await sink.put(LogLine("run-1", 1.0, "WARNING", "system", "before", "s", 1))
        await sink.put_lines("run-1", "s", 2, "log", [("INFO", "one"), ("ERROR", "two")])
        await sink.flush()
        got = store.logs("run-1")
    assert [(ln.level, ln.stream, ln.message, ln.step, ln.attempt) for ln in got] == [
        ("WARNING", "system", "before", "s", 1),
        ("INFO", "log", "one", "s", 2),
        ("ERROR", "log", "two", "s", 2),
    ]
    assert got[1].ts == got[2].ts > 1.0


async def test_listeners_see_every_line_as_a_log_line(store: HistoryStore) -> None:
    seen: list[LogLine] = []
    sink = LogSink(store, [seen.append])
    async with flushing(sink):
        await sink.put_lines("run-1", "s", 1, "stdout", [("INFO", "a"), ("INFO", "b")])
        sink.put_nowait(LogLine("run-1", 1.0, "DEBUG", "system", "c", "s", 1))
    assert [(ln.stream, ln.message) for ln in seen] == [("stdout", "a"), ("stdout", "b"), ("system", "c")]
    assert [ln.message for ln in store.logs("run-1")] == ["a", "b", "c"]


async def test_a_producer_waits_while_the_budget_is_spent_and_resumes_after_a_commit(store: HistoryStore) -> None:
    sink = LogSink(store, [])
    wide = [("INFO", "w" * (64 * 1024))] * 16  # 1 MiB per group
    groups = BUDGET_BYTES // (1024 * 1024) + 4
    done: list[int] = []

    async def flood() -> None:
        for i in range(groups):
            await sink.put_lines("run-1", "s", 1, "log", wide)
            done.append(i)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        await trio.testing.wait_all_tasks_blocked()
        assert 0 < len(done) < groups  # blocked on the budget: nothing commits yet
        nursery.start_soon(sink.run)  # commits free the budget
        with trio.fail_after(60):
            while len(done) < groups:
                await trio.sleep(0.01)
        await sink.close()
    assert len(store.logs("run-1", limit=10**6)) == groups * len(wide)


async def test_a_group_wider_than_the_budget_still_gets_in_alone(store: HistoryStore) -> None:
    sink = LogSink(store, [])
    huge = [("INFO", "h" * (1024 * 1024))] * (BUDGET_BYTES // (1024 * 1024) + 2)
    async with flushing(sink):
        with trio.fail_after(60):
            await sink.put_lines("run-1", "s", 1, "log", huge)
            await sink.put_lines("run-1", "s", 1, "log", huge)
    assert len(store.logs("run-1", limit=10**6)) == 2 * len(huge)


async def test_flush_returns_once_earlier_lines_are_readable(store: HistoryStore) -> None:
    sink = LogSink(store, [])
    async with flushing(sink):
        for i in range(5):
            await sink.put_lines("run-1", "s", 1, "log", [("INFO", f"m{i}")] * 300)
        await sink.flush()
        assert len(store.logs("run-1", limit=10**6)) == 1500


async def test_putting_after_close_is_refused(store: HistoryStore) -> None:
    sink = LogSink(store, [])
    async with flushing(sink):
        pass
    with pytest.raises(trio.ClosedResourceError):
        await sink.put_lines("run-1", "s", 1, "log", [("INFO", "late")])


async def test_a_held_runs_lines_wait_for_release_while_other_runs_lines_are_written(store: HistoryStore) -> None:
    sink = LogSink(store, [])
    async with flushing(sink):
        sink.hold("run-2")
        await sink.put(LogLine("run-2", 1.0, "INFO", "log", "early", "s", 1))  # its row does not exist yet
        await sink.put(LogLine("run-1", 1.0, "INFO", "log", "other", "s", 1))
        await sink.flush()
        assert [ln.message for ln in store.logs("run-1")] == ["other"]
        store.create_run("run-2", "demo", session_user="u", params={}, steps=["s"], supervisor_pid=os.getpid())
        sink.release("run-2")
        await sink.put(LogLine("run-2", 2.0, "INFO", "log", "late", "s", 1))
        await sink.flush()
        assert [ln.message for ln in store.logs("run-2")] == ["early", "late"]


async def test_a_discarded_runs_lines_are_never_written_and_free_their_budget(store: HistoryStore) -> None:
    sink = LogSink(store, [])
    async with flushing(sink):
        sink.hold("ghost")
        await sink.put_lines("ghost", "s", 1, "log", [("INFO", "x" * (BUDGET_BYTES // 2))])
        sink.discard("ghost")
        await sink.put(LogLine("ghost", 1.0, "INFO", "log", "after", "s", 1))
        with trio.fail_after(10):  # the dropped half budget is free again: this does not wait for it
            await sink.put_lines("run-1", "s", 1, "log", [("INFO", "y" * (BUDGET_BYTES * 3 // 4))])
        await sink.flush()
        assert sink._in_flight == 0
    assert [len(ln.message) for ln in store.logs("run-1")] == [BUDGET_BYTES * 3 // 4]
    assert store.logs("ghost") == []


async def test_a_flush_with_nothing_put_returns_at_once(store: HistoryStore) -> None:
    sink = LogSink(store, [])  # no flusher running: a flush that waited for one would never return
    with trio.fail_after(5):
        await sink.flush()


async def test_a_few_lines_are_committed_on_the_event_loop_and_many_on_a_worker_thread(store: HistoryStore) -> None:
    threads: list[str] = []
    append = store.append_log_rows

    def watched(rows: list) -> None:  # type: ignore[type-arg]
        threads.append(threading.current_thread().name)
        append(rows)

    store.append_log_rows = watched  # type: ignore[method-assign]
    sink = LogSink(store, [])
    async with flushing(sink):
        await sink.put_lines("run-1", "s", 1, "log", [("INFO", "few")] * INLINE_ROWS)
        await sink.flush()
        await sink.put_lines("run-1", "s", 1, "log", [("INFO", "many")] * (INLINE_ROWS + 1))
        await sink.flush()
    assert threads[0] == threading.current_thread().name
    assert threads[1] != threading.current_thread().name
    assert [ln.message for ln in store.logs("run-1", limit=1000)] == ["few"] * INLINE_ROWS + ["many"] * (INLINE_ROWS + 1)
