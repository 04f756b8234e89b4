"""The run history: where runs, steps, attempts and logs are kept (SQLite).

Synchronous and trio-free: the supervisor reaches it through `trio.to_thread`
(or on its event loop with `HistoryStore.write_now`, when that cannot wait),
the CLI directly, possibly from another process at the same time.
"""

from __future__ import annotations

from .records import LOG_STREAMS, AttemptRecord, LogLine, RunSummary, RunView, StepView
from .schema import SCHEMA_VERSION
from .store import CHECKPOINT_EVERY, MIN_PREFIX_LEN, HistoryStore

__all__ = [
    "CHECKPOINT_EVERY",
    "LOG_STREAMS",
    "MIN_PREFIX_LEN",
    "SCHEMA_VERSION",
    "AttemptRecord",
    "HistoryStore",
    "LogLine",
    "RunSummary",
    "RunView",
    "StepView",
]
