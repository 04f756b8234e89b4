"""One attempt of one step: a child process from spawn to reap.

The session owns the child for the attempt's whole life: it pumps protocol
messages (validating every one), drains stdout/stderr into the run log line
by line, serves connector calls, enforces the timeout and the cancel
escalation (flag, then task cancel at half the grace, then kill at the grace),
kills every descendant when the attempt ends, and records usage.  Nothing the
child sends can raise out of here: every failure becomes the attempt's outcome.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import signal
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import psutil
import trio

from .._sysfiles import read_small
from ..config import Step
from ..errors import ProtocolError
from ..protocol.values import BatchBuilder, decode_value, encode_exception, encode_value
from ..protocol import (
    DEFAULT_MAX_LINE,
    Call,
    Cancel,
    ChildMessage,
    Done,
    Failed,
    LineSplitter,
    Log,
    ParentMessage,
    Prepare,
    Prepared,
    Reply,
    Rows,
    Start,
    StreamClose,
    StreamMore,
    StreamOpen,
    decode_child_message,
    encode,
)
from ..protocol.codec import encode_reply, encode_rows_blob, split_log, split_logs
from ..sandbox import sandbox_gaps, sandbox_problem
from ..types import Reason, Status
from .processes import kill_tree, signal_name, stat_fields, tree_pids
from .cgroups import AttemptCgroup, CgroupError
from .containment import Containment
from .spawn import ChildHandle, child_environment, spawn_child
from .warm import PreparedChild, prepared_problem, ready_problem

Emit = Callable[[str, str, str], Awaitable[None]]
"""(level, stream, message) -> appended to the run log; may apply backpressure."""

EmitMany = Callable[[str, list[tuple[str, str]]], Awaitable[None]]
"""(stream, [(level, message), ...]) -> appended to the run log in order, in one go."""

StartChild = Callable[..., Awaitable[ChildHandle]]
"""(workdir=, env=) -> a started child; `spawn_child` or a zygote's `fork`."""

STARTUP_TIMEOUT = 60.0
EXIT_AFTER_RESULT_TIMEOUT = 5.0
OUTPUT_DRAIN_TIMEOUT = 2.0
REPORT_DRAIN_TIMEOUT = 0.05  # after the exit, before the kill: what the pipes still hold is read first
MAX_OUTPUT_LINE = 64 * 1024
STDERR_TAIL_LINES = 20
USAGE_INTERVAL = 1.0
MAX_OUTPUT_DEPTH = 64
STACK_DUMP_WAIT = 0.5
MAX_UNSENT_BATCHES = 4
CREDIT_WAIT_SECONDS = 0.05


@attrs.frozen(kw_only=True)
class AttemptOutcome:
    status: Status
    reason: Reason | None = None
    output: Any = None
    error: dict[str, str] | None = None
    exit_code: int | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    usage: dict[str, Any] = attrs.field(factory=dict)


class _StopKind:
    TIMEOUT = "timeout"
    CANCEL = "cancel"


class AttemptSession:
    def __init__(
        self,
        *,
        start: Start,
        step: Step,
        emit: Emit,
        emit_many: EmitMany,
        cancel: trio.Event,
        connectors: Any | None = None,
        spare_pids: Callable[[], set[int]] = set,
        start_child: StartChild = spawn_child,
        containment: Containment | None = None,
        plugins: str,
    ) -> None:
        self._start_child = start_child
        self._containment = containment
        self._group: AttemptCgroup | None = None
        self._group_usage: dict[str, Any] = {}
        self._joined = False  # the child said it is in its cgroup
        self._start_sent = False
        self._group_killed = False
        self._sandbox_report: dict[str, Any] | None = None
        self._refusal: tuple[Reason, str, str] | None = None  # (reason, type, message): the supervisor stopped it
        self._start = start
        self._step = step
        self._emit_raw = emit
        self._emit_many = emit_many
        self._cancel = cancel
        self._connectors = connectors
        self._spare_pids = spare_pids
        self._max_line = max(DEFAULT_MAX_LINE, start.max_output_bytes + 4096)
        self._token = uuid.uuid4().hex
        self._send_lock = trio.Lock()
        self._send_broken = False
        self._ready = trio.Event()
        self._wake = trio.Event()  # poked by every change `_drive` may wait for (see `_until`)
        self._prepared = _Signal(self._poke)  # the child reported its sandbox and waits for `start`
        self._prepare_msg = Prepare(plugins=plugins)  # cold start: its sandbox is filled in by `run`
        self._settled = _Signal(self._poke)
        self._exited = trio.Event()
        self._protocol_eof = trio.Event()
        self._result: Done | Failed | None = None
        self._violation: str | None = None
        self._stop: str | None = None
        self._stop_note = ""
        self._calls: set[int] = set()
        self._streams: dict[int, _ServedStream] = {}
        self._ended_streams: set[int] = set()  # the child may still grant credit or close: its messages cross ours
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._log_bytes = 0
        self._log_cap = step.limits.max_log_mb * 1024 * 1024
        self._log_dropped = 0
        self._seen: dict[int, psutil.Process] = {}
        self._peak_rss = 0
        self._cpu_s = 0.0
        self._max_procs = 1
        self._pumps_left = 2
        self._pumps_done = trio.Event()
        self._watchdog: str | None = None
        self._stack_dump: list[str] | None = None
        self.pid: int | None = None
        self.cleaned: trio.Event | None = None  # set once the cgroup and work directory are gone

    # -- the attempt ------------------------------------------------------

    async def run(self, prepared: PreparedChild | None = None) -> AttemptOutcome:
        """Run the attempt: in `prepared` (a warm spare, already contained and sealed) or in a child started now."""
        t0 = time.monotonic()
        if prepared is not None:
            workdir, child = prepared.workdir, prepared.child
            self._token, self._group = prepared.token, prepared.group
            self._ready.set()
            self._prepared.set()
        elif self._containment is not None:
            workdir = self._containment.workdirs.take()
        else:
            workdir = tempfile.mkdtemp(prefix="nomaflow-step-")
        returncode: int | None = None
        try:
            if prepared is None:
                env = child_environment(workdir=workdir, token=self._token)
                try:
                    child = await self._start_child(workdir=workdir, env=env)
                except OSError as exc:
                    return AttemptOutcome(
                        status=Status.FAILED,
                        reason=Reason.CRASHED,
                        error={"type": type(exc).__name__, "message": f"could not start the child interpreter: {exc}", "traceback": ""},
                        wall_s=time.monotonic() - t0,
                    )
            self.pid = child.pid
            self._child_stream = child.to_child
            try:
                if prepared is not None:
                    await self._accept_report(prepared.report)
                else:
                    sandbox = None
                    if self._containment is not None:
                        await self._contain()
                        try:
                            sandbox = self._containment.sandbox_spec(self._step.limits, workdir, self._group)
                        except OSError as exc:
                            self._refuse(Reason.SANDBOX, "SandboxError", f"could not prepare the step's sandbox: {exc}")
                    self._prepare_msg = attrs.evolve(self._prepare_msg, sandbox=sandbox)
                if prepared is not None and self._refusal is None:
                    # A spare waits for nothing else: `start` goes out before the tasks below
                    # are set up, and whatever the step writes meanwhile waits in the pipes.
                    await self._send_start()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump_output, child.stdout, "stdout")
                    nursery.start_soon(self._pump_output, child.stderr, "stderr")
                    nursery.start_soon(self._read_protocol, child, nursery)
                    nursery.start_soon(self._watch_exit, child)
                    nursery.start_soon(self._sample_usage, child.pid)
                    if self._refusal is None:
                        await self._drive(child, t0)
                    self._kill(child)
                    with trio.move_on_after(OUTPUT_DRAIN_TIMEOUT):
                        await self._pumps_done.wait()
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    self._kill(child)
                    try:
                        returncode = await child.wait()
                        self._peak_rss = max(self._peak_rss, child.max_rss_bytes or 0)
                    except ChildProcessError as exc:
                        await self._note("WARNING", f"could not collect the child's exit status: {exc}")
                    await child.aclose()
                    if self._group is not None:
                        self._group_usage = self._group.usage()  # a few small reads, before the janitor removes it
        finally:
            if self._containment is not None:
                self.cleaned = self._containment.discard(self._group, workdir)
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        if self._log_dropped:
            await self._emit_raw(
                "WARNING", "system", f"{self._log_dropped} log lines dropped past the {self._step.limits.max_log_mb} MiB log cap"
            )
        return self._outcome(returncode, time.monotonic() - t0)

    async def _contain(self) -> None:
        """A cgroup of its own, which the child joins (makes, if planned) on `prepare`, before any plugin code."""
        assert self._containment is not None
        name = f"{self._start.run_id}-{self._start.step}-{self._start.attempt}-{self._token[:8]}"
        try:
            self._group = await self._containment.cgroup_for(name, self._step.limits)
        except (CgroupError, OSError, ValueError) as exc:
            self._refuse(Reason.SANDBOX, "SandboxError", f"could not put the step in its own cgroup: {exc}")

    async def _accept_report(self, report: dict[str, Any] | None) -> None:
        """The child's sandbox report: refuse to run the step on a broken sandbox, note a known gap."""
        self._sandbox_report = report
        if report is None:
            return
        if self._group is not None and self._containment is not None:
            self._joined = self._containment.joined(self._group, report)
        problem = sandbox_problem(report)
        if problem:
            self._refuse(Reason.SANDBOX, "SandboxError", f"the sandbox could not be applied, so the step was not run: {problem}")
            return
        pids_capped = self._group is not None and self._group.pids_limit is not None
        gaps = sandbox_gaps(report, pids_capped=pids_capped)
        if gaps:  # a known fallback, said once per attempt rather than silently
            await self._note("WARNING", f"sandbox: {gaps}")

    def _refuse(self, reason: Reason, type_: str, message: str) -> None:
        if self._refusal is None:
            self._refusal = (reason, type_, message)
        self._settled.set()

    async def _drive(self, child: ChildHandle, t0: float) -> None:
        if not self._prepared.is_set():
            # Cold: `prepare` and `start` go out together, without waiting for `ready` (the
            # pipe holds them).  The child runs no plugin code in a sandbox its own report
            # calls broken, and the report is judged here again when it comes.
            start = self._start_line()
            if start is None:
                return
            self._start_sent = True
            await self._send_bytes(encode(self._prepare_msg, max_line=self._max_line) + start)
            with trio.move_on_after(STARTUP_TIMEOUT):
                await self._until(lambda: self._prepared.is_set() or self._settled.is_set())
            if self._settled.is_set():
                return
            if not self._prepared.is_set():
                self._protocol_violation(f"no 'ready' and 'prepared' within {STARTUP_TIMEOUT:.0f} s of start")
                return
        if not self._start_sent and not await self._send_start():
            return
        deadline = t0 + self._step.timeout_seconds
        with trio.move_on_at(trio.current_time() + max(0.0, deadline - time.monotonic())):
            await self._until(lambda: self._settled.is_set() or self._cancel.is_set())
        if not self._settled.is_set():
            await self._escalate(_StopKind.CANCEL if self._cancel.is_set() else _StopKind.TIMEOUT)
        if self._result is not None and not self._exited.is_set():
            with trio.move_on_after(EXIT_AFTER_RESULT_TIMEOUT):
                await self._exited.wait()

    def notice_cancel(self) -> None:
        """The run's cancel flag was just set (`RunHandle.request_cancel`)."""
        self._poke()

    def _poke(self) -> None:
        self._wake.set()

    async def _until(self, done: Callable[[], bool]) -> None:
        """Wait until `done()` holds.  Cheaper than a task per condition; `_drive` is the only waiter,
        and whatever `done` reads pokes `_wake` when it changes."""
        while not done():
            self._wake = trio.Event()
            await self._wake.wait()

    async def _send_start(self) -> bool:
        self._start_sent = True
        start = self._start_line()
        if start is None:
            return False
        await self._send_bytes(start)
        return True

    def _start_line(self) -> bytes | None:
        """`start`, encoded; None, the attempt refused, if its params cannot be."""
        try:
            return encode(self._start, max_line=self._max_line)
        except ProtocolError as exc:
            self._refuse(Reason.EXCEPTION, "InvalidParams", f"the step's start message cannot be sent: {exc}")
            return None

    async def _escalate(self, kind: str) -> None:
        self._stop = kind
        grace = self._step.cancel_grace_seconds
        what = f"timed out after {self._step.timeout_seconds:g} s" if kind == _StopKind.TIMEOUT else "cancel requested"
        await self._note("WARNING", f"{what}; asking the step to stop (grace {grace:g} s)")
        await self._send(Cancel(stage="flag"), timeout=max(grace / 4, 0.05))
        with trio.move_on_after(grace / 2):
            await self._settled.wait()
        if self._settled.is_set():
            self._stop_note = "it stopped cooperatively"
            return
        await self._note("WARNING", f"still running after {grace / 2:g} s; cancelling the step's task")
        await self._send(Cancel(stage="task"), timeout=max(grace / 4, 0.05))
        with trio.move_on_after(grace / 2):
            await self._settled.wait()
        if self._settled.is_set():
            self._stop_note = "its task was cancelled"
            return
        await self._note("WARNING", f"still running after the {grace:g} s grace period; killing its process tree")
        self._stop_note = f"its process tree was killed after the {grace:g} s grace period"
        await self._dump_stacks()

    async def _dump_stacks(self) -> None:
        """Ask the child for its threads' stacks (faulthandler on SIGUSR1) so the record shows where it stopped."""
        if self.pid is None:
            return
        self._stack_dump = []
        try:
            os.kill(self.pid, signal.SIGUSR1)
        except ProcessLookupError:
            return
        with trio.move_on_after(STACK_DUMP_WAIT):
            while not any(line.startswith("  File") for line in self._stack_dump):
                await trio.sleep(0.02)
            await trio.sleep(0.05)

    def _kill(self, child: ChildHandle) -> None:
        if self._group_killed:
            return  # the kernel took the whole population and nothing joins the cgroup after `prepare`
        if self._group is not None:
            # The whole population, daemons that left the tree included; the tree is
            # still walked unless the child has joined the cgroup (it does on `prepare`).
            if self._group.kill() and self._joined:
                self._group_killed = True
                return
        kill_tree(
            child.pid,
            token=None if self._group is not None else self._token,
            known=self._seen.values(),
            spare=self._spare_pids() - {child.pid},
        )

    # -- outcome ----------------------------------------------------------

    def _limit_hit(self, returncode: int | None) -> str | None:
        """Which limit stopped or hampered the step, from the kernel's evidence."""
        limits = self._step.limits
        g = self._group_usage
        if (g.get("oom_kills") or 0) > 0 or self._watchdog == "memory":
            return "memory"
        if limits.cpu_seconds and (
            returncode == -signal.SIGXCPU or (returncode == -signal.SIGKILL and self._cpu_s >= limits.cpu_seconds)
        ):
            return "cpu"
        if (g.get("pids_limit_hits") or 0) > 0:
            return "processes"
        if isinstance(self._result, Failed):
            for marker, hit in (("[Errno 27]", "file_size"), ("[Errno 24]", "open_files")):
                if marker in self._result.message:
                    return hit
        return None

    def _outcome(self, returncode: int | None, wall_s: float) -> AttemptOutcome:
        g = self._group_usage
        peak = max(self._peak_rss, g.get("peak_memory_bytes") or 0)
        limit_hit = self._limit_hit(returncode)
        usage: dict[str, Any] = {
            "max_processes": max(self._max_procs, g.get("pids_peak") or 0),
            "exit": signal_name(returncode) if returncode is not None else None,
            "limit_hit": limit_hit,
            "cgroup": self._group is not None,
        }
        if self._sandbox_report is not None:
            usage["sandbox"] = {k: v.get("applied") for k, v in self._sandbox_report.items() if isinstance(v, dict)}
        common = dict(
            exit_code=returncode,
            wall_s=round(wall_s, 4),
            cpu_s=round(max(self._cpu_s, g.get("cpu_seconds") or 0.0), 4),
            peak_rss_mb=round(peak / (1024 * 1024), 2),
            usage=usage,
        )
        trace = self._result.traceback if isinstance(self._result, Failed) else ""
        if not trace and self._stack_dump:
            trace = "Stacks when it was killed (faulthandler):\n" + "\n".join(self._stack_dump)
        if self._refusal is not None and self._stop is None:
            reason, type_, message = self._refusal
            return AttemptOutcome(status=Status.FAILED, reason=reason, error=_error(type_, message, ""), **common)
        if limit_hit in ("memory", "cpu") and self._stop is None and not isinstance(self._result, Done):
            limits = self._step.limits
            message = (
                f"step exceeded limits.memory_mb={limits.memory_mb} (killed by the out-of-memory killer)"
                if limit_hit == "memory"
                else f"step exceeded limits.cpu_seconds={limits.cpu_seconds:g} of CPU time ({signal_name(returncode or 0)})"
            )
            type_ = "MemoryLimitExceeded" if limit_hit == "memory" else "CpuLimitExceeded"
            return AttemptOutcome(
                status=Status.FAILED, reason=Reason(limit_hit), error=_error(type_, message, trace), **common
            )
        if self._stop == _StopKind.TIMEOUT:
            msg = f"step exceeded timeout_seconds={self._step.timeout_seconds:g}; {self._stop_note or 'it ended'}"
            return AttemptOutcome(
                status=Status.TIMED_OUT, reason=Reason.TIMEOUT, error=_error("TimeoutError", msg, trace), **common
            )
        if self._stop == _StopKind.CANCEL:
            msg = f"cancelled by request; {self._stop_note or 'it ended'}"
            return AttemptOutcome(
                status=Status.CANCELLED, reason=Reason.CANCELLED, error=_error("CancelledError", msg, trace), **common
            )
        if self._violation is not None:
            return AttemptOutcome(
                status=Status.FAILED,
                reason=Reason.PROTOCOL,
                error=_error("ProtocolError", f"the child broke the protocol: {self._violation}; it was killed", ""),
                **common,
            )
        if isinstance(self._result, Done):
            return AttemptOutcome(status=Status.SUCCEEDED, output=self._result.output, **common)
        if isinstance(self._result, Failed):
            reason = Reason.OUTPUT if self._result.kind == "output" else Reason.EXCEPTION
            return AttemptOutcome(
                status=Status.FAILED,
                reason=reason,
                error=_error(self._result.type, self._result.message, self._result.traceback),
                **common,
            )
        how = signal_name(returncode) if returncode is not None else "unknown status"
        tail = "\n".join(self._stderr_tail)
        msg = f"the step's process ended without a result ({how})"
        if tail:
            msg += f"; last stderr lines:\n{tail}"
        return AttemptOutcome(status=Status.FAILED, reason=Reason.CRASHED, error=_error("ChildCrashed", msg, ""), **common)

    # -- protocol ---------------------------------------------------------

    async def _read_protocol(self, child: ChildHandle, nursery: trio.Nursery) -> None:
        splitter = LineSplitter(self._max_line)
        try:
            await self._read_lines(child, nursery, splitter)
        finally:
            self._protocol_eof.set()

    async def _read_lines(self, child: ChildHandle, nursery: trio.Nursery, splitter: LineSplitter) -> None:
        # A log line is acceptable wherever `_handle` accepted the one before it: only the
        # other messages move the state it checks.  So after one, a run of well-formed log
        # lines skips `_handle` and goes to the run log together; any other line is decoded
        # and handled one by one as before.
        accepting = False
        try:
            while True:
                data = await child.from_child.receive_some(65536)
                if not data:
                    splitter.close()
                    return
                lines = splitter.feed(data)
                if accepting and lines:
                    entries = split_logs(lines)
                    if entries is not None:  # the usual read of a chatty step: all of it log lines
                        await self._log_many("log", entries)
                        continue
                logs: list[tuple[str, str]] = []
                for line in lines:
                    if accepting:
                        entry = split_log(line)
                        if entry is not None:
                            logs.append(entry)
                            continue
                    try:
                        msg = decode_child_message(line)
                    except ProtocolError:
                        await self._log_many("log", logs)  # what came before the bad line is kept
                        raise
                    if logs:
                        await self._log_many("log", logs)
                        logs = []
                    await self._handle(msg, nursery)
                    if self._violation is not None:
                        return
                    accepting = type(msg) is Log
                if logs:
                    await self._log_many("log", logs)
        except ProtocolError as exc:
            self._protocol_violation(str(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    def _protocol_violation(self, message: str) -> None:
        if self._violation is None:
            self._violation = message
        self._settled.set()

    async def _handle(self, msg: ChildMessage, nursery: trio.Nursery) -> None:
        if not self._ready.is_set():
            assert self.pid is not None
            problem = ready_problem(msg, self.pid)
            if problem:
                return self._protocol_violation(problem)
            self._ready.set()
            return None
        if self._result is not None:
            return self._protocol_violation(f"{type(msg).__name__.lower()} message after the step's result")
        if not self._prepared.is_set():
            problem = prepared_problem(msg, sandbox=self._prepare_msg.sandbox)
            if problem:
                return self._protocol_violation(problem)
            await self._accept_report(msg.report)
            self._prepared.set()
            return None
        if isinstance(msg, Prepared):
            return self._protocol_violation("unexpected 'prepared' message")
        if isinstance(msg, Log):
            await self._log(msg.level, "log", msg.message)
        elif isinstance(msg, Call):
            if msg.id in self._calls:
                return self._protocol_violation(f"call id {msg.id} reused while still pending")
            try:
                args, kwargs = decode_value(msg.args), decode_value(msg.kwargs)
            except ProtocolError as exc:
                return self._protocol_violation(f"call {msg.id}: {exc}")
            data = self._answer_now(msg, args, kwargs)
            if data is None:
                self._calls.add(msg.id)
                nursery.start_soon(self._serve_call, msg, args, kwargs)
            elif data:
                await self._send_bytes(data)
        elif isinstance(msg, StreamOpen):
            if msg.id in self._streams or msg.id in self._ended_streams or msg.credit < 1 or msg.batch_size < 1:
                return self._protocol_violation(f"bad stream_open (id {msg.id}, credit {msg.credit}, batch {msg.batch_size})")
            stream = _ServedStream(msg)
            self._streams[msg.id] = stream
            nursery.start_soon(self._serve_stream, stream)
        elif isinstance(msg, (StreamMore, StreamClose)) and msg.id in self._ended_streams:
            return None
        elif isinstance(msg, StreamMore):
            stream = self._streams.get(msg.id)
            if stream is None or msg.credit < 1:
                return self._protocol_violation(f"stream_more for unknown stream {msg.id} or bad credit {msg.credit}")
            stream.grant(msg.credit)
        elif isinstance(msg, StreamClose):
            stream = self._streams.get(msg.id)
            if stream is None:
                return self._protocol_violation(f"stream_close for unknown stream {msg.id}")
            stream.close()
        elif isinstance(msg, Done):
            size = len(json.dumps(msg.output, ensure_ascii=False).encode("utf-8"))
            depth = _depth(msg.output)
            if depth > MAX_OUTPUT_DEPTH:
                self._result = Failed(
                    kind="output",
                    type="OutputError",
                    message=f"step output is nested {depth} levels deep, over the {MAX_OUTPUT_DEPTH}-level cap; return a flatter structure",
                )
            elif size > self._start.max_output_bytes:
                self._result = Failed(
                    kind="output",
                    type="OutputError",
                    message=f"step output is {size} bytes, over the {self._start.max_output_bytes}-byte cap (limits.max_output_kb)",
                )
            else:
                self._result = msg
            self._settled.set()
        elif isinstance(msg, Failed):
            self._result = msg
            self._settled.set()
        else:
            return self._protocol_violation(f"unexpected {type(msg).__name__.lower()} message")
        return None

    async def _send(self, msg: ParentMessage, *, timeout: float | None = None) -> None:
        await self._send_bytes(encode(msg, max_line=self._max_line), timeout=timeout)

    async def _send_bytes(self, data: bytes, *, timeout: float | None = None) -> None:
        """Send one encoded line; a send cut short leaves a partial line, so the pipe is then given up."""
        if self._send_broken or self._child_stream is None:
            return
        stream = self._child_stream
        if not self._send_lock.locked():
            # Fast path, no scheduling point: the whole line fits in the pipe right now.
            try:
                sent = os.write(stream.fileno(), data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._send_broken = True
                return
            if sent == len(data):
                return
            data = data[sent:]
            if sent:
                # Part of the line is out: the rest must follow before anything else.
                self._send_lock.acquire_nowait()
                try:
                    await self._send_rest(stream, data, timeout)
                finally:
                    self._send_lock.release()
                return
        async with self._send_lock:
            await self._send_rest(stream, data, timeout)

    async def _send_rest(self, stream: trio.lowlevel.FdStream, data: bytes, timeout: float | None) -> None:
        if self._send_broken:
            return
        with trio.CancelScope() as scope:
            if timeout is not None:
                scope.deadline = trio.current_time() + timeout
            try:
                await stream.send_all(data)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        self._send_broken = True

    _child_stream: trio.lowlevel.FdStream | None = None

    # -- connectors -------------------------------------------------------

    def _answer_now(self, msg: Call, args: Any, kwargs: Any) -> bytes | None:
        """The reply to a call the connector answers without waiting (`describe`, or
        `ConnectorSession.call_now`: an in-memory SQLite statement), or None to serve it as a task.

        No task, no cancel scope: for a quick call those cost more than the statement.
        """
        if self._connectors is None:
            return None
        try:
            if msg.method == "describe":
                result = self._connectors.describe(msg.connector)
            else:
                result = self._connectors.call_now(msg.connector, msg.method, args, kwargs, tx=msg.tx)
        except Exception as exc:
            return self._reply_line(msg, error=exc)
        if result is self._connectors.NOT_NOW:
            return None
        return self._reply_line(msg, result)

    async def _serve_call(self, msg: Call, args: Any, kwargs: Any) -> None:
        try:
            if self._connectors is None:
                raise LookupError(
                    f"connector {msg.connector!r} is not configured: no connectors file was loaded "
                    "(declare it in connectors.toml)"
                )
            result = await self._connectors.call(msg.connector, msg.method, args, kwargs, tx=msg.tx, now=False)
        except Exception as exc:
            data = self._reply_line(msg, error=exc)
        else:
            data = self._reply_line(msg, result)
        self._calls.discard(msg.id)
        if data:
            await self._send_bytes(data)

    def _reply_line(self, msg: Call, result: Any = None, *, error: Exception | None = None) -> bytes:
        """The `reply` line to a call; b"" if the call broke the protocol (the violation is recorded)."""
        if error is None:
            try:
                value = encode_value(result)
                return _fits(
                    lambda: encode_reply(msg.id, value, max_line=self._max_line),
                    f"the result of {msg.connector}.{msg.method}()",
                    "use stream() or select fewer rows",
                )
            except Exception as exc:
                error = exc
        if isinstance(error, ProtocolError):  # the child's arguments or ids were invalid
            self._protocol_violation(f"call {msg.id}: {error}")
            return b""
        # A connector's failure goes back to the plugin as its own type.
        return encode(Reply(id=msg.id, ok=False, error=encode_exception(error)), max_line=self._max_line)

    async def _serve_stream(self, stream: _ServedStream) -> None:
        sid: int | None = None
        try:
            if self._connectors is None:
                raise LookupError(f"connector {stream.open.connector!r} is not configured: no connectors file was loaded")
            sid = await self._connectors.stream_open(
                stream.open.connector,
                stream.open.sql,
                decode_value(stream.open.params),
                stream.open.batch_size,
                tx=stream.open.tx,
            )
            failure: Exception | None = None
            finished = False
            send_line, lines = trio.open_memory_channel[bytes](math.inf)  # bounded by `_ServedStream.take`
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_batches, stream, lines)
                with send_line:
                    try:
                        finished = await self._pump_stream(stream, sid, send_line.send_nowait)
                    except Exception as exc:  # raised after the batches already encoded went out
                        failure = exc
            if failure is not None:
                raise failure
            if finished:
                await self._send(Rows(id=stream.open.id, done=True))
        except ProtocolError as exc:
            self._protocol_violation(f"stream {stream.open.id}: {exc}")
        except Exception as exc:  # the driver's error reaches the plugin's `async for`
            await self._send(Rows(id=stream.open.id, done=True, error=encode_exception(exc)))
        finally:
            self._streams.pop(stream.open.id, None)
            self._ended_streams.add(stream.open.id)
            if sid is not None and self._connectors is not None:
                with trio.CancelScope(shield=True):
                    await self._connectors.stream_close(sid)

    async def _pump_stream(self, stream: _ServedStream, sid: int, send: Callable[[bytes], None]) -> bool:
        """Batches go out as the worker thread encodes them; True once the stream is exhausted."""
        assert self._connectors is not None
        new_sink = functools.partial(_RowsLine, self._max_line, stream.open)
        while True:
            await stream.ready()
            if stream.close_requested:
                return False
            if await self._connectors.stream_pump(sid, new_sink, stream.take, send):
                return True

    async def _send_batches(self, stream: _ServedStream, lines: trio.MemoryReceiveChannel[bytes]) -> None:
        async with lines:
            async for line in lines:
                await self._send_bytes(line)
                stream.sent()

    # -- output, usage, exit ---------------------------------------------

    async def _note(self, level: str, message: str) -> None:
        await self._emit_raw(level, "system", message)

    async def _log(self, level: str, stream: str, message: str) -> None:
        size = len(message) + 1
        if self._log_bytes + size > self._log_cap:
            if self._log_dropped == 0:
                await self._emit_raw(
                    "WARNING",
                    "system",
                    f"log cap of {self._step.limits.max_log_mb} MiB reached (limits.max_log_mb); "
                    "further lines of this attempt are dropped",
                )
            self._log_dropped += 1
            return
        self._log_bytes += size
        await self._emit_raw(level, stream, message)

    async def _log_many(self, stream: str, entries: list[tuple[str, str]]) -> None:
        """`_log` for a run of lines of one stream: the lines under the cap go out together."""
        room = self._log_cap - self._log_bytes
        kept = 0
        for _, message in entries:
            if len(message) + 1 > room:
                break
            room -= len(message) + 1
            kept += 1
        self._log_bytes = self._log_cap - room
        taken = entries if kept == len(entries) else entries[:kept]
        if taken:
            await self._emit_many(stream, taken)
        for level, message in entries[kept:]:
            await self._log(level, stream, message)  # past the cap: dropped and counted (or a smaller one fits)

    async def _pump_output(self, stream: trio.abc.ReceiveStream, name: str) -> None:
        level = "INFO" if name == "stdout" else "WARNING"
        rest = b""
        try:
            while True:
                try:
                    data = await stream.receive_some(65536)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    data = b""
                if not data:
                    break
                lines, rest = _output_lines(rest + data)
                if lines:
                    await self._output_lines(level, name, lines)
            if rest:
                await self._output_lines(level, name, [rest.decode("utf-8", "replace")])
        finally:
            self._pumps_left -= 1
            if self._pumps_left == 0:
                self._pumps_done.set()

    async def _output_lines(self, level: str, name: str, lines: list[str]) -> None:
        if name == "stderr":
            self._stderr_tail.extend(lines)
            if self._stack_dump is not None:
                self._stack_dump.extend(lines[: max(0, 400 - len(self._stack_dump))])
        await self._log_many(name, [(level, line) for line in lines])

    async def _watch_exit(self, child: ChildHandle) -> None:
        pid = child.pid
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._exited.set()
            self._settled.set()
            return
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        self._sample_cpu(pid)
        # Its pipes are usually at EOF by now: once the reader has taken what is left in them
        # (the sandbox report among it, on a start that quick), the cgroup alone kills what
        # the step left behind, and no process tree need be walked.
        with trio.move_on_after(REPORT_DRAIN_TIMEOUT):
            await self._protocol_eof.wait()
        # The step's process is gone; whatever it left behind would only hold its pipes open.
        self._kill(child)
        # Lines written just before exit may still sit in the pipe; a forked
        # grandchild can hold the pipe open, so the wait for EOF is bounded.
        with trio.move_on_after(OUTPUT_DRAIN_TIMEOUT):
            await self._protocol_eof.wait()
        self._exited.set()
        self._settled.set()

    def _sample_cpu(self, pid: int) -> None:
        """utime+stime+cutime+cstime from /proc/<pid>/stat (still readable while a zombie)."""
        fields = stat_fields(pid)
        try:
            ticks = sum(int(x) for x in fields[11:15]) if fields else 0
        except ValueError:
            return
        self._cpu_s = max(self._cpu_s, ticks / _CLK_TCK)

    async def _sample_usage(self, pid: int) -> None:
        """Peak memory, CPU and process count, sampled cheaply (fast at first, then every second)."""
        interval = 0.05
        if self._group is not None:
            # Its cgroup counts CPU (and memory and processes, under a limit), and the reaper gets
            # the peak of the step's process and of what it waited for: nothing to catch at once.
            await trio.sleep(interval)
        while not self._exited.is_set():
            pids = tree_pids(pid)
            rss = _vm_hwm(pid)
            for other in pids[1:]:
                rss += _rss(other)
                if other not in self._seen:
                    try:
                        self._seen[other] = psutil.Process(other)
                    except psutil.Error:
                        pass
            self._max_procs = max(self._max_procs, len(pids))
            self._peak_rss = max(self._peak_rss, rss)
            limit = self._step.limits.memory_mb
            if limit and (self._group is None or self._group.memory_limit_bytes is None) and rss > limit * 1024 * 1024:
                self._watchdog = "memory"  # no cgroup to enforce it: the RSS watchdog does
                self._settled.set()
                return
            self._sample_cpu(pid)
            await trio.sleep(interval)
            interval = min(interval * 2, USAGE_INTERVAL)

class _RowsLine:
    """One batch of a stream, built on the connector's worker thread into the `rows` line to send."""

    def __init__(self, max_line: int, open_msg: StreamOpen, value_types: frozenset[type] | None) -> None:
        self._max_line = max_line
        self._open = open_msg
        self._batch = BatchBuilder(value_types)
        self.add = self._batch.add

    def finish(self, columns: list[str]) -> bytes:
        batch, rows = self._batch, Rows(id=self._open.id, columns=columns)

        def line() -> bytes:
            if (blob := batch.blob()) is not None:
                return encode_rows_blob(rows, blob, max_line=self._max_line)
            packed, tagged = batch.packed_rows()
            return encode(attrs.evolve(rows, rows=packed, tagged=tagged), max_line=self._max_line)

        return _fits(line, f"a batch of {batch.count} rows from {self._open.connector}", "lower batch_size")


def _fits(line: Callable[[], bytes], what: str, advice: str) -> bytes:
    """A reply's or a batch's line; one over the line cap is the plugin's error to handle, not a crash."""
    try:
        return line()
    except ProtocolError as exc:
        raise ValueError(f"{what} cannot be sent to the step: {exc}; {advice}") from None


class _ServedStream:
    """Credit-based flow control: at most `credit` batches in flight to the child.

    The connector's worker thread takes credit itself (`take`), so it can fetch
    the next batch while the last is being written, and it waits a moment for
    credit rather than give its thread back between batches.  Whatever credit
    a child grants, at most `MAX_UNSENT_BATCHES` encoded batches wait for the
    pipe: a child that stops reading cannot make the supervisor buffer the table.
    """

    def __init__(self, open_msg: StreamOpen) -> None:
        self.open = open_msg
        self.close_requested = False
        self._cond = threading.Condition(threading.Lock())
        self._credit = open_msg.credit
        self._unsent = 0
        self._wake = trio.Event()

    def grant(self, n: int) -> None:
        with self._cond:
            self._credit += n
            self._cond.notify()
        self._wake.set()

    def close(self) -> None:
        with self._cond:
            self.close_requested = True
            self._cond.notify()
        self._wake.set()

    def sent(self) -> None:
        """One batch went into the pipe."""
        with self._cond:
            self._unsent -= 1
            self._cond.notify()
        self._wake.set()

    def take(self) -> bool:
        """On the worker thread, before each fetch: may one more batch be produced?

        Waits up to `CREDIT_WAIT_SECONDS` for a child that is merely busy; not
        at all in a transaction, whose connection the step's other calls share.
        """
        wait = 0.0 if self.open.tx is not None else CREDIT_WAIT_SECONDS
        with self._cond:
            if not self._cond.wait_for(self._may_take, wait) or self.close_requested:
                return False
            self._credit -= 1
            self._unsent += 1
            return True

    def _may_take(self) -> bool:
        return self.close_requested or (self._credit > 0 and self._unsent < MAX_UNSENT_BATCHES)

    async def ready(self) -> None:
        """Until `take` would succeed at once, or the child closed the stream."""
        while not self._may_take():
            self._wake = trio.Event()
            await self._wake.wait()


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _vm_hwm(pid: int) -> int:
    try:
        for line in read_small(f"/proc/{pid}/status").splitlines():
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value, without recursion (the value came from a child)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def _rss(pid: int) -> int:
    try:
        return int(read_small(f"/proc/{pid}/statm").split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _output_lines(data: bytes) -> tuple[list[str], bytes]:
    """Complete stdout/stderr lines in `data` and what is left; a line over MAX_OUTPUT_LINE comes in pieces."""
    parts = data.split(b"\n")
    rest = parts.pop()
    lines = [
        part[i : i + MAX_OUTPUT_LINE].decode("utf-8", "replace")
        for part in parts
        for i in range(0, len(part) or 1, MAX_OUTPUT_LINE)
    ]
    while len(rest) >= MAX_OUTPUT_LINE:  # no newline yet: the piece goes out rather than growing
        lines.append(rest[:MAX_OUTPUT_LINE].decode("utf-8", "replace"))
        rest = rest[MAX_OUTPUT_LINE:]
    return lines, rest


def _error(type_: str, message: str, traceback: str) -> dict[str, str]:
    return {"type": type_, "message": message, "traceback": traceback}


class _Signal:
    """A one-way flag like trio.Event that also pokes its session, so one wait covers several flags."""

    __slots__ = ("_event", "_poke")

    def __init__(self, poke: Callable[[], None]) -> None:
        self._event = trio.Event()
        self._poke = poke

    def set(self) -> None:
        self._event.set()
        self._poke()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()
