"""Small helpers shared by the supervisor test modules."""

from __future__ import annotations

from pathlib import Path

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


def plugins_dir(tmp_path: Path, **modules: str) -> Path:
    """A fresh plugins directory under `tmp_path` holding `<name>.py` for each module source given."""
    path = tmp_path / "plugins"
    path.mkdir()
    for name, source in modules.items():
        (path / f"{name}.py").write_text(source)
    return path
