"""The run history store: schema, lifecycle writes, logs, cancel flags, recovery, concurrency."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from liberty.jobs._notnow import NOT_NOW
from liberty.jobs.errors import ConfigError, RunNotFoundError, UsageError
from liberty.jobs.history import (
    CHECKPOINT_EVERY,
    SCHEMA_VERSION,
    AttemptRecord,
    HistoryStore,
    LogLine,
    RunView,
)

SRC = Path(__file__).resolve().parents[2] / "src"
STEP_KEYS = {"name", "status", "attempts", "output", "error", "wall_s", "cpu_s", "peak_rss_mb"}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "history.db"


@pytest.fixture
def store(db_path: Path):
    with HistoryStore(db_path) as s:
        yield s


def _new_run(store: HistoryStore, run_id: str = "run-0001", *, job: str = "demo",
             steps: tuple[str, ...] = ("extract", "load"), pid: int | None = None,
             created_at: float | None = None) -> str:
    store.create_run(
        run_id, job, session_user="alice", params={"period": "2026-04"}, steps=list(steps),
        supervisor_pid=os.getpid() if pid is None else pid, created_at=created_at,
    )
    return run_id


def _attempt(run_id: str, step: str, attempt: int, **kw) -> AttemptRecord:
    fields = dict(
        run_id=run_id, step=step, attempt=attempt, status="FAILED", reason="exception",
        output=None, error={"type": "ValueError", "message": "bad", "traceback": "tb"},
        started_at=100.0, ended_at=101.5, wall_s=1.5, cpu_s=0.25, peak_rss_mb=30.0,
    )
    fields.update(kw)
    return AttemptRecord(**fields)


def _lines(run_id: str, n: int, *, prefix: str = "m", step: str | None = None) -> list[LogLine]:
    return [LogLine(run_id, 1000.0 + i, "INFO", "log", f"{prefix}{i}", step, 1) for i in range(n)]


def _python(script: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out


# --- opening -----------------------------------------------------------------


def test_memory_store_writes_nothing_to_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    with HistoryStore(":memory:") as s:
        _new_run(s)
        s.append_logs(_lines("run-0001", 10))
        assert len(s.logs("run-0001")) == 10
    assert list(tmp_path.iterdir()) == []


def test_missing_parent_directories_are_created(tmp_path: Path):
    path = tmp_path / "a" / "b" / "history.db"
    with HistoryStore(path) as s:
        _new_run(s)
    assert path.is_file()


def test_file_is_opened_in_wal_mode(db_path: Path):
    HistoryStore(db_path).close()
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_connection_uses_normal_sync_and_busy_timeout(store: HistoryStore):
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert store._conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 5000


def test_fresh_file_gets_current_schema_version(db_path: Path):
    HistoryStore(db_path).close()
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_newer_schema_version_is_config_error_naming_file(db_path: Path):
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(ConfigError) as info:
        HistoryStore(db_path)
    assert str(db_path) in str(info.value)
    assert str(SCHEMA_VERSION + 1) in str(info.value)


def test_file_that_is_not_a_database_is_config_error_naming_file(db_path: Path):
    db_path.write_bytes(b"this is not sqlite, just some text that is long enough" * 100)
    with pytest.raises(ConfigError) as info:
        HistoryStore(db_path)
    assert str(db_path) in str(info.value)


def test_reopened_file_keeps_runs(db_path: Path):
    with HistoryStore(db_path) as s:
        _new_run(s)
    with HistoryStore(db_path) as s:
        assert s.get_run("run-0001").job == "demo"


def test_context_manager_closes_the_connection(db_path: Path):
    with HistoryStore(db_path) as s:
        pass
    with pytest.raises(sqlite3.ProgrammingError):
        s.list_runs()


# --- runs and steps ------------------------------------------------------------


def test_create_run_queues_run_and_steps_in_order(store: HistoryStore):
    _new_run(store, steps=("c", "a", "b"), created_at=123.0)
    run = store.get_run("run-0001")
    assert (run.job, run.status, run.session_user, run.params) == (
        "demo", "QUEUED", "alice", {"period": "2026-04"})
    assert (run.created_at, run.started_at, run.ended_at) == (123.0, None, None)
    assert run.supervisor_pid == os.getpid()
    assert run.cancel_requested is False
    assert [(s.name, s.index, s.status, s.attempts) for s in run.steps] == [
        ("c", 0, "QUEUED", 0), ("a", 1, "QUEUED", 0), ("b", 2, "QUEUED", 0)]


def test_timestamps_default_to_now(store: HistoryStore):
    before = time.time()
    _new_run(store)
    store.start_run("run-0001")
    store.start_step("run-0001", "extract")
    store.finish_step("run-0001", "extract", status="SUCCEEDED", attempts=1)
    store.finish_run("run-0001", "SUCCEEDED")
    after = time.time()
    run = store.get_run("run-0001")
    for ts in (run.created_at, run.started_at, run.ended_at, run.steps[0].started_at,
               run.steps[0].ended_at):
        assert before <= ts <= after


def test_creating_an_existing_run_is_usage_error(store: HistoryStore):
    _new_run(store)
    with pytest.raises(UsageError, match="run-0001"):
        _new_run(store)


def test_duplicate_step_names_are_usage_error(store: HistoryStore):
    with pytest.raises(UsageError, match="unique"):
        _new_run(store, steps=("a", "a"))
    with pytest.raises(RunNotFoundError):
        store.get_run("run-0001")


def test_a_run_created_started_is_running_with_its_first_step(store: HistoryStore):
    store.create_run("run-0001", "demo", session_user="alice", params={}, steps=["extract", "load"],
                     supervisor_pid=os.getpid(), created_at=5.0, started=True)
    run = store.get_run("run-0001")
    assert (run.status, run.started_at) == ("RUNNING", 5.0)
    assert [(s.name, s.status, s.started_at) for s in run.steps] == [("extract", "RUNNING", 5.0), ("load", "QUEUED", None)]


def test_start_run_sets_running(store: HistoryStore):
    _new_run(store)
    store.start_run("run-0001", started_at=5.0)
    run = store.get_run("run-0001")
    assert (run.status, run.started_at) == ("RUNNING", 5.0)


def test_finish_run_sets_status_and_end(store: HistoryStore):
    _new_run(store)
    store.start_run("run-0001")
    store.finish_run("run-0001", "TIMED_OUT", ended_at=9.0)
    run = store.get_run("run-0001")
    assert (run.status, run.ended_at) == ("TIMED_OUT", 9.0)


def test_finish_run_rejects_a_status_that_is_not_final(store: HistoryStore):
    _new_run(store)
    with pytest.raises(ValueError, match="RUNNING"):
        store.finish_run("run-0001", "RUNNING")


def test_writes_to_unknown_run_raise_run_not_found(store: HistoryStore):
    with pytest.raises(RunNotFoundError, match="nope"):
        store.start_run("nope")
    with pytest.raises(RunNotFoundError, match="nope"):
        store.start_step("nope", "extract")


def test_start_step_sets_running(store: HistoryStore):
    _new_run(store)
    store.start_step("run-0001", "load", started_at=7.0)
    step = store.get_run("run-0001").steps[1]
    assert (step.status, step.started_at) == ("RUNNING", 7.0)


def test_finish_step_records_outcome(store: HistoryStore):
    _new_run(store)
    store.start_step("run-0001", "extract")
    error = {"type": "KeyError", "message": "'x'", "reason": "exception", "traceback": "Tr..."}
    store.finish_step("run-0001", "extract", status="FAILED", attempts=3, output={"rows": [1, 2]},
                      error=error, wall_s=1.25, cpu_s=0.5, peak_rss_mb=42.0, ended_at=8.0)
    step = store.get_run("run-0001").steps[0]
    assert (step.status, step.attempts, step.output, step.error) == (
        "FAILED", 3, {"rows": [1, 2]}, error)
    assert (step.wall_s, step.cpu_s, step.peak_rss_mb, step.ended_at) == (1.25, 0.5, 42.0, 8.0)


def test_skip_steps_marks_them_skipped(store: HistoryStore):
    _new_run(store, steps=("a", "b", "c"))
    store.skip_steps("run-0001", ["b", "c"])
    assert [s.status for s in store.get_run("run-0001").steps] == ["QUEUED", "SKIPPED", "SKIPPED"]


def test_unknown_step_is_usage_error_listing_the_steps(store: HistoryStore):
    _new_run(store)
    with pytest.raises(UsageError, match=r"'nope'.*\['extract', 'load'\]"):
        store.finish_step("run-0001", "nope", status="SUCCEEDED", attempts=1)


def test_attempts_appear_on_their_step_in_order(store: HistoryStore):
    _new_run(store)
    store.record_attempt(_attempt("run-0001", "extract", 2, status="SUCCEEDED", reason=None,
                                  error=None, output={"n": 1}, exit_code=0,
                                  usage={"memory_limit_mb": 512}))
    store.record_attempt(_attempt("run-0001", "extract", 1, exit_code=1))
    run = store.get_run("run-0001")
    first, second = run.steps[0].attempt_records
    assert first == _attempt("run-0001", "extract", 1, exit_code=1)
    assert second == _attempt("run-0001", "extract", 2, status="SUCCEEDED", reason=None,
                              error=None, output={"n": 1}, exit_code=0,
                              usage={"memory_limit_mb": 512})
    assert run.steps[1].attempt_records == []


def test_recording_an_attempt_twice_is_usage_error(store: HistoryStore):
    _new_run(store)
    store.record_attempt(_attempt("run-0001", "extract", 1))
    with pytest.raises(UsageError, match="attempt 1"):
        store.record_attempt(_attempt("run-0001", "extract", 1))


def test_attempt_of_unknown_step_is_usage_error(store: HistoryStore):
    _new_run(store)
    with pytest.raises(UsageError, match="'nope'"):
        store.record_attempt(_attempt("run-0001", "nope", 1))


# --- JSON shapes -------------------------------------------------------------


def test_run_json_has_the_design_contract_shape(store: HistoryStore):
    _new_run(store)
    store.start_run("run-0001")
    store.finish_step("run-0001", "extract", status="FAILED", attempts=2,
                      error={"type": "ValueError", "message": "bad", "reason": "exception",
                             "traceback": "tb"}, wall_s=1.0, cpu_s=0.5, peak_rss_mb=10.0)
    store.skip_steps("run-0001", ["load"])
    store.finish_run("run-0001", "FAILED")
    doc = json.loads(json.dumps(store.get_run("run-0001").to_json()))
    assert {"run_id", "job", "status", "steps"} <= doc.keys()
    assert (doc["run_id"], doc["job"], doc["status"]) == ("run-0001", "demo", "FAILED")
    assert [set(s) for s in doc["steps"]] == [STEP_KEYS, STEP_KEYS]
    assert doc["steps"][0] == {
        "name": "extract", "status": "FAILED", "attempts": 2, "output": None,
        "error": {"type": "ValueError", "message": "bad", "reason": "exception",
                  "traceback": "tb"},
        "wall_s": 1.0, "cpu_s": 0.5, "peak_rss_mb": 10.0,
    }
    assert doc["steps"][1]["error"] is None


def test_step_error_json_always_has_exactly_the_four_keys(store: HistoryStore):
    _new_run(store)
    store.finish_step("run-0001", "extract", status="FAILED", attempts=1,
                      error={"type": "X", "message": "m", "extra": 1})
    error = store.get_run("run-0001").to_json()["steps"][0]["error"]
    assert error == {"type": "X", "message": "m", "reason": None, "traceback": None}


def test_run_summary_json(store: HistoryStore):
    _new_run(store, created_at=50.0)
    doc = store.list_runs()[0].to_json()
    assert doc == {"run_id": "run-0001", "job": "demo", "status": "QUEUED",
                   "session_user": "alice", "created_at": 50.0, "ended_at": None,
                   "steps_total": 2, "steps_succeeded": 0}


# --- logs --------------------------------------------------------------------


def test_large_batch_keeps_order_and_content(store: HistoryStore):
    _new_run(store)
    lines = [LogLine("run-0001", 1000.0 + i, ("INFO", "DEBUG")[i % 2],
                     ("log", "stdout", "stderr", "system")[i % 4], f"line {i} ✓",
                     ("extract", None)[i % 2], (1, None)[i % 2]) for i in range(100_000)]
    store.append_logs(lines)
    got = store.logs("run-0001", limit=200_000)
    assert [g.id for g in got] == sorted(g.id for g in got)
    assert len({g.id for g in got}) == len(lines)
    assert [(g.run_id, g.ts, g.level, g.stream, g.message, g.step, g.attempt) for g in got] == [
        (ln.run_id, ln.ts, ln.level, ln.stream, ln.message, ln.step, ln.attempt) for ln in lines]


def test_logs_after_id_returns_only_newer_lines(store: HistoryStore):
    _new_run(store)
    store.append_logs(_lines("run-0001", 5, prefix="old"))
    last = store.logs("run-0001")[-1].id
    store.append_logs(_lines("run-0001", 3, prefix="new"))
    assert [ln.message for ln in store.logs("run-0001", after_id=last)] == ["new0", "new1", "new2"]


def test_logs_limit_pages_through_lines(store: HistoryStore):
    _new_run(store)
    store.append_logs(_lines("run-0001", 25))
    seen, last = [], 0
    while page := store.logs("run-0001", after_id=last, limit=10):
        assert len(page) <= 10
        seen += [ln.message for ln in page]
        last = page[-1].id
    assert seen == [f"m{i}" for i in range(25)]


def test_logs_filter_by_step(store: HistoryStore):
    _new_run(store)
    store.append_logs(_lines("run-0001", 3, prefix="e", step="extract")
                      + _lines("run-0001", 2, prefix="l", step="load"))
    assert [ln.message for ln in store.logs("run-0001", step="load")] == ["l0", "l1"]


def test_logs_of_other_runs_are_not_returned(store: HistoryStore):
    _new_run(store, "run-aaaa")
    _new_run(store, "run-bbbb")
    store.append_logs(_lines("run-aaaa", 2, prefix="a") + _lines("run-bbbb", 2, prefix="b"))
    assert [ln.message for ln in store.logs("run-bbbb")] == ["b0", "b1"]


def test_unknown_log_stream_rejects_the_whole_batch(store: HistoryStore):
    _new_run(store)
    bad = [*_lines("run-0001", 2), LogLine("run-0001", 1.0, "INFO", "stdlog", "x")]
    with pytest.raises(ValueError, match="stdlog"):
        store.append_logs(bad)
    assert store.logs("run-0001") == []


# --- cancellation ------------------------------------------------------------


def test_request_cancel_flags_an_active_run(store: HistoryStore):
    _new_run(store)
    store.start_run("run-0001")
    assert store.request_cancel("run-0001") is True
    assert store.get_run("run-0001").cancel_requested is True


def test_request_cancel_of_queued_run_is_accepted(store: HistoryStore):
    _new_run(store)
    assert store.request_cancel("run-0001") is True


def test_request_cancel_of_finished_run_returns_false(store: HistoryStore):
    _new_run(store)
    store.finish_run("run-0001", "SUCCEEDED")
    assert store.request_cancel("run-0001") is False
    assert store.get_run("run-0001").cancel_requested is False


def test_request_cancel_of_unknown_run_raises(store: HistoryStore):
    with pytest.raises(RunNotFoundError, match="ghost-run"):
        store.request_cancel("ghost-run")


def test_request_cancel_accepts_a_prefix(store: HistoryStore):
    _new_run(store, "3f2a9c71-aaaa")
    assert store.request_cancel("3f2a") is True
    assert store.cancel_requested(["3f2a9c71-aaaa"]) == {"3f2a9c71-aaaa"}


def test_cancel_requested_returns_the_flagged_runs_among_those_asked(store: HistoryStore):
    for rid in ("r-0001", "r-0002", "r-0003"):
        _new_run(store, rid)
    store.request_cancel("r-0001")
    store.request_cancel("r-0003")
    assert store.cancel_requested(["r-0001", "r-0002", "unknown"]) == {"r-0001"}
    assert store.cancel_requested([]) == set()


def test_cancel_from_a_second_store_is_seen_by_the_first(db_path: Path):
    with HistoryStore(db_path) as supervisor, HistoryStore(db_path) as operator:
        _new_run(supervisor)
        supervisor.start_run("run-0001")
        assert supervisor.cancel_requested(["run-0001"]) == set()
        assert operator.request_cancel("run-0001") is True
        assert supervisor.cancel_requested(["run-0001"]) == {"run-0001"}


def test_cancel_from_another_process_is_seen(store: HistoryStore, db_path: Path):
    _new_run(store)
    store.start_run("run-0001")
    proc = _python("""
        import sys
        from liberty.jobs.history import HistoryStore
        with HistoryStore(sys.argv[1]) as s:
            print(s.request_cancel("run-0001"))
    """, str(db_path))
    assert _finish(proc).strip() == "True"
    assert store.cancel_requested(["run-0001"]) == {"run-0001"}


# --- reading runs --------------------------------------------------------------


def test_unknown_run_error_names_it_and_suggests_runs(store: HistoryStore):
    with pytest.raises(RunNotFoundError) as info:
        store.get_run("deadbeef")
    assert "deadbeef" in str(info.value)
    assert "nomaflow runs" in str(info.value)


def test_get_run_accepts_a_unique_prefix(store: HistoryStore):
    _new_run(store, "3f2a9c71-aaaa")
    _new_run(store, "3f2b0000-bbbb")
    assert store.get_run("3f2a9").run_id == "3f2a9c71-aaaa"
    assert store.resolve_run_id("3f2b") == "3f2b0000-bbbb"


def test_ambiguous_prefix_is_an_error_saying_so(store: HistoryStore):
    _new_run(store, "3f2a9c71-aaaa")
    _new_run(store, "3f2a0000-bbbb")
    with pytest.raises(RunNotFoundError, match="ambiguous") as info:
        store.get_run("3f2a")
    assert "3f2a9c71-aaaa" in str(info.value) and "3f2a0000-bbbb" in str(info.value)


def test_prefix_shorter_than_four_characters_is_rejected(store: HistoryStore):
    _new_run(store, "3f2a9c71-aaaa")
    with pytest.raises(RunNotFoundError, match="at least 4"):
        store.get_run("3f2")


def test_exact_id_wins_over_longer_ids_sharing_it_as_prefix(store: HistoryStore):
    _new_run(store, "run-1")
    _new_run(store, "run-10")
    assert store.get_run("run-1").run_id == "run-1"


def test_list_runs_is_newest_first_with_step_counts(store: HistoryStore):
    _new_run(store, "r-old", created_at=10.0)
    _new_run(store, "r-new", created_at=30.0)
    _new_run(store, "r-mid", created_at=20.0)
    store.finish_step("r-mid", "extract", status="SUCCEEDED", attempts=1)
    runs = store.list_runs()
    assert [r.run_id for r in runs] == ["r-new", "r-mid", "r-old"]
    assert [(r.steps_total, r.steps_succeeded) for r in runs] == [(2, 0), (2, 1), (2, 0)]


def test_list_runs_honours_limit(store: HistoryStore):
    for i in range(5):
        _new_run(store, f"r-{i:04d}", created_at=float(i))
    assert [r.run_id for r in store.list_runs(limit=2)] == ["r-0004", "r-0003"]


def test_list_runs_filters_by_job(store: HistoryStore):
    _new_run(store, "r-0001", job="a")
    _new_run(store, "r-0002", job="b")
    _new_run(store, "r-0003", job="a")
    assert {r.run_id for r in store.list_runs(job="a")} == {"r-0001", "r-0003"}


# --- supervisor loss ---------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_runs_of_dead_supervisors_are_the_unfinished_ones_of_dead_pids(store: HistoryStore):
    dead = _dead_pid()
    _new_run(store, "r-dead-queued", pid=dead)
    _new_run(store, "r-dead-running", pid=dead)
    store.start_run("r-dead-running")
    _new_run(store, "r-dead-done", pid=dead)
    store.finish_run("r-dead-done", "SUCCEEDED")
    _new_run(store, "r-alive", pid=os.getpid())
    lost = store.runs_of_dead_supervisors(psutil.pid_exists)
    assert sorted(lost) == ["r-dead-queued", "r-dead-running"]


def test_mark_lost_fails_the_run_and_its_running_step(store: HistoryStore):
    _new_run(store, steps=("a", "b", "c"))
    store.start_run("run-0001")
    store.finish_step("run-0001", "a", status="SUCCEEDED", attempts=1, output={"ok": True})
    store.start_step("run-0001", "b")
    store.record_attempt(_attempt("run-0001", "b", 1))
    store.mark_lost(["run-0001"], message="supervisor pid 4242 is gone")
    run = store.get_run("run-0001")
    assert run.status == "FAILED" and run.ended_at is not None
    a, b, c = run.steps
    assert (a.status, a.output) == ("SUCCEEDED", {"ok": True})
    assert b.status == "FAILED"
    assert b.error == {"type": "SupervisorLost", "message": "supervisor pid 4242 is gone",
                       "reason": "lost", "traceback": None}
    assert b.attempts == 2  # the recorded one plus the one in flight
    assert c.status == "SKIPPED"


def test_mark_lost_leaves_a_system_log_line(store: HistoryStore):
    _new_run(store)
    store.mark_lost(["run-0001"], message="supervisor gone")
    (line,) = store.logs("run-0001")
    assert (line.stream, line.level) == ("system", "ERROR")
    assert "supervisor gone" in line.message


def test_mark_lost_leaves_finished_runs_alone(store: HistoryStore):
    _new_run(store)
    store.finish_step("run-0001", "extract", status="SUCCEEDED", attempts=1)
    store.finish_run("run-0001", "SUCCEEDED", ended_at=3.0)
    before = store.get_run("run-0001")
    store.mark_lost(["run-0001"], message="late")
    assert store.get_run("run-0001") == before
    assert store.logs("run-0001") == []


# --- concurrency -------------------------------------------------------------

_WRITER = """
    import sys, time
    from liberty.jobs.history import HistoryStore, LogLine
    path, run_id, tag, batches, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    with HistoryStore(path) as s:
        for b in range(batches):
            s.append_logs([LogLine(run_id, time.time(), "INFO", "stdout", f"{tag}:{b}:{i}")
                           for i in range(size)])
            time.sleep(0.002)
"""


def test_follower_sees_every_line_of_a_writing_process_once_in_order(
        store: HistoryStore, db_path: Path):
    _new_run(store)
    batches, size = 150, 200
    expected = [f"w:{b}:{i}" for b in range(batches) for i in range(size)]
    writer = _python(_WRITER, str(db_path), "run-0001", "w", str(batches), str(size))
    seen: list[str] = []
    last, polls_while_writing = 0, 0
    deadline = time.monotonic() + 90
    while len(seen) < len(expected) and time.monotonic() < deadline:
        running = writer.poll() is None
        page = store.logs("run-0001", after_id=last, limit=333)
        if page:
            assert page[0].id > last
            polls_while_writing += running
            seen += [ln.message for ln in page]
            last = page[-1].id
        elif not running:
            break
    _finish(writer)
    seen += [ln.message for ln in store.logs("run-0001", after_id=last, limit=10**6)]
    assert seen == expected
    assert polls_while_writing > 1, "the reader never overlapped the writer"


def test_two_writing_processes_both_get_their_lines_in(store: HistoryStore, db_path: Path):
    _new_run(store)
    writers = [_python(_WRITER, str(db_path), "run-0001", tag, "100", "300") for tag in "ab"]
    for w in writers:
        _finish(w, timeout=90)
    messages = [ln.message for ln in store.logs("run-0001", limit=10**6)]
    for tag in "ab":
        mine = [m for m in messages if m.startswith(f"{tag}:")]
        assert mine == [f"{tag}:{b}:{i}" for b in range(100) for i in range(300)]


def test_threads_can_share_one_store(store: HistoryStore):
    _new_run(store)
    errors: list[BaseException] = []
    stop = threading.Event()

    def write(tag: str) -> None:
        for b in range(50):
            store.append_logs([LogLine("run-0001", 1.0, "INFO", "log", f"{tag}:{b}:{i}")
                               for i in range(50)])

    def read() -> None:
        try:
            while not stop.is_set():
                store.get_run("run-0001")
                store.cancel_requested(["run-0001"])
                store.logs("run-0001", limit=100)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    with ThreadPoolExecutor(6) as pool:
        readers = [pool.submit(read) for _ in range(2)]
        for f in [pool.submit(write, tag) for tag in "abcd"]:
            f.result(timeout=60)
        stop.set()
        for f in readers:
            f.result(timeout=60)
    assert errors == []
    assert len(store.logs("run-0001", limit=10**6)) == 4 * 50 * 50


def test_run_view_is_a_frozen_snapshot(store: HistoryStore):
    _new_run(store)
    view = store.get_run("run-0001")
    store.start_run("run-0001")
    assert isinstance(view, RunView) and view.status == "QUEUED"


# --- writes made at once (the supervisor's event loop) -------------------------


def test_write_now_makes_the_writes_and_returns_the_last_result(store: HistoryStore):
    def work() -> RunView:
        _new_run(store)
        store.start_run("run-0001")
        return store.get_run("run-0001")

    view = store.write_now(work)
    assert isinstance(view, RunView) and view.status == "RUNNING"
    assert store.get_run("run-0001").status == "RUNNING"


def test_write_now_declines_without_calling_work_while_another_connection_writes(store: HistoryStore, db_path: Path):
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    called: list[bool] = []
    try:
        t0 = time.monotonic()
        assert store.write_now(lambda: called.append(True)) is NOT_NOW
        assert time.monotonic() - t0 < 1.0  # no busy wait (the thread path waits up to 10 s)
    finally:
        other.execute("COMMIT")
        other.close()
    assert called == []
    assert store._conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 5000  # the thread path still waits
    _new_run(store)  # and the store is usable as ever


def test_write_now_declines_while_another_thread_holds_the_store(store: HistoryStore):
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store._write():
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(10)
        assert store.write_now(lambda: _new_run(store)) is NOT_NOW
    finally:
        release.set()
        thread.join()
    assert store.list_runs() == []


def test_an_error_in_write_now_undoes_all_of_its_writes(store: HistoryStore):
    def work() -> None:
        _new_run(store, "run-0001")
        _new_run(store, "run-0001")  # taken: UsageError

    with pytest.raises(UsageError, match="already exists"):
        store.write_now(work)
    assert store.list_runs() == []
    _new_run(store, "run-0002")  # no transaction was left open


def test_writes_at_once_wait_for_a_checkpoint_which_then_fills_the_database_file(store: HistoryStore, db_path: Path):
    for i in range(CHECKPOINT_EVERY):
        assert store.write_now(lambda: _new_run(store, f"run-{i:04d}")) is not NOT_NOW
    assert store.checkpoint_due
    before = db_path.stat().st_size  # no checkpoint yet: the rows are only in the write-ahead log
    store.checkpoint()
    assert not store.checkpoint_due
    assert db_path.stat().st_size > before
    with HistoryStore(db_path) as other:
        assert len(other.list_runs(limit=1000)) == CHECKPOINT_EVERY


def test_writes_on_threads_checkpoint_by_themselves(store: HistoryStore, db_path: Path):
    before = db_path.stat().st_size
    for i in range(CHECKPOINT_EVERY):
        _new_run(store, f"run-{i:04d}")
    assert not store.checkpoint_due
    assert db_path.stat().st_size > before
