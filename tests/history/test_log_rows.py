"""`append_log_rows`: the supervisor's way into the logs table (plain rows, many per INSERT)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from liberty.jobs.history import HistoryStore, LogLine
from liberty.jobs.history.store import log_row


@pytest.fixture
def store(tmp_path: Path):
    with HistoryStore(tmp_path / "history.db") as s:
        s.create_run("run-1", "demo", session_user="u", params={}, steps=["s"], supervisor_pid=os.getpid())
        yield s


def _rows(n: int, prefix: str = "m") -> list[tuple]:
    return [("run-1", 100.0 + i, "INFO", "log", f"{prefix}{i}", "s", 1) for i in range(n)]


@pytest.mark.parametrize("n", [1, 127, 128, 129, 300])
def test_rows_are_stored_in_list_order_across_statement_chunks(store: HistoryStore, n: int) -> None:
    rows = _rows(n)
    store.append_log_rows(rows)
    got = store.logs("run-1", limit=n + 1)
    assert [log_row(line) for line in got] == rows
    assert [line.id for line in got] == sorted(line.id for line in got)


def test_rows_and_lines_share_one_id_sequence(store: HistoryStore) -> None:
    store.append_log_rows(_rows(200, "a"))
    store.append_logs([LogLine("run-1", 1.0, "WARNING", "system", "note", "s", 1)])
    store.append_log_rows(_rows(3, "b"))
    messages = [line.message for line in store.logs("run-1", limit=1000)]
    assert messages[-5:] == ["a199", "note", "b0", "b1", "b2"] and len(messages) == 204


def test_a_row_of_the_wrong_width_rejects_the_whole_batch(store: HistoryStore) -> None:
    rows = _rows(200)
    rows[50] = rows[50][:6]
    with pytest.raises(ValueError, match="7 fields"):
        store.append_log_rows(rows)
    assert store.logs("run-1") == []


def test_an_unknown_stream_rejects_the_whole_batch(store: HistoryStore) -> None:
    rows = _rows(3)
    rows[1] = ("run-1", 1.0, "INFO", "stdrr", "typo", "s", 1)
    with pytest.raises(ValueError, match="unknown log stream"):
        store.append_log_rows(rows)
    assert store.logs("run-1") == []
