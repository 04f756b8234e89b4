"""`NOT_NOW`: what a synchronous fast path returns when the work has to go to a worker thread after all.

Shared by the paths that try work on the supervisor's event loop first (the
SQLite connector's `run_now`, the history's `write_now`): a thread hop costs
more than a short statement, but only work sure not to wait may run inline.
"""

from __future__ import annotations

from typing import Any

NOT_NOW: Any = type("NotNow", (), {"__repr__": lambda self: "NOT_NOW"})()
"""Nothing was done; do it on a worker thread."""
