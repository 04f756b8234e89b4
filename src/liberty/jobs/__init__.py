"""Nomaflow step runner: untrusted Python steps, each in its own child interpreter.

`Supervisor`, `Job` and `Step` are loaded lazily so that the child interpreter,
which imports this package too, never pulls in trio or the supervisor.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Job", "Limits", "Retry", "Run", "Step", "Supervisor"]


def __getattr__(name: str) -> Any:
    if name in ("Job", "Step", "Limits", "Retry"):
        from . import config

        return getattr(config, name)
    if name in ("Supervisor", "Run"):
        from . import supervisor

        return getattr(supervisor, name)
    raise AttributeError(f"module 'liberty.jobs' has no attribute {name!r}")
