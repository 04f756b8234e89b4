"""Testing kit for plugin authors: a fake `StepContext` and the `fake_ctx` fixture.

Step functions are plain async functions, so they are tested by calling them
with a context that behaves like the child's, minus the pipe: log lines land in
a list, connectors are whatever objects the test hands in, previous steps are
records the test describes.

This module is also the pytest plugin "nomaflow" (pytest11 entry point), which
every pytest run in a user's project loads; it therefore imports nothing heavy
and never trio: only `liberty.jobs.types` (attrs) and pytest itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from liberty.jobs.types import Status, StepRecord

_LOG_LEVELS = ("DEBUG", "INFO")
_RECORD_KEYS = frozenset({"status", "output", "attempts", "error"})
_STATUSES = frozenset(s.value for s in Status)


class FakeLog:
    """Captures `ctx.log` calls as `(LEVEL, message)` tuples in `.calls`.

    Every call is kept whatever the context's `log_level`: a test asserting on
    a DEBUG line should not depend on the level it happened to build with.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def debug(self, msg: object) -> None:
        self.calls.append(("DEBUG", str(msg)))

    def info(self, msg: object) -> None:
        self.calls.append(("INFO", str(msg)))

    def warning(self, msg: object) -> None:
        self.calls.append(("WARNING", str(msg)))

    def error(self, msg: object) -> None:
        self.calls.append(("ERROR", str(msg)))


class FakeStepContext:
    """An in-memory `StepContext`; `cancel()` plays the operator's ✕ Cancel."""

    def __init__(
        self,
        *,
        params: dict[str, Any],
        connectors: dict[str, Any],
        previous_steps: dict[str, StepRecord],
        session_user: str,
        log_level: str,
        run_id: str,
        job_id: str,
    ) -> None:
        self.log = FakeLog()
        self.params = params
        self.session_user = session_user
        self.log_level = log_level
        self.run_id = run_id
        self.job_id = job_id
        self._connectors = connectors
        self._previous_steps = previous_steps
        self._cancelled = False

    def get_connector(self, name: str) -> Any:
        try:
            return self._connectors[name]
        except KeyError:
            raise LookupError(
                f"no connector named {name!r} in this fake context; available: "
                f"{_names(self._connectors)} (pass it in build_fake_ctx(connectors=...))"
            ) from None

    def previous_step(self, name: str) -> StepRecord:
        try:
            return self._previous_steps[name]
        except KeyError:
            raise LookupError(
                f"no previous step named {name!r} in this fake context; available: "
                f"{_names(self._previous_steps)} (pass it in build_fake_ctx(previous_steps=...))"
            ) from None

    def is_cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        self._cancelled = True

    def __repr__(self) -> str:
        return (
            f"FakeStepContext(job_id={self.job_id!r}, run_id={self.run_id!r}, "
            f"cancelled={self._cancelled}, log_lines={len(self.log.calls)})"
        )


def build_fake_ctx(
    *,
    params: dict | None = None,
    connectors: Mapping[str, Any] | None = None,
    previous_steps: Mapping[str, StepRecord | Mapping] | None = None,
    session_user: str = "test",
    log_level: str = "INFO",
    run_id: str = "fake-run",
    job_id: str = "fake-job",
) -> FakeStepContext:
    """Build a context for calling a step function directly in a test.

    `previous_steps` values may be plain dicts (keys status/output/attempts/
    error; status defaults to SUCCEEDED) so a test can describe the upstream
    step in one line; they are checked here, so a typo fails at build time
    rather than as a confusing attribute error inside the step.
    """
    if log_level not in _LOG_LEVELS:
        raise ValueError(f"log_level {log_level!r} is not one of {', '.join(_LOG_LEVELS)}")
    return FakeStepContext(
        params=dict(params or {}),
        connectors=dict(connectors or {}),
        previous_steps={
            name: _to_record(name, value) for name, value in (previous_steps or {}).items()
        },
        session_user=session_user,
        log_level=log_level,
        run_id=run_id,
        job_id=job_id,
    )


@pytest.fixture
def fake_ctx() -> FakeStepContext:
    """A fresh `build_fake_ctx()` per test."""
    return build_fake_ctx()


class FakeSqlConnector:
    """A SQL connector for unit tests, backed by a real `sqlite3` connection in-process.

    Same async surface as the runner's proxy (execute, executemany, scalar,
    fetch, fetchrow, stream, transaction) and the same `?` paramstyle, so a
    step that works here issues the same calls through the pipe.
    """

    def __init__(self, connection: Any | None = None) -> None:
        import sqlite3

        self.connection = connection if connection is not None else sqlite3.connect(":memory:")
        self.calls: list[tuple[str, str]] = []

    def _cursor(self, method: str, sql: str, params: Any) -> Any:
        self.calls.append((method, sql))
        return self.connection.execute(sql, params)

    async def execute(self, sql: str, *params: Any) -> int:
        cur = self._cursor("execute", sql, params)
        self._autocommit()
        return cur.rowcount

    async def executemany(self, sql: str, rows: Any) -> int:
        self.calls.append(("executemany", sql))
        cur = self.connection.executemany(sql, [tuple(r) for r in rows])
        self._autocommit()
        return cur.rowcount

    async def scalar(self, sql: str, *params: Any) -> Any:
        row = self._cursor("scalar", sql, params).fetchone()
        return None if row is None else row[0]

    async def fetch(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        cur = self._cursor("fetch", sql, params)
        names = [d[0] for d in cur.description or ()]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    async def fetchrow(self, sql: str, *params: Any) -> dict[str, Any] | None:
        rows = await self.fetch(sql, *params)
        return rows[0] if rows else None

    async def stream(self, sql: str, *params: Any, batch_size: int = 1000) -> Any:
        cur = self._cursor("stream", sql, params)
        names = [d[0] for d in cur.description or ()]
        while batch := cur.fetchmany(batch_size):
            for row in batch:
                yield dict(zip(names, row))

    def transaction(self) -> Any:
        import contextlib

        @contextlib.asynccontextmanager
        async def block() -> Any:
            self._in_tx = True
            try:
                yield self
            except BaseException:
                self.connection.rollback()
                raise
            else:
                self.connection.commit()
            finally:
                self._in_tx = False

        return block()

    _in_tx = False

    def _autocommit(self) -> None:
        if not self._in_tx:
            self.connection.commit()


def _to_record(name: str, value: StepRecord | Mapping) -> StepRecord:
    if isinstance(value, StepRecord):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(
            f"previous_steps[{name!r}] is a {type(value).__name__}; "
            "pass a StepRecord or a dict with keys status/output/attempts/error"
        )
    unknown = set(value) - _RECORD_KEYS
    if unknown:
        raise ValueError(
            f"previous_steps[{name!r}] has unknown keys {sorted(unknown)}; "
            f"allowed: {', '.join(sorted(_RECORD_KEYS))}"
        )
    status = str(value.get("status", Status.SUCCEEDED))
    if status not in _STATUSES:
        raise ValueError(
            f"previous_steps[{name!r}] status {status!r} is not one of {', '.join(sorted(_STATUSES))}"
        )
    return StepRecord(
        name=name,
        status=status,
        output=value.get("output"),
        attempts=value.get("attempts", 1),
        error=value.get("error"),
    )


def _names(mapping: Mapping[str, Any]) -> str:
    return ", ".join(repr(n) for n in sorted(mapping)) or "none"


__all__ = ["FakeLog", "FakeSqlConnector", "FakeStepContext", "build_fake_ctx", "fake_ctx"]
