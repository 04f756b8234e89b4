"""Small helpers shared by the supervisor test modules."""

from __future__ import annotations

import psutil

from liberty.jobs.history import LogLine


def messages(logs: list[LogLine], stream: str) -> list[str]:
    """The messages of one stream ("log", "stdout", "stderr", "system") of a run log."""
    return [line.message for line in logs if line.stream == stream]


def gone(pid: int) -> bool:
    """True once `pid` no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
