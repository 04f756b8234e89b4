"""Per-process resource limits, set inside the child before the plugin runs.

RLIMIT_AS is deliberately absent: it counts address space, not memory, and
breaks numpy/OpenBLAS imports; memory is the cgroup's job.
"""

from __future__ import annotations

import math
import resource

CPU_HARD_MARGIN_S = 2


def cpu_limits(cpu_seconds: float) -> tuple[int, int]:
    """(soft, hard): SIGXCPU at the soft limit so the death is attributable, SIGKILL a little later."""
    soft = max(1, math.ceil(cpu_seconds))
    return soft, soft + max(CPU_HARD_MARGIN_S, soft // 10)


def lower(which: int, soft: int, hard: int | None = None) -> tuple[int, int]:
    """Set a limit no higher than the current hard limit (an unprivileged child cannot raise it)."""
    _, cur_hard = resource.getrlimit(which)
    hard = soft if hard is None else hard
    if cur_hard != resource.RLIM_INFINITY:
        hard = min(hard, cur_hard)
        soft = min(soft, hard)
    resource.setrlimit(which, (soft, hard))
    return resource.getrlimit(which)
