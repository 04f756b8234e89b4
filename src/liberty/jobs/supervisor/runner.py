"""The `Supervisor`: runs jobs (steps in order, attempts under the retry policy).

One Supervisor owns the history store, the connectors, the log flusher and the
cancel poller; any number of runs execute concurrently inside its nursery.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs
import psutil
import trio

from .._notnow import NOT_NOW
from ..config import Job, Step
from ..errors import ConfigError, UsageError
from ..history import AttemptRecord, HistoryStore, LogLine, RunView
from ..protocol import PROTOCOL_VERSION, Start
from ..types import Status
from .logsink import LogSink
from .processes import become_subreaper
from .containment import Containment
from .session import AttemptOutcome, AttemptSession
from .spawn import ChildHandle, child_environment, spawn_child
from .warm import SparePool
from .zygote import Zygote, ZygoteError

_log = logging.getLogger(__name__)
_T = TypeVar("_T")
StartMode = Literal["zygote", "spawn"]

CANCEL_POLL_INTERVAL = 0.2
SWITCH_INTERVAL = 0.0005
MAX_STEPS_INLINE = 100  # a run's history writes go on the event loop while its rows are few (`_write_history`)

Run = RunView


@attrs.define
class RunHandle:
    """A run started with `Supervisor.start`; `await handle.wait()` for its record."""

    run_id: str
    job: Job
    cancel_event: trio.Event = attrs.field(factory=trio.Event)  # set it with `request_cancel()`, which also wakes the attempt
    finished: trio.Event = attrs.field(factory=trio.Event)
    _supervisor: Supervisor | None = None
    record: RunView | None = None  # the finished run, read in the same hop that finished it
    _cleanups: list[trio.Event] = attrs.field(factory=list)  # its attempts' cgroups and work dirs being removed
    _cancel_listeners: list[Callable[[], None]] = attrs.field(factory=list)  # the running attempt's wake-up
    _recorded: trio.Event = attrs.field(factory=trio.Event)  # `start` wrote its row (or failed to: `_unrecorded`)
    _unrecorded: bool = False

    def request_cancel(self) -> None:
        """Set the cancel flag and wake the running attempt at once (it waits on nothing else)."""
        self.cancel_event.set()
        for listener in list(self._cancel_listeners):
            listener()

    async def wait(self) -> RunView:
        await self.finished.wait()
        if self.record is not None:
            return self.record
        assert self._supervisor is not None
        return await self._supervisor.get_run(self.run_id)


class _Unrecorded(Exception):
    """The run's row could not be written (`start` raises why): the run stops and writes nothing."""


async def _recorded(handle: RunHandle) -> None:
    """Wait for the run's row, before any other write of the run."""
    await handle._recorded.wait()
    if handle._unrecorded:
        raise _Unrecorded


class Supervisor:
    """Owns everything precious; plugins only ever see a child process and a pipe."""

    def __init__(
        self,
        plugins: str | os.PathLike[str] = "plugins",
        history: str | os.PathLike[str] = ".nomaflow/history.db",
        connectors: str | os.PathLike[str] | None = None,
        *,
        session_user: str = "api",
        on_log: Callable[[LogLine], None] | None = None,
        start_mode: StartMode = "zygote",
        isolation: bool = True,
        spares: int = 4,
    ) -> None:
        if start_mode not in ("zygote", "spawn"):
            raise ConfigError(f"start_mode must be 'zygote' or 'spawn', got {start_mode!r}", key="start_mode")
        if not isinstance(spares, int) or spares < 0:
            raise ConfigError(f"spares must be a whole number >= 0 (0 turns warm spares off), got {spares!r}", key="spares")
        self.start_mode: StartMode = start_mode
        self.start_mode_note = ""
        self._zygote: Zygote | None = None
        self.plugins = Path(plugins).resolve()
        self.containment = Containment(plugins=self.plugins, enabled=isolation)
        self.history_path = str(history)
        self.connectors_path = Path(connectors) if connectors is not None else None
        self.session_user = session_user
        self._listeners = [on_log] if on_log else []
        self._active: dict[str, RunHandle] = {}
        self._sessions: set[AttemptSession] = set()
        self._stack: contextlib.AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None
        self._store: HistoryStore | None = None
        self._sink: LogSink | None = None
        self._connectors: Any | None = None
        self.spares = spares
        self._spares: SparePool | None = None
        self._services: trio.Nursery | None = None
        self._checkpointing = False

    # -- lifecycle --------------------------------------------------------

    async def __aenter__(self) -> Supervisor:
        if not self.plugins.is_dir():
            raise ConfigError(
                "plugins directory not found; create it or point `plugins` in nomaflow.toml at it",
                file=str(self.plugins),
            )
        subreaper = become_subreaper()
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        # The history and cgroup cleanup run on worker threads; at the default 5 ms
        # switch interval each hop can wait that long for the GIL behind the event loop.
        previous_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(previous_interval, SWITCH_INTERVAL))
        stack.callback(sys.setswitchinterval, previous_interval)
        try:
            await self.containment.open()
            stack.push_async_callback(self.containment.close)
            cgroups = self.containment.cgroups
            if self.start_mode == "zygote" and self.containment.enabled and (cgroups is None or not cgroups.enabled):
                self.start_mode = "spawn"
                self.start_mode_note = (
                    "zygote unavailable: without cgroups a forked attempt's daemons cannot be found for killing; "
                    "spawning instead"
                )
                _log.warning(self.start_mode_note)
            if self.start_mode == "zygote":
                if subreaper:
                    self._zygote = Zygote(child_environment(workdir="/"))
                    stack.push_async_callback(self._zygote.aclose)
                    # Its attempts are reaped with their rusage: their peak needs no memory cgroup.
                    # (One spawned after the zygote failed has only the sampled peak then.)
                    self.containment.peak_from_reaper = True
                else:
                    self.start_mode = "spawn"
                    self.start_mode_note = "zygote unavailable: this process cannot be a child subreaper; spawning instead"
                    _log.warning(self.start_mode_note)
            self._store = await trio.to_thread.run_sync(HistoryStore, self.history_path)
            stack.callback(self._store.close)
            await self._mark_lost_runs()
            self._connectors = await self._open_connectors(stack)
            self._sink = LogSink(self._store, self._listeners, write_now=self._write_now)
            services = await stack.enter_async_context(trio.open_nursery())
            stack.callback(services.cancel_scope.cancel)
            self._services = services
            services.start_soon(self._sink.run)
            services.start_soon(self.containment.run_janitor)
            services.start_soon(self._poll_cancels)
            if self.spares > 0:
                self._spares = SparePool(
                    start_child=self._start_child, containment=self.containment, plugins=str(self.plugins), size=self.spares
                )
                await services.start(self._spares.run)
            stack.push_async_callback(self._sink.close)
            # Runs get a nursery of their own, closed first: the log flusher outlives them.
            self._nursery = await stack.enter_async_context(trio.open_nursery())
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        """Normal exit waits for the runs; an exception in the block stops them (recorded as lost).

        The caller's exception is never swallowed: it propagates unchanged.
        """
        assert self._stack is not None and self._nursery is not None
        if exc_type is not None:
            self._nursery.cancel_scope.cancel()
        await self._stack.aclose()

    async def _open_connectors(self, stack: contextlib.AsyncExitStack) -> Any | None:
        if self.connectors_path is None or not self.connectors_path.exists():
            return None
        from ..connectors import ConnectorRegistry, load_connectors

        configs = load_connectors(self.connectors_path, environ=os.environ)
        return await stack.enter_async_context(ConnectorRegistry(configs))

    async def _mark_lost_runs(self) -> None:
        store = self._store
        assert store is not None

        def mark() -> None:
            lost = store.runs_of_dead_supervisors(psutil.pid_exists)
            if lost:
                store.mark_lost(lost, message="the supervisor running this step died (its process is gone)")

        await trio.to_thread.run_sync(mark)

    def _live_pids(self) -> set[int]:
        """Processes no attempt's cleanup may touch: other attempts' roots and the zygote."""
        pids = {s.pid for s in self._sessions if s.pid is not None}
        if self._zygote is not None and self._zygote.pid is not None:
            pids.add(self._zygote.pid)
        if self._spares is not None:
            pids |= self._spares.pids()
        return pids

    async def _start_child(self, *, workdir: str, env: dict[str, str], first: bytes = b"") -> ChildHandle:
        if self._zygote is not None:
            try:
                return await self._zygote.fork(workdir=workdir, env=env, first=first)
            except (ZygoteError, OSError) as exc:
                self.start_mode_note = f"zygote failed ({exc}); this attempt was spawned instead"
                _log.warning(self.start_mode_note)
        return await spawn_child(workdir=workdir, env=env, first=first)

    # -- public API -------------------------------------------------------

    async def run(
        self,
        job: Job,
        params: dict[str, Any] | None = None,
        *,
        session_user: str | None = None,
        run_id: str | None = None,
    ) -> RunView:
        """Run a job to the end and return its record."""
        handle = await self.start(job, params, session_user=session_user, run_id=run_id)
        return await handle.wait()

    async def start(
        self,
        job: Job,
        params: dict[str, Any] | None = None,
        *,
        session_user: str | None = None,
        run_id: str | None = None,
    ) -> RunHandle:
        """Create the run in the history and start it; returns once the run is in the history.

        With a new run id, the first step starts while the run's row is being
        written (a thread hop, most of a warm start's wait otherwise): its log
        lines wait in the sink, and the run's other writes in `_execute`, until
        the row exists.  If it cannot be written, the step is stopped and
        cleaned up, and the error is raised here, with nothing of the run in
        the history.  A `run_id` given by the caller may already be taken, so
        its row is written first and nothing starts if it is refused.
        """
        assert self._nursery is not None and self._store is not None and self._sink is not None, "use `async with Supervisor(...)`"
        ahead = run_id is None  # a fresh random id: only a failing history refuses its row
        run_id = run_id or uuid.uuid4().hex[:12]
        if run_id in self._active:
            raise UsageError(f"run {run_id!r} is already running in this supervisor")
        user = session_user or self.session_user
        store = self._store

        def create() -> None:
            store.create_run(
                run_id,
                job.name,
                session_user=user,
                params={**job.params, **(params or {})},
                steps=[s.name for s in job.steps],
                supervisor_pid=os.getpid(),
                started=True,
            )

        handle = RunHandle(run_id, job, supervisor=self)
        if _inline(job) and self._write_now(create) is not NOT_NOW:
            handle._recorded.set()
            self._launch(handle, params, user)
            return handle
        if not ahead:
            await trio.to_thread.run_sync(create)
            handle._recorded.set()
            self._launch(handle, params, user)
            return handle
        self._sink.hold(run_id)
        self._launch(handle, params, user)
        try:
            await trio.to_thread.run_sync(create)
        except BaseException:
            handle._unrecorded = True
            self._sink.discard(run_id)
            handle._recorded.set()
            handle.request_cancel()
            with trio.CancelScope(shield=True):
                await handle.finished.wait()
            raise
        self._sink.release(run_id)
        handle._recorded.set()
        return handle

    def _write_now(self, work: Callable[[], _T]) -> _T:
        """`HistoryStore.write_now`, and a checkpoint on a worker thread once it is due."""
        store = self._store
        assert store is not None
        result = store.write_now(work)
        if store.checkpoint_due and not self._checkpointing and self._services is not None:
            self._checkpointing = True
            self._services.start_soon(self._checkpoint)
        return result

    async def _checkpoint(self) -> None:
        assert self._store is not None
        try:
            await trio.to_thread.run_sync(self._store.checkpoint)
        except sqlite3.Error as exc:  # the log keeps growing until one succeeds: said, not fatal
            _log.warning("history checkpoint failed (%s); it is retried after further writes", exc)
        finally:
            self._checkpointing = False

    async def _write_history(self, handle: RunHandle, *writes: Callable[[], Any] | None) -> Any:
        """The writes, in order (the last one's result): in one transaction on the event loop when
        the store can take it at once and the run is small, since a hop to a worker thread costs
        more than a run's few rows; otherwise each in its own on a worker thread, as ever."""
        work = _in_order(writes)
        if _inline(handle.job):
            result = self._write_now(work)
            if result is not NOT_NOW:
                return result
        return await trio.to_thread.run_sync(work)

    def _launch(self, handle: RunHandle, params: dict[str, Any] | None, user: str) -> None:
        self._active[handle.run_id] = handle
        self._nursery.start_soon(self._execute, handle, dict(params or {}), user)  # type: ignore[union-attr]

    async def cancel(self, run_id: str) -> bool:
        """Ask a run to stop; works for runs of this supervisor and, via the history, of others."""
        assert self._store is not None
        handle = self._active.get(run_id)
        if handle is not None:
            handle.request_cancel()  # first, so the stop starts before any I/O
        full_id = run_id if handle else await trio.to_thread.run_sync(self._store.resolve_run_id, run_id)
        handle = handle or self._active.get(full_id)
        if handle is not None:
            handle.request_cancel()
        requested = await trio.to_thread.run_sync(self._store.request_cancel, full_id)
        return requested or handle is not None

    async def get_run(self, run_id: str) -> RunView:
        assert self._store is not None
        return await trio.to_thread.run_sync(self._store.get_run, run_id)

    @property
    def store(self) -> HistoryStore:
        assert self._store is not None
        return self._store

    # -- running ----------------------------------------------------------

    async def _poll_cancels(self) -> None:
        store = self._store
        assert store is not None
        while True:
            await trio.sleep(CANCEL_POLL_INTERVAL)
            waiting = [rid for rid, h in self._active.items() if not h.cancel_event.is_set()]
            if not waiting:
                continue
            for rid in await trio.to_thread.run_sync(store.cancel_requested, waiting):
                if rid in self._active:
                    self._active[rid].request_cancel()

    async def _execute(self, handle: RunHandle, overrides: dict[str, Any], user: str) -> None:
        try:
            await self._run_steps(handle, overrides, user)
        except _Unrecorded:
            for cleaned in handle._cleanups:  # `start` raises once nothing of the run is left
                await cleaned.wait()
        finally:
            if self._active.get(handle.run_id) is handle:
                del self._active[handle.run_id]
            handle.finished.set()

    async def _run_steps(self, handle: RunHandle, overrides: dict[str, Any], user: str) -> None:
        store, sink, job = self._store, self._sink, handle.job
        assert store is not None and sink is not None
        step_write: Callable[[], None] | None = None  # the latest step's result, written with what follows it
        try:
            previous: dict[str, dict[str, Any]] = {}
            final = Status.SUCCEEDED
            for index, step in enumerate(job.steps):
                if handle.cancel_event.is_set() and final == Status.SUCCEEDED:
                    final = Status.CANCELLED
                if final != Status.SUCCEEDED:
                    rest = [s.name for s in job.steps[index:]]
                    await _recorded(handle)
                    await self._write_history(handle, step_write, lambda: store.skip_steps(handle.run_id, rest))
                    step_write = None
                    break
                if step_write is not None:
                    await _recorded(handle)
                    await self._write_history(handle, step_write, lambda: store.start_step(handle.run_id, step.name))
                record, step_write = await self._run_step(handle, step, {**job.params, **step.op_kwargs, **overrides}, previous, user)
                previous[step.name] = record
                if record["status"] != Status.SUCCEEDED:
                    final = Status(record["status"])
            await _recorded(handle)
            await sink.flush()

            handle.record = await self._write_history(
                handle, step_write, lambda: store.finish_run(handle.run_id, final), lambda: store.get_run(handle.run_id)
            )
            for cleaned in handle._cleanups:  # removed meanwhile, on the janitor's thread: nothing is left when the run ends
                await cleaned.wait()
        except _Unrecorded:
            raise
        except BaseException:
            with trio.CancelScope(shield=True):
                await handle._recorded.wait()  # the hop that writes the row is never abandoned
                if not handle._unrecorded:
                    await trio.to_thread.run_sync(
                        _in_order((step_write, lambda: store.mark_lost([handle.run_id], message="the supervisor stopped before the run ended")))
                    )
            raise

    async def _run_step(
        self,
        handle: RunHandle,
        step: Step,
        kwargs: dict[str, Any],
        previous: dict[str, dict[str, Any]],
        user: str,
    ) -> tuple[dict[str, Any], Callable[[], None]]:
        """Run the step's attempts; its result, and the history write of it for the caller to make.

        The caller starts the step in the history (the first one starts with its run)
        and makes the write in one thread hop with whatever comes next.
        """
        store = self._store
        assert store is not None
        attempt = 0
        while True:
            attempt += 1
            started = time.time()
            outcome = await self._run_attempt(handle, step, attempt, kwargs, previous, user)
            record: AttemptRecord | None = AttemptRecord(
                run_id=handle.run_id,
                step=step.name,
                attempt=attempt,
                status=outcome.status,
                reason=outcome.reason,
                output=outcome.output,
                error=outcome.error,
                started_at=started,
                ended_at=time.time(),
                wall_s=outcome.wall_s,
                cpu_s=outcome.cpu_s,
                peak_rss_mb=outcome.peak_rss_mb,
                exit_code=outcome.exit_code,
                usage=outcome.usage,
            )
            retryable = outcome.status in (Status.FAILED, Status.TIMED_OUT) and not handle.cancel_event.is_set()
            if not retryable or attempt >= step.retry.max_attempts:
                break
            await _recorded(handle)
            await self._write_history(handle, functools.partial(store.record_attempt, record))
            record = None  # recorded; the step's final write needs only its own
            delay = step.retry.delay_before(attempt + 1)
            await self._system_log(
                handle.run_id, step.name, attempt,
                "WARNING",
                f"attempt {attempt} of {step.retry.max_attempts} ended {outcome.status} ({outcome.reason}); "
                f"retrying in {delay:g} s",
            )
            with trio.move_on_after(delay):
                await handle.cancel_event.wait()
            if handle.cancel_event.is_set():
                outcome = attrs.evolve(outcome, status=Status.CANCELLED)
                break
        error = dict(outcome.error, reason=str(outcome.reason)) if outcome.error else None
        last = record

        written = False

        def finish() -> None:  # the last attempt and the step's result in one thread hop; once
            nonlocal written
            if written:
                return  # the write that failed the run is not repeated by its clean-up either
            written = True
            if last is not None:
                store.record_attempt(last)
            store.finish_step(
                handle.run_id,
                step.name,
                status=outcome.status,
                attempts=attempt,
                output=outcome.output,
                error=error,
                wall_s=outcome.wall_s,
                cpu_s=outcome.cpu_s,
                peak_rss_mb=outcome.peak_rss_mb,
            )

        return {"status": str(outcome.status), "output": outcome.output, "attempts": attempt, "error": error}, finish

    async def _run_attempt(
        self,
        handle: RunHandle,
        step: Step,
        attempt: int,
        kwargs: dict[str, Any],
        previous: dict[str, dict[str, Any]],
        user: str,
    ) -> AttemptOutcome:
        sink = self._sink
        assert sink is not None
        run_id = handle.run_id

        async def emit(level: str, stream: str, message: str) -> None:
            await sink.put(
                LogLine(run_id=run_id, ts=time.time(), level=level, stream=stream, message=message, step=step.name, attempt=attempt)
            )

        async def emit_many(stream: str, entries: list[tuple[str, str]]) -> None:
            await sink.put_lines(run_id, step.name, attempt, stream, entries)

        start = Start(
            version=PROTOCOL_VERSION,
            run_id=run_id,
            job_id=handle.job.name,
            step=step.name,
            attempt=attempt,
            function=step.python,
            params=kwargs,
            session_user=user,
            log_level=handle.job.log_level,
            previous_steps=previous,
            connectors=list(step.connectors),
            max_output_bytes=step.limits.max_output_kb * 1024,
        )
        def on_call(text: str) -> None:
            sink.put_nowait(
                LogLine(run_id=run_id, ts=time.time(), level="DEBUG", stream="system", message=text, step=step.name, attempt=attempt)
            )

        debug = handle.job.log_level == "DEBUG"  # call notes are DEBUG lines: kept only when the run asks
        connectors = (
            self._connectors.session(step.name, step.connectors, on_call=on_call if debug else None)
            if self._connectors
            else None
        )
        async with contextlib.AsyncExitStack() as stack:
            scope = await stack.enter_async_context(connectors) if connectors is not None else None
            session = AttemptSession(
                start=start,
                step=step,
                emit=emit,
                emit_many=emit_many,
                cancel=handle.cancel_event,
                connectors=scope,
                spare_pids=self._live_pids,
                start_child=self._start_child,
                containment=self.containment,
                plugins=str(self.plugins),
            )
            self._sessions.add(session)
            handle._cancel_listeners.append(session.notice_cancel)
            try:
                prepared = await self._spares.claim(step.limits, step.python) if self._spares is not None else None
                outcome = await session.run(prepared)
            finally:
                self._sessions.discard(session)
                handle._cancel_listeners.remove(session.notice_cancel)
                if session.cleaned is not None:
                    handle._cleanups.append(session.cleaned)
        if outcome.error and outcome.status != Status.SUCCEEDED:
            await emit("ERROR", "system", f"attempt {attempt} {outcome.status} ({outcome.reason}): {outcome.error['type']}: {outcome.error['message']}")
        return outcome

    async def _system_log(self, run_id: str, step: str, attempt: int, level: str, message: str) -> None:
        assert self._sink is not None
        await self._sink.put(
            LogLine(run_id=run_id, ts=time.time(), level=level, stream="system", message=message, step=step, attempt=attempt)
        )


def _inline(job: Job) -> bool:
    """Whether a run's history writes may go on the event loop: its rows are few."""
    return len(job.steps) <= MAX_STEPS_INLINE


def _in_order(writes: tuple[Callable[[], Any] | None, ...]) -> Callable[[], Any]:
    """History writes made in one go, in order (None: nothing to write); the last one's result."""
    def all_of() -> Any:
        result = None
        for write in writes:
            if write is not None:
                result = write()
        return result

    return all_of
