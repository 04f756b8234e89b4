"""Connector proxies: the child's view of a connector that lives in the supervisor.

Every method is async and crosses the pipe as a `call`; the real connection,
its pool and its credentials never leave the supervisor.  Driver errors come
back as the driver's own exception type, so `except IntegrityError` works.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ..protocol import Call, Rows, StreamClose, StreamMore, StreamOpen
from ..protocol.values import decode_exception, decode_value, encode_value, unpack_blob, unpack_rows
from .channel import Channel

STREAM_CREDIT = 4
_END: Any = object()


class _Proxy:
    def __init__(self, channel: Channel, name: str, info: dict[str, Any], tx: int | None = None) -> None:
        self._channel = channel
        self._name = name
        self._info = info
        self._tx = tx

    @property
    def name(self) -> str:
        return self._name

    async def _call(self, method: str, args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]) -> Any:
        channel = self._channel
        call_id = channel.new_id()
        pending = channel.expect_reply_async(call_id)
        channel.send(
            Call(
                id=call_id,
                connector=self._name,
                method=method,
                args=encode_value(list(args)),
                kwargs=encode_value(dict(kwargs)),
                tx=self._tx,
            )
        )
        reply = await pending.wait()
        if not reply.ok:
            raise decode_exception(reply.error or {})
        return decode_value(reply.value)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name!r} ({self._info.get('type')})>"


class SqlConnectorProxy(_Proxy):
    """`ctx.get_connector(name)` for sqlite/postgres; parameters use the driver's paramstyle."""

    async def execute(self, sql: str, *params: Any) -> int:
        return await self._call("execute", (sql, *params), {})

    async def executemany(self, sql: str, rows: Any) -> int:
        return await self._call("executemany", (sql, [list(r) if isinstance(r, tuple) else r for r in rows]), {})

    async def scalar(self, sql: str, *params: Any) -> Any:
        return await self._call("scalar", (sql, *params), {})

    async def fetch(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        return await self._call("fetch", (sql, *params), {})

    async def fetchrow(self, sql: str, *params: Any) -> dict[str, Any] | None:
        return await self._call("fetchrow", (sql, *params), {})

    def stream(self, sql: str, *params: Any, batch_size: int = 1000) -> RowStream:
        """`async for row in target.stream(sql)`: rows arrive in batches, a bounded number in flight."""
        return RowStream(self._channel, self._name, sql, list(params), batch_size, self._tx)

    def transaction(self) -> Transaction:
        """`async with target.transaction() as tx:` pins one connection; commits, or rolls back on error."""
        if self._tx is not None:
            raise RuntimeError(f"connector {self._name!r}: nested transactions are not supported")
        return Transaction(self)


class Transaction:
    def __init__(self, proxy: SqlConnectorProxy) -> None:
        self._proxy = proxy
        self._tx_proxy: SqlConnectorProxy | None = None

    async def __aenter__(self) -> SqlConnectorProxy:
        tx = await self._proxy._call("begin", (), {})
        self._tx_proxy = SqlConnectorProxy(self._proxy._channel, self._proxy._name, self._proxy._info, tx=tx)
        return self._tx_proxy

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._tx_proxy is not None
        await self._tx_proxy._call("commit" if exc_type is None else "rollback", (), {})


class RowStream:
    """Async iterator over a query's rows; breaking out early closes the cursor in the supervisor."""

    def __init__(self, channel: Channel, name: str, sql: str, params: list[Any], batch_size: int, tx: int | None) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self._channel = channel
        self._name = name
        self._open = (sql, params, batch_size, tx)
        self._id: int | None = None
        self._queue: asyncio.Queue[Rows] | None = None
        self._batch: Iterator[Any] = iter(())  # dicts, each built as it is reached
        self._consumed = 0  # batches read since credit was last granted
        self._finished = False

    def __aiter__(self) -> AsyncIterator[Any]:
        # An async generator: its per-row step runs in C, where a Python `__anext__`
        # would cost a coroutine per row.  Leaving the loop early closes it, which
        # closes the cursor (`finally` below).
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        try:
            while True:
                for row in self._batch:
                    yield row
                if self._finished:
                    return
                await self._next_batch()
        finally:
            self._finish(notify=True)

    async def __anext__(self) -> Any:
        while (row := next(self._batch, _END)) is _END:
            if self._finished:
                raise StopAsyncIteration
            await self._next_batch()
        return row

    async def _next_batch(self) -> None:
        channel = self._channel
        if self._queue is None:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[Rows] = asyncio.Queue()
            self._queue = queue
            self._id = channel.new_id()
            channel.expect_rows(self._id, lambda rows: loop.call_soon_threadsafe(queue.put_nowait, rows))
            sql, params, batch_size, tx = self._open
            channel.send(
                StreamOpen(
                    id=self._id,
                    connector=self._name,
                    sql=sql,
                    params=encode_value(params),
                    batch_size=batch_size,
                    credit=STREAM_CREDIT,
                    tx=tx,
                )
            )
        else:
            # Credit goes back half a window at a time: half the messages, still a batch or two ahead.
            self._consumed += 1
            if self._consumed >= STREAM_CREDIT // 2:
                channel.send(StreamMore(id=self._id, credit=self._consumed))  # type: ignore[arg-type]
                self._consumed = 0
        batch = await self._queue.get()
        if batch.error is not None:
            self._finish(notify=False)
            raise decode_exception(batch.error)
        if batch.blob:
            self._batch = unpack_blob(batch.columns, batch.blob)
        else:
            self._batch = iter(unpack_rows(batch.columns, batch.rows, tagged=batch.tagged))
        if batch.done:
            self._finish(notify=False)

    def _finish(self, *, notify: bool) -> None:
        if self._finished:
            return
        self._finished = True
        if self._id is not None:
            if notify:
                self._channel.send(StreamClose(id=self._id))
            self._channel.forget_stream(self._id)

    async def aclose(self) -> None:
        self._finish(notify=True)

    async def __aenter__(self) -> RowStream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._finish(notify=True)

    def __del__(self) -> None:
        if not self._finished and self._id is not None:
            try:
                self._finish(notify=True)
            except Exception:  # interpreter shutdown: the supervisor closes the cursor at attempt end anyway
                return


class HttpResponse:
    """What an HTTP connector method returns: status, headers, text and `json()`."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.status_code: int = data["status_code"]
        self.headers: dict[str, str] = data.get("headers", {})
        self.text: str = data.get("text", "")

    def json(self) -> Any:
        return json.loads(self.text)

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise RuntimeError(f"HTTP {self.status_code}: {self.text[:200]}")

    def __repr__(self) -> str:
        return f"<HttpResponse {self.status_code}>"


class HttpConnectorProxy(_Proxy):
    """`ctx.get_connector(name)` for http: paths are relative to the connector's base_url."""

    async def request(self, method: str, path: str, **kwargs: Any) -> HttpResponse:
        return HttpResponse(await self._call("request", (method, path), kwargs))

    async def get(self, path: str, **kwargs: Any) -> HttpResponse:
        return HttpResponse(await self._call("get", (path,), kwargs))

    async def post(self, path: str, **kwargs: Any) -> HttpResponse:
        return HttpResponse(await self._call("post", (path,), kwargs))

    async def put(self, path: str, **kwargs: Any) -> HttpResponse:
        return HttpResponse(await self._call("put", (path,), kwargs))

    async def patch(self, path: str, **kwargs: Any) -> HttpResponse:
        return HttpResponse(await self._call("patch", (path,), kwargs))

    async def delete(self, path: str, **kwargs: Any) -> HttpResponse:
        return HttpResponse(await self._call("delete", (path,), kwargs))


def make_proxy(channel: Channel, name: str, info: Any) -> _Proxy:
    kind = info.get("kind") if isinstance(info, dict) else None
    if kind == "sql":
        return SqlConnectorProxy(channel, name, info)
    if kind == "http":
        return HttpConnectorProxy(channel, name, info)
    raise RuntimeError(f"connector {name!r}: the supervisor described an unknown kind {kind!r}")
