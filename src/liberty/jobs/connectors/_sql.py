"""What the SQLite and PostgreSQL backends share: leasing and blocking ops on threads.

A backend owns a pool of driver connections.  Waiting for a free connection
happens in trio (a semaphore, so it is cancellable and bounded by the call
timeout); only driver calls run on worker threads, one at a time per
connection, and each one can be interrupted on the server.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import trio

from .._notnow import NOT_NOW
from ._threads import run_interruptible

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
Row = dict[str, Any]
Batch = tuple[list[str], list[tuple[Any, ...]]]
"""A stream batch: column names and the rows as the driver's tuples."""


class BatchSink(Protocol[T_co]):
    """Takes one stream batch on the worker thread, chunk by chunk as fetched, and makes it ready to send."""

    def add(self, rows: list[tuple[Any, ...]]) -> None: ...

    def finish(self, columns: list[str]) -> T_co: ...


NewSink = Callable[["frozenset[type] | None"], BatchSink[T]]
"""A sink for the next batch, given the backend's `value_types`."""


class Lease:
    """One connection checked out of a backend; ops on it are serialised."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.lock = trio.Lock()


class SqlBackend(ABC):
    kind = "sql"
    value_types: frozenset[type] | None = None
    """Every type a fetched value can have, when the driver guarantees a short list (None: any)."""
    fetch_chunk = 0
    """Rows per driver fetch within a stream batch, when fetching costs no round trip (0: the whole batch)."""

    def __init__(self, name: str, *, pool_max: int) -> None:
        self.name = name
        self._slots = trio.Semaphore(pool_max)
        self._limiter = trio.CapacityLimiter(pool_max)

    async def open(self) -> None:
        """Called once, on first use."""

    async def acquire(self) -> Lease:
        await self._slots.acquire()
        try:
            conn = await trio.to_thread.run_sync(self._get, limiter=self._limiter)
        except BaseException:
            self._slots.release()
            raise
        return Lease(conn)

    async def release(self, lease: Lease) -> None:
        """Reset the connection and give it back; runs even when the caller is cancelled."""
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(self._put, lease.conn, limiter=self._limiter)
            finally:
                self._slots.release()

    async def run(
        self, lease: Lease, op: Callable[..., T], *args: Any, on_interrupt: Callable[[], object] | None = None
    ) -> T:
        """`op(conn, *args)` on a worker thread; `on_interrupt` also runs if it is cancelled (an op
        of several statements may be between two, where the driver's interrupt would miss it)."""
        interrupt = functools.partial(self._interrupt, lease.conn)
        if on_interrupt is not None:
            interrupt = _both(on_interrupt, interrupt)
        async with lease.lock:
            return await run_interruptible(functools.partial(op, lease.conn, *args), interrupt, limiter=self._limiter)

    def run_now(self, op: Callable[..., T], *args: Any) -> Any:
        """`op` on the event loop when it is sure to be quick; otherwise NOT_NOW, with nothing done."""
        return NOT_NOW

    async def run_once(self, op: Callable[..., T], *args: Any) -> T:
        """Check out, run `op`, give back, in a single thread hop: the common, non-transaction case."""
        await self._slots.acquire()
        try:
            current: list[Any] = []

            def work() -> T:
                conn = self._get()
                current.append(conn)
                try:
                    return op(conn, *args)
                finally:
                    current.clear()  # from here on an interrupt could only hit the reset
                    self._put(conn)

            def interrupt() -> None:
                if current:
                    self._interrupt(current[0])

            return await run_interruptible(work, interrupt, limiter=self._limiter)
        finally:
            self._slots.release()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._close_all)

    # --- driver specific, all called on worker threads -----------------------

    @abstractmethod
    def _get(self) -> Any: ...

    @abstractmethod
    def _put(self, conn: Any) -> None: ...

    @abstractmethod
    def _interrupt(self, conn: Any) -> None: ...

    @abstractmethod
    def _close_all(self) -> None: ...

    @abstractmethod
    def op_execute(self, conn: Any, sql: str, params: list[Any], in_tx: bool) -> int: ...

    @abstractmethod
    def op_executemany(self, conn: Any, sql: str, rows: list[Any], in_tx: bool) -> int: ...

    @abstractmethod
    def op_fetch(self, conn: Any, sql: str, params: list[Any], in_tx: bool) -> list[Row]: ...

    @abstractmethod
    def op_fetchrow(self, conn: Any, sql: str, params: list[Any], in_tx: bool) -> Row | None: ...

    @abstractmethod
    def op_scalar(self, conn: Any, sql: str, params: list[Any], in_tx: bool) -> Any: ...

    @abstractmethod
    def op_begin(self, conn: Any) -> None: ...

    @abstractmethod
    def op_commit(self, conn: Any) -> None: ...

    @abstractmethod
    def op_rollback(self, conn: Any) -> None: ...

    @abstractmethod
    def op_open_cursor(self, conn: Any, sql: str, params: list[Any], in_tx: bool, name: str) -> Any: ...

    @abstractmethod
    def op_fetch_batch(self, conn: Any, cursor: Any, size: int) -> Batch:
        """(column names, rows as tuples): dicts would be built only to be taken apart again."""

    @abstractmethod
    def op_close_cursor(self, conn: Any, cursor: Any, in_tx: bool) -> None: ...


def _both(first: Callable[[], object], then: Callable[[], object]) -> Callable[[], None]:
    def both() -> None:
        first()
        then()

    return both


def single_mapping(params: list[Any]) -> dict[str, Any] | None:
    """`execute(sql, {"a": 1})` means named parameters, as both drivers understand them."""
    if len(params) == 1 and isinstance(params[0], dict):
        return params[0]
    return None
