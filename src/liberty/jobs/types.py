"""The plugin-facing API.

Plugin authors import `StepContext` from here for annotations; the child's
real context and the testing kit's fake both satisfy it.  This module must stay
importable in the child: no trio, nothing from `supervisor/`.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol, runtime_checkable

import attrs


class Status(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"
    SKIPPED = "SKIPPED"


FINAL_STATUSES = frozenset(
    {Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.TIMED_OUT, Status.SKIPPED}
)


class Reason(enum.StrEnum):
    """Why an attempt did not succeed; recorded with every failed attempt."""

    EXCEPTION = "exception"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    MEMORY = "memory"
    CPU = "cpu"
    KILLED = "killed"
    CRASHED = "crashed"
    PROTOCOL = "protocol"
    OUTPUT = "output"
    LOGS = "logs"
    LOST = "lost"
    SANDBOX = "sandbox"


@attrs.frozen
class StepRecord:
    """What `ctx.previous_step(name)` returns: a finished step of this run."""

    name: str
    status: str
    output: Any = None
    attempts: int = 0
    error: Mapping[str, Any] | None = None


class StepLogger(Protocol):
    def debug(self, msg: object) -> None: ...
    def info(self, msg: object) -> None: ...
    def warning(self, msg: object) -> None: ...
    def error(self, msg: object) -> None: ...


class SqlConnector(Protocol):
    """A SQL connector as a plugin sees it; parameters use the driver's paramstyle."""

    async def execute(self, sql: str, *params: Any) -> int: ...
    async def executemany(self, sql: str, rows: Any) -> int: ...
    async def scalar(self, sql: str, *params: Any) -> Any: ...
    async def fetch(self, sql: str, *params: Any) -> list[dict[str, Any]]: ...
    async def fetchrow(self, sql: str, *params: Any) -> dict[str, Any] | None: ...
    def stream(self, sql: str, *params: Any, batch_size: int = ...) -> AsyncIterator[dict[str, Any]]: ...
    def transaction(self) -> Any: ...


class HttpResponse(Protocol):
    status_code: int
    headers: Mapping[str, str]
    text: str

    def json(self) -> Any: ...


class HttpConnector(Protocol):
    async def get(self, path: str, **kwargs: Any) -> HttpResponse: ...
    async def post(self, path: str, **kwargs: Any) -> HttpResponse: ...
    async def put(self, path: str, **kwargs: Any) -> HttpResponse: ...
    async def patch(self, path: str, **kwargs: Any) -> HttpResponse: ...
    async def delete(self, path: str, **kwargs: Any) -> HttpResponse: ...
    async def request(self, method: str, path: str, **kwargs: Any) -> HttpResponse: ...


@runtime_checkable
class StepContext(Protocol):
    """The `ctx` every step function receives as its first argument."""

    log: StepLogger
    params: dict[str, Any]
    session_user: str
    run_id: str
    job_id: str
    log_level: str

    def get_connector(self, name: str) -> Any: ...
    def is_cancelled(self) -> bool: ...
    def previous_step(self, name: str) -> StepRecord: ...


__all__ = [
    "FINAL_STATUSES",
    "HttpConnector",
    "HttpResponse",
    "Reason",
    "SqlConnector",
    "Status",
    "StepContext",
    "StepLogger",
    "StepRecord",
]
