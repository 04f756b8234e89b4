"""What the history store hands out: immutable snapshots of runs, steps, attempts and log lines.

They are plain data so that the CLI, the supervisor and tests can hold them
across threads and processes without touching the database again.
"""

from __future__ import annotations

from typing import Any

import attrs

LOG_STREAMS = frozenset({"log", "stdout", "stderr", "system"})
"""`log` is ctx.log, `stdout`/`stderr` the child's captured output, `system` the runner's own notes."""

_STEP_ERROR_KEYS = ("type", "message", "reason", "traceback")


@attrs.frozen
class LogLine:
    """One line of a run's log; `id` is assigned by the store and only grows, so followers poll by it."""

    run_id: str
    ts: float
    level: str
    stream: str
    message: str
    step: str | None = None
    attempt: int | None = None
    id: int | None = None


@attrs.frozen
class AttemptRecord:
    """One finished attempt of a step, kept even when a later retry succeeds."""

    run_id: str
    step: str
    attempt: int
    status: str
    reason: str | None
    output: Any
    error: dict[str, Any] | None
    started_at: float
    ended_at: float
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    exit_code: int | None = None
    usage: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class StepView:
    name: str
    index: int
    status: str
    attempts: int
    output: Any
    error: dict[str, Any] | None
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    started_at: float | None
    ended_at: float | None
    attempt_records: list[AttemptRecord] = attrs.field(factory=list)

    def to_json(self) -> dict[str, Any]:
        """The step object of the `--json` contract (DESIGN.md), and nothing more."""
        error = None
        if self.error is not None:
            error = {key: self.error.get(key) for key in _STEP_ERROR_KEYS}
        return {
            "name": self.name,
            "status": self.status,
            "attempts": self.attempts,
            "output": self.output,
            "error": error,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "peak_rss_mb": self.peak_rss_mb,
        }


@attrs.frozen
class RunView:
    run_id: str
    job: str
    status: str
    session_user: str
    params: dict[str, Any]
    created_at: float
    started_at: float | None
    ended_at: float | None
    supervisor_pid: int
    cancel_requested: bool
    steps: list[StepView] = attrs.field(factory=list)

    def to_json(self) -> dict[str, Any]:
        """The `--json` shape of `nomaflow run`/`show`; run-level extras come after the contract keys."""
        return {
            "run_id": self.run_id,
            "job": self.job,
            "status": self.status,
            "steps": [step.to_json() for step in self.steps],
            "session_user": self.session_user,
            "params": self.params,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "cancel_requested": self.cancel_requested,
        }


@attrs.frozen
class RunSummary:
    """One row of `nomaflow runs`: enough to choose a run without loading its steps."""

    run_id: str
    job: str
    status: str
    session_user: str
    created_at: float
    ended_at: float | None
    steps_total: int
    steps_succeeded: int

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)
