"""SQLite through the stdlib driver, on worker threads.

Connections run in autocommit mode (`isolation_level=None`) and transactions
are explicit BEGIN/COMMIT, so a statement outside `transaction()` is durable
when it returns, as on PostgreSQL.  `:memory:` is one connection shared by
every step for the registry's lifetime: a stream or transaction holds it, and
other calls wait for it (bounded by the call timeout).

`:memory:` has no I/O and no locks to wait for, so a single statement outside
a transaction first runs inline on the event loop (`run_now`, from the
session's `call_now`) under a small CPU budget (a progress handler); past the
budget SQLite aborts it, which undoes it entirely in autocommit mode, and it is
re-run on a worker thread.  This saves the thread hop that would otherwise
dominate a `scalar("SELECT 1")`.  A connection that ever ATTACHes a file
database loses the fast path.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from .._notnow import NOT_NOW
from ._sql import Batch, Row, SqlBackend, single_mapping
from .config import SqliteConfig

T = TypeVar("T")
INLINE_BUDGET_SECONDS = 0.002


class SqliteBackend(SqlBackend):
    # SQLite's storage classes, as the stdlib driver returns them without `detect_types`.
    value_types = frozenset({type(None), int, float, str, bytes})
    # Small enough that a chunk's tuples never set off the garbage collector (700 new objects).
    fetch_chunk = 256

    def __init__(self, config: SqliteConfig) -> None:
        self.config = config
        self._memory = config.path == ":memory:"
        super().__init__(config.name, pool_max=1 if self._memory else config.pool_max)
        self._guard = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._all: list[sqlite3.Connection] = []
        self._attached = False
        self._inline = False
        self._inline_ops = {self.op_execute, self.op_scalar, self.op_fetch, self.op_fetchrow}

    def run_now(self, op: Callable[..., T], *args: Any) -> Any:
        if self._memory and not self._attached and op in self._inline_ops:
            return self._run_inline(op, args)
        return NOT_NOW

    def _run_inline(self, op: Callable[..., T], args: tuple[Any, ...]) -> Any:
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            return NOT_NOW  # a transaction or stream holds the connection
        try:
            conn = self._get()
            try:
                if conn.in_transaction:
                    return NOT_NOW
                deadline = time.perf_counter() + INLINE_BUDGET_SECONDS
                over: list[bool] = []

                def out_of_budget() -> bool:
                    if time.perf_counter() > deadline:
                        over.append(True)
                        return True
                    return False

                conn.set_progress_handler(out_of_budget, 1000)
                self._inline = True
                try:
                    return op(conn, *args)
                except sqlite3.DatabaseError:
                    if over or self._attached:
                        return NOT_NOW
                    raise
                finally:
                    self._inline = False
                    conn.set_progress_handler(None, 0)
            finally:
                self._put(conn)
        finally:
            self._slots.release()

    def _authorize(self, action: int, *_: Any) -> int:
        if action == sqlite3.SQLITE_ATTACH:
            self._attached = True
            if self._inline:
                return sqlite3.SQLITE_DENY  # refused inline only; the thread re-run is allowed
        return sqlite3.SQLITE_OK

    def _get(self) -> sqlite3.Connection:
        with self._guard:
            if self._idle:
                return self._idle.pop()
        if not self._memory:
            Path(self.config.path).parent.mkdir(parents=True, exist_ok=True)  # as the history store does
        conn = sqlite3.connect(
            self.config.path,
            timeout=self.config.timeout_seconds,
            isolation_level=None,
            check_same_thread=False,
        )
        if self._memory:
            conn.set_authorizer(self._authorize)
        with self._guard:
            self._all.append(conn)
        return conn

    def _put(self, conn: sqlite3.Connection) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            with self._guard:
                self._all.remove(conn)
            conn.close()
            return
        with self._guard:
            self._idle.append(conn)

    def _interrupt(self, conn: sqlite3.Connection) -> None:
        conn.interrupt()

    def _close_all(self) -> None:
        with self._guard:
            conns, self._all, self._idle = self._all, [], []
        for conn in conns:
            conn.close()

    # --- ops ------------------------------------------------------------------

    def op_execute(self, conn: sqlite3.Connection, sql: str, params: list[Any], in_tx: bool) -> int:
        cur = conn.execute(sql, _params(params))
        try:
            return cur.rowcount
        finally:
            cur.close()

    def op_executemany(self, conn: sqlite3.Connection, sql: str, rows: list[Any], in_tx: bool) -> int:
        if in_tx:
            return _executemany(conn, sql, rows)
        conn.execute("BEGIN")
        try:
            count = _executemany(conn, sql, rows)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return count

    def op_fetch(self, conn: sqlite3.Connection, sql: str, params: list[Any], in_tx: bool) -> list[Row]:
        cur = conn.execute(sql, _params(params))
        try:
            return _dicts(cur, cur.fetchall())
        finally:
            cur.close()

    def op_fetchrow(self, conn: sqlite3.Connection, sql: str, params: list[Any], in_tx: bool) -> Row | None:
        cur = conn.execute(sql, _params(params))
        try:
            row = cur.fetchone()
            return None if row is None else _dicts(cur, [row])[0]
        finally:
            cur.close()

    def op_scalar(self, conn: sqlite3.Connection, sql: str, params: list[Any], in_tx: bool) -> Any:
        cur = conn.execute(sql, _params(params))
        try:
            row = cur.fetchone()
            return None if row is None else row[0]
        finally:
            cur.close()

    def op_begin(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN")

    def op_commit(self, conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    def op_rollback(self, conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")

    def op_open_cursor(self, conn: sqlite3.Connection, sql: str, params: list[Any], in_tx: bool, name: str) -> Any:
        return conn.execute(sql, _params(params))

    def op_fetch_batch(self, conn: sqlite3.Connection, cursor: sqlite3.Cursor, size: int) -> Batch:
        rows = cursor.fetchmany(size)
        return [d[0] for d in cursor.description or ()], rows

    def op_close_cursor(self, conn: sqlite3.Connection, cursor: sqlite3.Cursor, in_tx: bool) -> None:
        cursor.close()


def _params(params: list[Any]) -> Any:
    named = single_mapping(params)
    return named if named is not None else tuple(params)


def _executemany(conn: sqlite3.Connection, sql: str, rows: list[Any]) -> int:
    cur = conn.executemany(sql, rows)
    try:
        return cur.rowcount
    finally:
        cur.close()


def _dicts(cur: sqlite3.Cursor, rows: list[Any]) -> list[Row]:
    if cur.description is None:
        return []
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in rows]
