"""Sealing the child before the plugin is imported: namespaces, rlimits, uid, Landlock.

Runs inside the child interpreter, so it imports neither trio nor the
supervisor; the supervisor may import it (for `probe()` and `SandboxSpec`).
"""

from .apply import (
    DEVICES,
    AppliedReport,
    Measure,
    SandboxSpec,
    apply,
    default_readable,
    files_apart,
    outermost,
    sandbox_gaps,
    sandbox_problem,
)
from .landlock import abi_version as landlock_abi
from .probe import probe, unprivileged_user

__all__ = [
    "DEVICES",
    "AppliedReport",
    "Measure",
    "SandboxSpec",
    "apply",
    "default_readable",
    "files_apart",
    "landlock_abi",
    "outermost",
    "probe",
    "sandbox_gaps",
    "sandbox_problem",
    "unprivileged_user",
]
