"""SQLite through the stdlib driver, on worker threads.

Connections run in autocommit mode (`isolation_level=None`) and transactions
are explicit BEGIN/COMMIT, so a statement outside `transaction()` is durable
when it returns, as on PostgreSQL.  `:memory:` is one connection shared by
every step for the registry's lifetime: a stream or transaction holds it, and
other calls wait for it (bounded by the call timeout).
"""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

from ._sql import Row, SqlBackend, single_mapping
from .config import SqliteConfig


class SqliteBackend(SqlBackend):
    def __init__(self, config: SqliteConfig) -> None:
        self.config = config
        self._memory = config.path == ":memory:"
        super().__init__(config.name, pool_max=1 if self._memory else config.pool_max)
        self._guard = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._all: list[sqlite3.Connection] = []

    def _get(self) -> sqlite3.Connection:
        with self._guard:
            if self._idle:
                return self._idle.pop()
        conn = sqlite3.connect(
            self.config.path,
            timeout=self.config.timeout_seconds,
            isolation_level=None,
            check_same_thread=False,
        )
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

    def op_fetch_batch(self, conn: sqlite3.Connection, cursor: sqlite3.Cursor, size: int) -> list[Row]:
        return _dicts(cursor, cursor.fetchmany(size))

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
