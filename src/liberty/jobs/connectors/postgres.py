"""PostgreSQL through psycopg 3's synchronous pool, driven from trio on worker threads.

psycopg's async API needs asyncio, so the supervisor (trio) uses the sync
`ConnectionPool` instead: one per connector, shared by every step.
Connections stay in autocommit mode; transactions and the transaction a
server-side cursor needs are explicit BEGIN/COMMIT.  A returned connection is
rolled back if needed and `DISCARD ALL`-ed, so one step's session settings
never leak into the next step.
"""

from __future__ import annotations

from typing import Any

import psycopg
import trio
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from ._sql import Batch, Row, SqlBackend, single_mapping
from .config import PostgresConfig


class PostgresBackend(SqlBackend):
    def __init__(self, config: PostgresConfig) -> None:
        self.config = config
        super().__init__(config.name, pool_max=config.pool_max)
        self.pool: ConnectionPool | None = None

    async def open(self) -> None:
        self.pool = await trio.to_thread.run_sync(self._open_pool, limiter=self._limiter)

    def _open_pool(self) -> ConnectionPool:
        cfg = self.config
        # The pool retries a failing connect until its timeout and then only says "timeout";
        # one direct connection first fails fast with the driver's real error (bad password, no server).
        self._probe()
        pool: ConnectionPool = ConnectionPool(
            cfg.conninfo,
            # No automatic server-side prepares: DISCARD ALL on return would drop them behind
            # psycopg's back (it notices only the first time), breaking the next statement.
            kwargs={**cfg.params, "prepare_threshold": None},
            min_size=cfg.pool_min,
            max_size=cfg.pool_max,
            open=False,
            configure=_configure,
            reset=_reset,
            name=f"nomaflow:{cfg.name}",
            timeout=cfg.timeout_seconds,
        )
        try:
            pool.open(wait=True, timeout=cfg.timeout_seconds)
        except PoolTimeout:
            pool.close()
            self._probe()
            raise
        return pool

    def _probe(self) -> None:
        with psycopg.connect(self.config.conninfo, **self.config.params):
            pass

    def _get(self) -> psycopg.Connection[Any]:
        assert self.pool is not None
        try:
            return self.pool.getconn(timeout=self.config.timeout_seconds)
        except PoolTimeout:
            self._probe()  # raises the driver's own error if the server is the problem
            raise

    def _put(self, conn: psycopg.Connection[Any]) -> None:
        assert self.pool is not None
        if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
            try:
                conn.execute("ROLLBACK")
            except psycopg.Error:
                pass  # the pool discards a connection it cannot reset
        self.pool.putconn(conn)

    def _interrupt(self, conn: psycopg.Connection[Any]) -> None:
        cancel = getattr(conn, "cancel_safe", None) or conn.cancel
        cancel()

    def _close_all(self) -> None:
        if self.pool is not None:
            self.pool.close(timeout=self.config.timeout_seconds)

    # --- ops ------------------------------------------------------------------

    def op_execute(self, conn: psycopg.Connection[Any], sql: str, params: list[Any], in_tx: bool) -> int:
        with conn.cursor() as cur:
            cur.execute(sql, _params(params))
            return cur.rowcount

    def op_executemany(self, conn: psycopg.Connection[Any], sql: str, rows: list[Any], in_tx: bool) -> int:
        with conn.cursor() as cur:
            if in_tx:
                cur.executemany(sql, rows)
            else:
                with conn.transaction():
                    cur.executemany(sql, rows)
            return cur.rowcount

    def op_fetch(self, conn: psycopg.Connection[Any], sql: str, params: list[Any], in_tx: bool) -> list[Row]:
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(sql, _params(params))
            return cur.fetchall() if cur.description is not None else []

    def op_fetchrow(self, conn: psycopg.Connection[Any], sql: str, params: list[Any], in_tx: bool) -> Row | None:
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(sql, _params(params))
            return cur.fetchone() if cur.description is not None else None

    def op_scalar(self, conn: psycopg.Connection[Any], sql: str, params: list[Any], in_tx: bool) -> Any:
        with conn.cursor() as cur:
            cur.execute(sql, _params(params))
            row = cur.fetchone() if cur.description is not None else None
            return None if row is None else row[0]

    def op_begin(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("BEGIN")

    def op_commit(self, conn: psycopg.Connection[Any]) -> None:
        if conn.info.transaction_status == TransactionStatus.INERROR:
            # The server would answer COMMIT with a silent ROLLBACK; say so instead.
            conn.execute("ROLLBACK")
            raise psycopg.errors.InFailedSqlTransaction(
                "commit failed: an earlier statement in this transaction failed, so it was rolled back"
            )
        conn.execute("COMMIT")

    def op_rollback(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("ROLLBACK")

    def op_open_cursor(self, conn: psycopg.Connection[Any], sql: str, params: list[Any], in_tx: bool, name: str) -> Any:
        if not in_tx:
            conn.execute("BEGIN")  # DECLARE needs a transaction block
        cursor = conn.cursor(name=name)  # tuple rows: names travel once per batch
        try:
            cursor.execute(sql, _params(params))
        except BaseException:
            self.op_close_cursor(conn, cursor, in_tx)
            raise
        return cursor

    def op_fetch_batch(self, conn: psycopg.Connection[Any], cursor: Any, size: int) -> Batch:
        rows = cursor.fetchmany(size)
        return [c.name for c in cursor.description or ()], rows

    def op_close_cursor(self, conn: psycopg.Connection[Any], cursor: Any, in_tx: bool) -> None:
        try:
            cursor.close()
        finally:
            if not in_tx:
                status = conn.info.transaction_status
                if status == TransactionStatus.INTRANS:
                    conn.execute("COMMIT")
                elif status == TransactionStatus.INERROR:
                    conn.execute("ROLLBACK")


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.autocommit = True


def _reset(conn: psycopg.Connection[Any]) -> None:
    conn.execute("DISCARD ALL")


def _params(params: list[Any]) -> Any:
    """None for no parameters, so a literal '%' in the SQL needs no escaping."""
    if not params:
        return None
    named = single_mapping(params)
    return named if named is not None else tuple(params)
