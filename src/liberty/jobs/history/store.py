"""The run history: runs, steps, attempts and logs in one SQLite file.

Synchronous on purpose: the trio supervisor calls it through `trio.to_thread`,
or on its event loop through `write_now` when that cannot wait, and the CLI
(`logs --follow`, `cancel`) uses it from other processes at the same time.
WAL mode lets those readers run alongside the writer; every write takes the
database lock up front (BEGIN IMMEDIATE) so a second writer waits out the busy
timeout instead of failing half-way through a transaction.

The write-ahead log is copied back into the database (a checkpoint, which
syncs the file to disk) by this store itself, every `CHECKPOINT_EVERY` commits,
and only where blocking is allowed: never inside `write_now`, whose caller
runs `checkpoint()` on a worker thread once `checkpoint_due` says so.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import chain
from operator import attrgetter
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from .._notnow import NOT_NOW
from ..errors import ConfigError, RunNotFoundError, UsageError
from ..types import FINAL_STATUSES, Reason, Status
from .records import LOG_STREAMS, AttemptRecord, LogLine, RunSummary, RunView, StepView
from .schema import ensure_schema

BUSY_TIMEOUT_S = 10.0
CHECKPOINT_EVERY = 200  # commits; SQLite's own default (1,000 log pages) is a few hundred runs
MIN_PREFIX_LEN = 4
_T = TypeVar("_T")
_ACTIVE = (Status.QUEUED.value, Status.RUNNING.value)
_RUN_FINAL = frozenset(FINAL_STATUSES - {Status.SKIPPED})


class HistoryStore:
    """One connection, shared by the threads of one process under a lock."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread inside `write_now`'s transaction
        self._commits = 0  # since the last checkpoint
        self._conn = self._open()

    # --- lifecycle ------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        in_memory = self.path == ":memory:"
        try:
            if not in_memory:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the history database: {exc}", file=self.path) from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            if not in_memory:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("PRAGMA wal_autocheckpoint = 0")  # see the module's docstring
            ensure_schema(conn, self.path)
        except sqlite3.Error as exc:
            conn.close()
            raise ConfigError(
                f"cannot use the history database ({exc}); is it a nomaflow history file?",
                file=self.path,
            ) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def write_now(self, work: Callable[[], _T]) -> _T:
        """`work` (calls of this store) in one transaction, if it can be made without waiting;
        otherwise `NOT_NOW`, and `work` was not called.

        For a caller on an event loop, to whom a hop to a worker thread costs more
        than a run's few rows: it waits neither for another thread of this process
        (the store's lock is taken only if free) nor for another process (no busy
        wait for the database's write lock), and never checkpoints.  `work` itself
        must be short.  Its errors are raised as on a thread, with nothing written.
        """
        if not self._lock.acquire(blocking=False):
            return NOT_NOW  # type: ignore[no-any-return]
        conn = self._conn
        try:
            conn.execute("PRAGMA busy_timeout = 0")
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:
                return NOT_NOW  # type: ignore[no-any-return]  # held by another connection: its thread will wait for it
            finally:
                conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            self._owner = threading.get_ident()
            try:
                result = work()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                self._owner = None
            self._commits += 1
            return result
        finally:
            self._lock.release()

    @property
    def checkpoint_due(self) -> bool:
        """`write_now` has committed enough since the last checkpoint: run `checkpoint()` on a thread."""
        return self._commits >= CHECKPOINT_EVERY

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the database file, so it does not grow without end.

        PASSIVE: it copies what no reader still needs and never waits for one.
        Blocking (it syncs the file): call it where waiting is allowed.
        """
        with self._lock:
            self._checkpoint()

    def _checkpoint(self) -> None:
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        self._commits = 0

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self._owner == threading.get_ident():  # inside `write_now`'s transaction
            yield self._conn
            return
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            self._commits += 1
            if self._commits >= CHECKPOINT_EVERY:
                self._checkpoint()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction, so multi-query views come from one snapshot."""
        if self._owner == threading.get_ident():  # inside `write_now`'s transaction
            yield self._conn
            return
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    # --- runs -----------------------------------------------------------

    def create_run(
        self,
        run_id: str,
        job: str,
        *,
        session_user: str,
        params: dict[str, Any],
        steps: list[str],
        supervisor_pid: int,
        created_at: float | None = None,
        started: bool = False,
    ) -> None:
        """Record a new run, QUEUED; `started`: RUNNING with its first step at once (one write, not three)."""
        if len(set(steps)) != len(steps):
            raise UsageError(f"run {run_id!r}: step names must be unique, got {steps!r}")
        now = _now(created_at)
        running = Status.RUNNING.value
        with self._write() as conn:
            try:
                conn.execute(
                    "INSERT INTO runs (run_id, job, status, session_user, params, created_at,"
                    " supervisor_pid, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        run_id,
                        job,
                        running if started else Status.QUEUED.value,
                        session_user,
                        json.dumps(params),
                        now,
                        supervisor_pid,
                        now if started else None,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise UsageError(f"run {run_id!r} already exists in the history") from exc
            conn.executemany(
                "INSERT INTO steps (run_id, name, idx, status, started_at) VALUES (?, ?, ?, ?, ?)",
                [
                    (run_id, name, index, *((running, now) if started and index == 0 else (Status.QUEUED.value, None)))
                    for index, name in enumerate(steps)
                ],
            )

    def start_run(self, run_id: str, *, started_at: float | None = None) -> None:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE runs SET status = ?, started_at = ? WHERE run_id = ?",
                (Status.RUNNING.value, _now(started_at), run_id),
            )
            _require_run(cur, run_id)

    def finish_run(self, run_id: str, status: str, *, ended_at: float | None = None) -> None:
        status = _status(status, _RUN_FINAL, "a run")
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE runs SET status = ?, ended_at = ? WHERE run_id = ?",
                (status, _now(ended_at), run_id),
            )
            _require_run(cur, run_id)

    def request_cancel(self, run_id: str) -> bool:
        """Flag a run for the supervisor to cancel; False when it has already finished.

        Accepts a unique prefix, like `get_run`, since operators type short ids.
        """
        with self._write() as conn:
            full_id = _resolve(conn, run_id)
            cur = conn.execute(
                "UPDATE runs SET cancel_requested = 1 WHERE run_id = ? AND status IN (?, ?)",
                (full_id, *_ACTIVE),
            )
            return cur.rowcount == 1

    def cancel_requested(self, run_ids: Iterable[str]) -> set[str]:
        """Which of these runs an operator asked to cancel: one indexed query, polled often."""
        ids = list(run_ids)
        if not ids:
            return set()
        with self._lock:
            rows = self._conn.execute(
                "SELECT run_id FROM runs WHERE cancel_requested = 1"
                " AND run_id IN (SELECT value FROM json_each(?))",
                (json.dumps(ids),),
            ).fetchall()
        return {row[0] for row in rows}

    # --- steps and attempts ---------------------------------------------

    def start_step(self, run_id: str, step: str, *, started_at: float | None = None) -> None:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE steps SET status = ?, started_at = ? WHERE run_id = ? AND name = ?",
                (Status.RUNNING.value, _now(started_at), run_id, step),
            )
            _require_step(conn, cur, run_id, step)

    def finish_step(
        self,
        run_id: str,
        step: str,
        *,
        status: str,
        attempts: int,
        output: Any = None,
        error: dict[str, Any] | None = None,
        wall_s: float = 0.0,
        cpu_s: float = 0.0,
        peak_rss_mb: float = 0.0,
        ended_at: float | None = None,
    ) -> None:
        status = _status(status, FINAL_STATUSES, "a step")
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE steps SET status = ?, attempts = ?, output = ?, error = ?, wall_s = ?,"
                " cpu_s = ?, peak_rss_mb = ?, ended_at = ? WHERE run_id = ? AND name = ?",
                (
                    status,
                    attempts,
                    _dump(output),
                    _dump(error),
                    wall_s,
                    cpu_s,
                    peak_rss_mb,
                    _now(ended_at),
                    run_id,
                    step,
                ),
            )
            _require_step(conn, cur, run_id, step)

    def skip_steps(self, run_id: str, steps: list[str]) -> None:
        with self._write() as conn:
            for step in steps:
                cur = conn.execute(
                    "UPDATE steps SET status = ? WHERE run_id = ? AND name = ?",
                    (Status.SKIPPED.value, run_id, step),
                )
                _require_step(conn, cur, run_id, step)

    def record_attempt(self, rec: AttemptRecord) -> None:
        with self._write() as conn:
            exists = conn.execute(
                "SELECT 1 FROM steps WHERE run_id = ? AND name = ?", (rec.run_id, rec.step)
            ).fetchone()
            if exists is None:
                _raise_missing_step(conn, rec.run_id, rec.step)
            try:
                conn.execute(
                    "INSERT INTO attempts (run_id, step, attempt, status, reason, output, error,"
                    " started_at, ended_at, wall_s, cpu_s, peak_rss_mb, exit_code, usage)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        rec.run_id,
                        rec.step,
                        rec.attempt,
                        rec.status,
                        rec.reason,
                        _dump(rec.output),
                        _dump(rec.error),
                        rec.started_at,
                        rec.ended_at,
                        rec.wall_s,
                        rec.cpu_s,
                        rec.peak_rss_mb,
                        rec.exit_code,
                        json.dumps(rec.usage),
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise UsageError(
                    f"run {rec.run_id!r} step {rec.step!r}: attempt {rec.attempt} is already recorded"
                ) from exc

    # --- logs -----------------------------------------------------------

    def append_logs(self, lines: list[LogLine]) -> None:
        """Store a batch in one transaction; ids follow list order and are assigned here."""
        self.append_log_rows(list(map(log_row, lines)))

    def append_log_rows(self, rows: list[LogRow]) -> None:
        """`append_logs` for rows in LogLine's field order (`log_row`): the supervisor's path, no object per line."""
        if not rows:
            return
        if any(len(row) != _LOG_WIDTH for row in rows):
            raise ValueError(f"a log row has {_LOG_WIDTH} fields ({', '.join(_LOG_COLUMNS)})")
        unknown = {row[3] for row in rows} - LOG_STREAMS
        if unknown:
            raise ValueError(
                f"unknown log stream(s) {sorted(unknown)!r}; expected one of {sorted(LOG_STREAMS)!r}"
            )
        whole = len(rows) - len(rows) % _LOG_CHUNK
        values = list(chain.from_iterable(rows[:whole]))
        step = _LOG_CHUNK * _LOG_WIDTH
        with self._write() as conn:
            # Many rows per statement: executemany steps, and gives up the GIL, once per row.
            for start in range(0, len(values), step):
                conn.execute(_INSERT_LOG_CHUNK, values[start : start + step])
            conn.executemany(_INSERT_LOG_ROW, rows[whole:])

    def logs(
        self, run_id: str, *, after_id: int = 0, limit: int = 10000, step: str | None = None
    ) -> list[LogLine]:
        """Lines with id > after_id in id order; an unknown run simply has no lines.

        Ids are handed out in commit order, so a follower that passes the last
        id it saw gets every line exactly once.
        """
        sql = (
            "SELECT run_id, ts, level, stream, message, step, attempt, id FROM logs"
            " WHERE run_id = ? AND id > ?"
        )
        args: list[Any] = [run_id, after_id]
        if step is not None:
            sql += " AND step = ?"
            args.append(step)
        sql += " ORDER BY id LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        return [LogLine(*row) for row in rows]

    # --- reading runs ---------------------------------------------------

    def resolve_run_id(self, run_id: str) -> str:
        """The full id for an exact id or a unique prefix of at least 4 characters."""
        with self._lock:
            return _resolve(self._conn, run_id)

    def get_run(self, run_id: str) -> RunView:
        with self._read() as conn:
            full_id = _resolve(conn, run_id)
            run = conn.execute(
                "SELECT run_id, job, status, session_user, params, created_at, started_at,"
                " ended_at, supervisor_pid, cancel_requested FROM runs WHERE run_id = ?",
                (full_id,),
            ).fetchone()
            step_rows = conn.execute(
                "SELECT name, idx, status, attempts, output, error, wall_s, cpu_s, peak_rss_mb,"
                " started_at, ended_at FROM steps WHERE run_id = ? ORDER BY idx",
                (full_id,),
            ).fetchall()
            attempt_rows = conn.execute(
                "SELECT run_id, step, attempt, status, reason, output, error, started_at,"
                " ended_at, wall_s, cpu_s, peak_rss_mb, exit_code, usage FROM attempts"
                " WHERE run_id = ? ORDER BY step, attempt",
                (full_id,),
            ).fetchall()
        by_step: dict[str, list[AttemptRecord]] = {}
        for row in attempt_rows:
            by_step.setdefault(row[1], []).append(_attempt(row))
        steps = [
            StepView(
                name=name,
                index=idx,
                status=status,
                attempts=attempts,
                output=_load(output),
                error=_load(error),
                wall_s=wall_s,
                cpu_s=cpu_s,
                peak_rss_mb=peak_rss_mb,
                started_at=started_at,
                ended_at=ended_at,
                attempt_records=by_step.get(name, []),
            )
            for (name, idx, status, attempts, output, error, wall_s, cpu_s, peak_rss_mb,
                 started_at, ended_at) in step_rows
        ]
        return RunView(
            run_id=run[0],
            job=run[1],
            status=run[2],
            session_user=run[3],
            params=json.loads(run[4]),
            created_at=run[5],
            started_at=run[6],
            ended_at=run[7],
            supervisor_pid=run[8],
            cancel_requested=bool(run[9]),
            steps=steps,
        )

    def list_runs(self, *, limit: int = 50, job: str | None = None) -> list[RunSummary]:
        """Newest first; ties (same created_at) broken by insertion order, newest first."""
        sql = (
            "SELECT r.run_id, r.job, r.status, r.session_user, r.created_at, r.ended_at,"
            " (SELECT count(*) FROM steps s WHERE s.run_id = r.run_id),"
            " (SELECT count(*) FROM steps s WHERE s.run_id = r.run_id AND s.status = ?)"
            " FROM runs r"
        )
        args: list[Any] = [Status.SUCCEEDED.value]
        if job is not None:
            sql += " WHERE r.job = ?"
            args.append(job)
        sql += " ORDER BY r.created_at DESC, r.rowid DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        return [RunSummary(*row) for row in rows]

    # --- recovery -------------------------------------------------------

    def runs_of_dead_supervisors(self, alive: Callable[[int], bool]) -> list[str]:
        """Unfinished runs whose supervisor process is gone (checked once per pid)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT run_id, supervisor_pid FROM runs WHERE status IN (?, ?)"
                " ORDER BY created_at, rowid",
                _ACTIVE,
            ).fetchall()
        verdicts: dict[int, bool] = {}
        lost = []
        for run_id, pid in rows:
            if pid not in verdicts:
                verdicts[pid] = alive(pid)
            if not verdicts[pid]:
                lost.append(run_id)
        return lost

    def mark_lost(self, run_ids: Iterable[str], *, message: str) -> None:
        """Close out runs nobody is driving any more, so they stop looking alive.

        The running step counts the attempt that was in flight; a `system` log
        line tells whoever reads the log later why the run stopped.
        """
        now = time.time()
        error = json.dumps(
            {"type": "SupervisorLost", "message": message, "reason": Reason.LOST.value,
             "traceback": None}
        )
        with self._write() as conn:
            for run_id in run_ids:
                cur = conn.execute(
                    "UPDATE runs SET status = ?, ended_at = ? WHERE run_id = ? AND status IN (?, ?)",
                    (Status.FAILED.value, now, run_id, *_ACTIVE),
                )
                if cur.rowcount == 0:
                    continue
                conn.execute(
                    "UPDATE steps SET status = ?, error = ?, ended_at = ?,"
                    " attempts = 1 + (SELECT count(*) FROM attempts a"
                    "                 WHERE a.run_id = steps.run_id AND a.step = steps.name)"
                    " WHERE run_id = ? AND status = ?",
                    (Status.FAILED.value, error, now, run_id, Status.RUNNING.value),
                )
                conn.execute(
                    "UPDATE steps SET status = ? WHERE run_id = ? AND status = ?",
                    (Status.SKIPPED.value, run_id, Status.QUEUED.value),
                )
                conn.execute(
                    "INSERT INTO logs (run_id, ts, level, stream, message) VALUES (?, ?, ?, ?, ?)",
                    (run_id, now, "ERROR", "system", f"run marked FAILED (lost): {message}"),
                )


LogRow = tuple[str, float, str, str, str, str | None, int | None]
"""A log line as stored: (run_id, ts, level, stream, message, step, attempt)."""

_LOG_COLUMNS = ("run_id", "ts", "level", "stream", "message", "step", "attempt")
_LOG_WIDTH = len(_LOG_COLUMNS)
_LOG_CHUNK = 128  # rows per multi-row INSERT: 896 parameters, under even old SQLite builds' cap of 999
log_row: Callable[[LogLine], LogRow] = attrgetter(*_LOG_COLUMNS)
_INSERT_LOG = f"INSERT INTO logs ({', '.join(_LOG_COLUMNS)}) VALUES "
_LOG_PLACEHOLDERS = "(" + ", ".join("?" * _LOG_WIDTH) + ")"
_INSERT_LOG_ROW = _INSERT_LOG + _LOG_PLACEHOLDERS
_INSERT_LOG_CHUNK = _INSERT_LOG + ", ".join([_LOG_PLACEHOLDERS] * _LOG_CHUNK)


def _now(ts: float | None) -> float:
    return time.time() if ts is None else ts


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _status(status: str, allowed: frozenset[Status], what: str) -> str:
    if status not in allowed:
        raise ValueError(
            f"{status!r} is not a final status for {what}; expected one of {sorted(allowed)!r}"
        )
    return Status(status).value


def _attempt(row: tuple[Any, ...]) -> AttemptRecord:
    (run_id, step, attempt, status, reason, output, error, started_at, ended_at, wall_s, cpu_s,
     peak_rss_mb, exit_code, usage) = row
    return AttemptRecord(
        run_id=run_id,
        step=step,
        attempt=attempt,
        status=status,
        reason=reason,
        output=_load(output),
        error=_load(error),
        started_at=started_at,
        ended_at=ended_at,
        wall_s=wall_s,
        cpu_s=cpu_s,
        peak_rss_mb=peak_rss_mb,
        exit_code=exit_code,
        usage=json.loads(usage),
    )


def _not_found(run_id: str) -> RunNotFoundError:
    return RunNotFoundError(f"no run {run_id!r} in the history; `nomaflow runs` lists run ids")


def _require_run(cur: sqlite3.Cursor, run_id: str) -> None:
    if cur.rowcount == 0:
        raise _not_found(run_id)


def _require_step(conn: sqlite3.Connection, cur: sqlite3.Cursor, run_id: str, step: str) -> None:
    if cur.rowcount == 0:
        _raise_missing_step(conn, run_id, step)


def _raise_missing_step(conn: sqlite3.Connection, run_id: str, step: str) -> None:
    if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
        raise _not_found(run_id)
    names = [r[0] for r in conn.execute(
        "SELECT name FROM steps WHERE run_id = ? ORDER BY idx", (run_id,)
    )]
    raise UsageError(f"run {run_id!r} has no step {step!r}; its steps are {names!r}")


def _resolve(conn: sqlite3.Connection, run_id: str) -> str:
    if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone():
        return run_id
    if len(run_id) < MIN_PREFIX_LEN:
        raise RunNotFoundError(
            f"no run {run_id!r} in the history (a run id prefix needs at least "
            f"{MIN_PREFIX_LEN} characters); `nomaflow runs` lists run ids"
        )
    # A range scan on the primary key: every id starting with the prefix sorts in it.
    matches = [r[0] for r in conn.execute(
        "SELECT run_id FROM runs WHERE run_id >= ? AND run_id < ? ORDER BY run_id LIMIT 6",
        (run_id, run_id + "\U0010ffff"),
    )]
    if not matches:
        raise _not_found(run_id)
    if len(matches) > 1:
        shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise RunNotFoundError(
            f"run id prefix {run_id!r} is ambiguous: it matches {shown}; type more characters"
        )
    return matches[0]
