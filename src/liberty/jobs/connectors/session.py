"""One step attempt's view of the connectors: permission checks, calls, transactions, streams.

The supervisor opens a session per attempt and forwards the child's calls to
it.  Arguments arrive already decoded (`protocol.values.decode_value`) and
results leave as plain Python values for the caller to encode.  Errors are
the driver's own exceptions (`sqlite3.IntegrityError`,
`psycopg.errors.UniqueViolation`, ...) or the right builtin, with messages
meant for the plugin author: they are re-raised in the child.

Transaction and stream ids are minted here; an id the session never issued is
a `ProtocolError` (the child runtime, not plugin code, sent it).
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio

from ..errors import ProtocolError
from .._notnow import NOT_NOW
from ._sql import Batch, Lease, NewSink, SqlBackend
from .config import ConnectorConfig
from .http_client import HTTP_VERBS, HttpBackend

if TYPE_CHECKING:
    from types import TracebackType

    from .registry import ConnectorRegistry

SQL_METHODS = ("execute", "executemany", "scalar", "fetch", "fetchrow", "begin", "commit", "rollback")
HTTP_METHODS = (*HTTP_VERBS, "request")
_NOW_METHODS = frozenset({"execute", "scalar", "fetch", "fetchrow"})
MAX_BATCH_SIZE = 100_000
_CLEANUP_SECONDS = 10.0
_LOG_SQL_CHARS = 2000
_cursor_names = itertools.count(1)
T = TypeVar("T")


@attrs.define(eq=False)
class _Tx:
    id: int
    connector: str
    backend: SqlBackend
    lease: Lease


@attrs.define(eq=False)
class _Stream:
    id: int
    connector: str
    backend: SqlBackend
    lease: Lease
    cursor: Any
    batch_size: int
    tx: _Tx | None


class ConnectorSession:
    """Async context manager; on exit closes streams and rolls back open transactions."""

    NOT_NOW = NOT_NOW

    def __init__(
        self,
        registry: ConnectorRegistry,
        step: str,
        allowed: Sequence[str],
        *,
        on_call: Callable[[str], None] | None = None,
    ) -> None:
        self._registry = registry
        self.step = step
        self.allowed = frozenset(allowed)
        self._on_call = on_call
        self._ids = itertools.count(1)
        self._txs: dict[int, _Tx] = {}
        self._streams: dict[int, _Stream] = {}
        self._issued = 0
        self._closed = False

    async def __aenter__(self) -> ConnectorSession:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # --- public surface -------------------------------------------------------

    def describe(self, name: str) -> dict[str, Any]:
        """What the child needs to build a proxy; raises if the step may not use `name`."""
        cfg = self._check(name)
        methods = SQL_METHODS + ("stream",) if cfg.kind == "sql" else HTTP_METHODS
        return {"name": name, "type": cfg.type, "kind": cfg.kind, "methods": list(methods)}

    async def call(
        self, name: str, method: str, args: list[Any], kwargs: dict[str, Any], tx: int | None = None, *, now: bool = True
    ) -> Any:
        """Run one connector method; bounded by the connector's `call_timeout_seconds`.

        `now=False` skips the `call_now` attempt, for a caller that just made it.
        """
        if now and (result := self.call_now(name, method, args, kwargs, tx)) is not NOT_NOW:
            return result
        cfg = self._check(name)
        if method == "describe":
            return self.describe(name)
        if cfg.kind == "http":
            return await self._http_call(cfg, method, args, kwargs, tx)
        return await self._sql_call(cfg, method, args, kwargs, tx)

    def call_now(
        self, name: str, method: str, args: list[Any], kwargs: dict[str, Any], tx: int | None = None
    ) -> Any:
        """`call`, if the backend can answer without waiting (an in-memory SQLite statement
        outside a transaction); otherwise `NOT_NOW`, and nothing was done.

        Synchronous, so the supervisor answers such a call without a task or a
        cancel scope: most of the cost of a quick call.  Errors are `call`'s.
        """
        if tx is not None or kwargs or not args or method not in _NOW_METHODS:
            return NOT_NOW
        cfg = self._check(name)
        backend = self._registry.opened(name)
        if cfg.kind != "sql" or not isinstance(backend, SqlBackend):
            return NOT_NOW
        sql = args[0]
        _check_sql(name, method, sql)
        result = backend.run_now(getattr(backend, f"op_{method}"), sql, args[1:], False)
        if result is not NOT_NOW:
            self._log(name, method, sql)
        return result

    async def stream_open(
        self, name: str, sql: str, params: list[Any], batch_size: int, tx: int | None = None
    ) -> int:
        """Open a server-side cursor (PostgreSQL) or a lazy cursor (SQLite); returns the stream id."""
        cfg = self._check(name)
        if cfg.kind != "sql":
            raise AttributeError(f"connector '{name}' is an {cfg.kind} connector; only SQL connectors can stream")
        _check_sql(name, "stream", sql)
        if not isinstance(params, list):
            raise TypeError(f"connector '{name}'.stream: parameters must be a list, got {type(params).__name__}")
        if type(batch_size) is not int or not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"connector '{name}'.stream: batch_size must be 1..{MAX_BATCH_SIZE}, got {batch_size!r}")
        owner = self._tx(tx, name)
        self._log(name, "stream", sql)
        with self._deadline(cfg, "stream"):
            backend = await self._sql_backend(name)
            lease = owner.lease if owner else await backend.acquire()
            try:
                cursor = await backend.run(
                    lease, backend.op_open_cursor, sql, params, owner is not None, f"nomaflow_stream_{next(_cursor_names)}"
                )
            except BaseException:
                if owner is None:
                    await backend.release(lease)
                raise
        stream = _Stream(self._new_id(), name, backend, lease, cursor, batch_size, owner)
        self._streams[stream.id] = stream
        return stream.id

    async def stream_next(self, stream_id: int) -> list[dict[str, Any]] | None:
        """The next batch (at most `batch_size` rows) as dicts, or None once the stream is exhausted."""
        batch = await self.stream_next_rows(stream_id)
        if batch is None:
            return None
        columns, rows = batch
        return [dict(zip(columns, row)) for row in rows]

    async def stream_next_rows(self, stream_id: int) -> Batch | None:
        """The next batch as (column names, row tuples), or None once the stream is exhausted."""
        batches: list[Batch] = []
        one = iter((True,))
        await self.stream_pump(stream_id, _CollectRows, lambda: next(one, False), batches.append)
        return batches[0] if batches else None

    async def stream_pump(
        self, stream_id: int, new_sink: NewSink[T], take: Callable[[], bool], send: Callable[[T], object]
    ) -> bool:
        """Fetch batches into sinks while `take()` grants them, all in one worker-thread hop.

        `take` is called on the worker thread before each batch (it must be
        thread-safe; False ends the hop).  Each batch goes into a fresh sink,
        in chunks as the driver returns them, and `sink.finish(columns)` runs
        there too, so the encoding happens on the thread; `send` then gets its
        result on the event loop, in order, as soon as it is ready.  A stream
        read faster than it is produced thus costs no thread hop per batch, and
        the next fetch overlaps the sending of the last.  A hop that produces
        no batch for `call_timeout_seconds` is interrupted.  Returns True once
        the stream is exhausted (its cursor is then closed).
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_issued(stream_id, "stream")
            return True
        cfg = self._registry.config(stream.connector)
        timeout = cfg.call_timeout_seconds
        backend = stream.backend
        token = trio.lowlevel.current_trio_token()
        stopped: list[bool] = []
        send_failed: list[Exception] = []

        with trio.move_on_after(timeout) as scope:

            def delivered(item: T) -> None:
                # Runs on the event loop from `run_sync_soon`, where an exception would end the
                # whole trio run: a consumer that is gone (its channel closed while the thread
                # still had a batch on the way) only stops the pump, any other error is raised
                # from this call instead.
                if stopped:
                    return  # interrupted or its consumer gone: nobody waits for this batch
                now = trio.current_time()
                if now > scope.deadline - timeout / 2:
                    scope.deadline = now + timeout  # progress: the timeout is per batch, give or take half
                try:
                    send(item)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    stopped.append(True)
                except Exception as exc:
                    send_failed.append(exc)
                    stopped.append(True)

            def pump(conn: Any, cursor: Any, size: int) -> bool:
                chunk = backend.fetch_chunk or size
                while not stopped and take():
                    sink = new_sink(backend.value_types)
                    got = 0
                    while got < size and not stopped:
                        want = min(chunk, size - got)
                        columns, rows = backend.op_fetch_batch(conn, cursor, want)
                        n = len(rows)
                        sink.add(rows)
                        del rows  # before the next fetch: one chunk of tuples alive at a time
                        got += n
                        if n < want:
                            break
                    if stopped:
                        return False
                    if got:
                        token.run_sync_soon(delivered, sink.finish(columns))
                    if got < size:
                        return True
                return False

            try:
                exhausted = await backend.run(
                    stream.lease, pump, stream.cursor, stream.batch_size, on_interrupt=lambda: stopped.append(True)
                )
            except BaseException:
                await self._finish_stream(stream)
                raise
        if send_failed:  # every batch's `delivered` ran before the hop's result (one FIFO queue)
            await self._finish_stream(stream)
            raise send_failed[0]
        if scope.cancelled_caught:
            await self._finish_stream(stream)
            raise _timed_out(cfg, "stream")
        if exhausted:
            await self._finish_stream(stream)  # free the cursor now, not on the next request
        return exhausted

    async def stream_close(self, stream_id: int) -> None:
        """Close early (the child stopped iterating); a finished stream is already closed."""
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_issued(stream_id, "stream")
            return
        await self._finish_stream(stream)

    async def aclose(self) -> None:
        """Close every stream, roll back every open transaction, give connections back."""
        if self._closed:
            return
        self._closed = True
        for stream in list(self._streams.values()):
            await self._finish_stream(stream)
        for t in list(self._txs.values()):
            await self._end_tx(t, t.backend.op_rollback, quiet=True)

    # --- SQL -------------------------------------------------------------------

    async def _sql_call(
        self, cfg: ConnectorConfig, method: str, args: list[Any], kwargs: dict[str, Any], tx: int | None
    ) -> Any:
        name = cfg.name
        if method not in SQL_METHODS:
            raise AttributeError(
                f"connector '{name}' (sql) has no method {method!r}; valid: {', '.join(SQL_METHODS)}, stream"
            )
        if kwargs:
            raise TypeError(f"connector '{name}'.{method}() got unexpected keyword argument(s) {', '.join(sorted(kwargs))}")
        owner = self._tx(tx, name)
        if method == "begin":
            return await self._begin(cfg, args, owner)
        if method in ("commit", "rollback"):
            return await self._finish_tx(cfg, method, args, owner)
        if not args:
            raise TypeError(f"connector '{name}'.{method}() missing the SQL text")
        sql, params = args[0], list(args[1:])
        _check_sql(name, method, sql)
        if method == "executemany":
            params = _check_rows(name, params)
        self._log(name, method, sql)
        # `_deadline` inlined: this is every call's hot path.
        with trio.move_on_after(cfg.call_timeout_seconds):
            backend = await self._sql_backend(name)
            op = getattr(backend, f"op_{method}")
            if owner is not None:
                return await backend.run(owner.lease, op, sql, params, True)
            return await backend.run_once(op, sql, params, False)
        raise _timed_out(cfg, method)

    async def _begin(self, cfg: ConnectorConfig, args: list[Any], owner: _Tx | None) -> int:
        if args:
            raise TypeError(f"connector '{cfg.name}'.begin() takes no arguments")
        if owner is not None:
            raise RuntimeError(
                f"connector '{cfg.name}': a transaction is already open here; nested transactions are not supported"
            )
        self._log(cfg.name, "begin", None)
        with self._deadline(cfg, "begin"):
            backend = await self._sql_backend(cfg.name)
            lease = await backend.acquire()
            try:
                await backend.run(lease, backend.op_begin)
            except BaseException:
                await backend.release(lease)
                raise
        t = _Tx(self._new_id(), cfg.name, backend, lease)
        self._txs[t.id] = t
        return t.id

    async def _finish_tx(self, cfg: ConnectorConfig, method: str, args: list[Any], owner: _Tx | None) -> None:
        if args:
            raise TypeError(f"connector '{cfg.name}'.{method}() takes no arguments")
        if owner is None:
            raise ProtocolError(f"connector '{cfg.name}'.{method} sent without a transaction id")
        self._log(cfg.name, method, None)
        op = owner.backend.op_commit if method == "commit" else owner.backend.op_rollback
        with self._deadline(cfg, method):
            await self._end_tx(owner, op, quiet=False)

    async def _end_tx(self, t: _Tx, op: Callable[..., None], *, quiet: bool) -> None:
        """Commit or roll back, then always give the connection back (rolled back if still open)."""
        self._txs.pop(t.id, None)
        try:
            for stream in [s for s in self._streams.values() if s.tx is t]:
                await self._finish_stream(stream)
            if quiet:
                with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_SECONDS):
                    with contextlib.suppress(Exception):
                        await t.backend.run(t.lease, op)
            else:
                await t.backend.run(t.lease, op)
        finally:
            await t.backend.release(t.lease)

    async def _finish_stream(self, stream: _Stream) -> None:
        if self._streams.pop(stream.id, None) is None:
            return
        with trio.CancelScope(shield=True):
            try:
                with trio.move_on_after(_CLEANUP_SECONDS), contextlib.suppress(Exception):
                    await stream.backend.run(stream.lease, stream.backend.op_close_cursor, stream.cursor, stream.tx is not None)
            finally:
                if stream.tx is None:
                    await stream.backend.release(stream.lease)

    async def _sql_backend(self, name: str) -> SqlBackend:
        backend = await self._registry.backend(name)
        assert isinstance(backend, SqlBackend)
        return backend

    # --- HTTP ------------------------------------------------------------------

    async def _http_call(
        self, cfg: ConnectorConfig, method: str, args: list[Any], kwargs: dict[str, Any], tx: int | None
    ) -> dict[str, Any]:
        name = cfg.name
        if method not in HTTP_METHODS:
            raise AttributeError(f"connector '{name}' (http) has no method {method!r}; valid: {', '.join(HTTP_METHODS)}")
        if tx is not None:
            raise ProtocolError(f"connector '{name}' is an HTTP connector; it has no transactions")
        if method == "request":
            if not args:
                raise TypeError(f"connector '{name}'.request() missing the HTTP method")
            verb, args = args[0], args[1:]
            if not isinstance(verb, str) or not verb.isalpha():
                raise ValueError(f"connector '{name}'.request(): {verb!r} is not an HTTP method")
        else:
            verb = method
        if len(args) != 1:
            raise TypeError(f"connector '{name}'.{method}() takes exactly one path argument, got {len(args)}")
        path = args[0]
        self._log(name, method, f"{verb.upper()} {str(path).split('?', 1)[0]}")
        with self._deadline(cfg, method):
            backend = await self._registry.backend(name)
            assert isinstance(backend, HttpBackend)
            return await backend.request(verb, path, kwargs)

    # --- shared ----------------------------------------------------------------

    def _check(self, name: str) -> ConnectorConfig:
        if self._closed:
            raise RuntimeError(f"the connector session of step '{self.step}' is closed")
        configs = self._registry.configs
        if name not in configs:
            known = ", ".join(sorted(configs)) or "none"
            raise LookupError(f"connector '{name}' is not configured; known: {known}")
        if name not in self.allowed:
            raise PermissionError(
                f"step '{self.step}' may not use connector '{name}': "
                f'add it to the step\'s connectors list (connectors = ["{name}"]), '
                f"or pass --connector {name} to `nomaflow step`"
            )
        return configs[name]

    def _tx(self, tx: int | None, name: str) -> _Tx | None:
        if tx is None:
            return None
        t = self._txs.get(tx)
        if t is None:
            self._check_issued(tx, "transaction")
            raise RuntimeError(f"connector '{name}': transaction {tx} is already finished")
        if t.connector != name:
            raise ProtocolError(f"transaction {tx} belongs to connector '{t.connector}', not '{name}'")
        return t

    def _new_id(self) -> int:
        self._issued = next(self._ids)
        return self._issued

    def _check_issued(self, ident: Any, what: str) -> None:
        if type(ident) is not int or not 0 < ident <= self._issued:
            raise ProtocolError(f"unknown {what} id {ident!r}")

    @contextlib.contextmanager
    def _deadline(self, cfg: ConnectorConfig, method: str) -> Iterator[None]:
        with trio.move_on_after(cfg.call_timeout_seconds) as scope:
            yield
        if scope.cancelled_caught:
            raise _timed_out(cfg, method)

    def _log(self, name: str, method: str, text: str | None) -> None:
        if self._on_call is None:
            return
        line = f"connector {name}.{method}"
        if text:
            text = re.sub(r"\s+", " ", text).strip()
            if len(text) > _LOG_SQL_CHARS:
                text = text[:_LOG_SQL_CHARS] + "…"
            line += f": {text}"
        self._on_call(line)


class _CollectRows:
    """The sink of `stream_next_rows`: the batch as the driver returned it."""

    def __init__(self, value_types: frozenset[type] | None) -> None:
        self.rows: list[tuple[Any, ...]] = []

    def add(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows.extend(rows)

    def finish(self, columns: list[str]) -> Batch:
        return columns, self.rows


def _timed_out(cfg: ConnectorConfig, method: str) -> TimeoutError:
    return TimeoutError(
        f"connector '{cfg.name}': {method} did not finish within {cfg.call_timeout_seconds:g} s "
        "(call_timeout_seconds in connectors.toml)"
    )


def _check_sql(name: str, method: str, sql: Any) -> None:
    if not isinstance(sql, str):
        raise TypeError(f"connector '{name}'.{method}(): the SQL text must be a string, got {type(sql).__name__}")


def _check_rows(name: str, params: list[Any]) -> list[Any]:
    if len(params) != 1 or not isinstance(params[0], (list, tuple)):
        raise TypeError(f"connector '{name}'.executemany(sql, rows): rows must be one list of rows")
    rows = list(params[0])
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple, dict)):
            raise TypeError(
                f"connector '{name}'.executemany(): row {i} must be a list, tuple or dict, got {type(row).__name__}"
            )
    return rows


__all__ = ["HTTP_METHODS", "NOT_NOW", "SQL_METHODS", "ConnectorSession"]
