"""The trusted side: spawns children, enforces limits, records everything."""

from .processes import become_subreaper, kill_tree
from .runner import Run, RunHandle, Supervisor
from .session import AttemptOutcome, AttemptSession

__all__ = ["AttemptOutcome", "AttemptSession", "Run", "RunHandle", "Supervisor", "become_subreaper", "kill_tree"]
