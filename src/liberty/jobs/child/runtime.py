"""One attempt inside the child: handshake, import, run, report, exit."""

from __future__ import annotations

import asyncio
import faulthandler
import inspect
import json
import os
import signal
import sys
import traceback
from typing import Any

from ..protocol import (
    PROTOCOL_FDS_ENV,
    PROTOCOL_VERSION,
    CompiledSource,
    Done,
    Failed,
    Prepare,
    Prepared,
    Ready,
    Start,
    decode_parent_message,
    encode,
)
from .channel import Channel, adopt_protocol_fds
from .context import ChildContext
from .loader import REHEARSAL_MODULE, compile_ahead, install_plugins_path, rehearse_import, resolve_function


def main() -> None:
    spec = os.environ.pop(PROTOCOL_FDS_ENV, None)
    if spec is None:
        print(
            "liberty.jobs.child is started by the nomaflow supervisor, not by hand; "
            "use `nomaflow step module:function` to run one step.",
            file=sys.stderr,
        )
        sys.exit(2)
    serve(*adopt_protocol_fds(spec))


def serve(fd_in: int, fd_out: int) -> None:
    """Handshake, prepare, wait for the step, run it, exit; shared by spawned and forked children.

    Everything that does not depend on the step (the sandbox, the plugins path,
    the event loop, the pipe's wake-up signal) happens on `prepare`, so a supervisor can
    prepare an attempt ahead of the request that will use it.  A step is never
    started in a sandbox that its own report calls broken, whether or not
    `start` is already in the pipe.
    """
    channel = Channel(fd_in, fd_out)
    prepare = channel.receive()
    if not isinstance(prepare, Prepare):
        channel.send(Ready(version=PROTOCOL_VERSION, pid=os.getpid()))
        print(f"nomaflow child: expected prepare (protocol {PROTOCOL_VERSION}), got {prepare!r:.200}", file=sys.stderr)
        os._exit(2)
    report = None
    if prepare.sandbox is not None:
        # Still single-threaded here: Landlock, no_new_privs and the netns apply per thread.
        from ..sandbox import SandboxSpec, apply, sandbox_problem

        report = apply(SandboxSpec.from_dict(prepare.sandbox)).to_dict()
        if sandbox_problem(report):
            # `start` may be in the pipe already (a cold start sends it with `prepare`): it is
            # not run.  The supervisor reads why from the report and records the refusal.
            channel.send(handshake(report))
            _flush_and_exit(0)
    install_stack_dump()
    install_plugins_path(prepare.plugins)
    # A bare loop rather than asyncio.run(): the process exits right after the result is
    # sent, so the loop's orderly shutdown (executor join, async generators) is not waited for.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    channel.watch_for_messages()
    if prepare.rehearse:
        rehearse_start(loop, prepare.plugins)
    channel.send(handshake(report, compile_expected(prepare)))
    start = channel.wait_start()
    if start.version != PROTOCOL_VERSION:
        print(f"nomaflow child: expected start (protocol {PROTOCOL_VERSION}), got {start.version}", file=sys.stderr)
        os._exit(2)
    run_attempt(channel, start, prepare.plugins, loop)
    _flush_and_exit(0)


def compile_expected(prepare: Prepare) -> CompiledSource | None:
    """Compile the expected step's module ahead (or take the code handed over for it); the
    code compiled here, for `prepared` to report, if any."""
    ahead = compile_ahead(prepare.plugins, prepare.expect, prepare.code) if prepare.expect else None
    return ahead.fresh if ahead is not None else None


def handshake(report: dict[str, Any] | None, compiled: CompiledSource | None = None) -> bytes:
    """`ready` and `prepared` in one write, once prepared: the supervisor reads them together."""
    return encode(Ready(version=PROTOCOL_VERSION, pid=os.getpid())) + encode(Prepared(report=report, compiled=compiled))


_stack_dump_installed = False


def install_stack_dump() -> None:
    """SIGUSR1 from the supervisor before a hard kill: every thread's stack to stderr, even
    while Python code holds the GIL in a tight loop, so the log shows where it stopped.

    Once per process: the zygote installs it before forking (the handler and the fd number
    it writes to, 2, carry over), so its attempts do not pay for it again.
    """
    global _stack_dump_installed
    if not _stack_dump_installed:
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
        _stack_dump_installed = True


def rehearse_start(loop: asyncio.AbstractEventLoop, plugins: str) -> None:
    """Walk, on nothing, the paths a step start takes (import, a task on the loop, checking and
    encoding a result), so that the pages they touch are copied from the zygote now, while
    the attempt waits, instead of after `start`."""
    rehearse_import(plugins)
    decode_parent_message(encode(REHEARSAL_START))
    loop.run_until_complete(asyncio.ensure_future(asyncio.sleep(0)))
    check_output({"rehearsal": 0.0}, 1024)
    encode(Done(output={"rehearsal": 0.0}))


REHEARSAL_START = Start(  # the shipped stand-in's step, as a cold start would send it
    version=PROTOCOL_VERSION, run_id="rehearsal", job_id="rehearsal", step="rehearsal", attempt=1,
    function=f"{REHEARSAL_MODULE}:step", params={"rehearsal": 1}, previous_steps={"rehearsal": {"output": None}},
)


def run_attempt(channel: Channel, start: Start, plugins: str, loop: asyncio.AbstractEventLoop) -> None:
    try:
        func = resolve_function(start.function, plugins)
    except BaseException as exc:  # the plugin's import-time errors belong to the step
        result: Done | Failed = _failure("exception", exc)
    else:
        ctx = ChildContext(channel, start)
        try:
            result = loop.run_until_complete(_run(channel, func, ctx, start))
        except (SystemExit, KeyboardInterrupt) as exc:  # asyncio re-raises these past the task
            result = _failure("exception", exc)
    channel.finishing()
    channel.send(result)


async def _run(channel: Channel, func: Any, ctx: ChildContext, start: Start) -> Done | Failed:
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(_call(func, ctx, dict(start.params)))
    channel.on_task_cancel = lambda: loop.call_soon_threadsafe(task.cancel)
    try:
        output = await task
    except asyncio.CancelledError as exc:
        return _failure("cancelled", exc)
    except BaseException as exc:  # the step's own failure, reported with its real type
        return _failure("exception", exc)
    finally:
        channel.on_task_cancel = None
    problem = check_output(output, start.max_output_bytes)
    if problem:
        return Failed(kind="output", type="OutputError", message=problem)
    return Done(output=output)


async def _call(func: Any, ctx: ChildContext, kwargs: dict[str, Any]) -> Any:
    if inspect.iscoroutinefunction(func):
        result = await func(ctx, **kwargs)
    else:
        result = await asyncio.to_thread(func, ctx, **kwargs)
    while inspect.isawaitable(result):
        result = await result
    return result


MAX_ERROR_MESSAGE = 64 * 1024
MAX_TRACEBACK = 256 * 1024


def _failure(kind: str, exc: BaseException) -> Failed:
    message = str(exc)
    if isinstance(exc, asyncio.CancelledError) and not message:
        message = "the step was cancelled"
    kind_name = type(exc).__qualname__
    if type(exc).__module__ not in ("builtins", "asyncio.exceptions"):
        kind_name = f"{type(exc).__module__}.{kind_name}"
    return Failed(
        kind=kind,  # type: ignore[arg-type]
        type=kind_name,
        message=_clip(message, MAX_ERROR_MESSAGE),
        traceback=_clip("".join(traceback.format_exception(exc)), MAX_TRACEBACK),
    )


def _clip(text: str, limit: int) -> str:
    """Keep an error within the protocol's line cap: its start and its end, saying how much was cut."""
    if len(text) <= limit:
        return text
    head, tail = limit * 3 // 4, limit // 4
    return f"{text[:head]}… [{len(text) - head - tail} characters cut] …{text[-tail:]}"


def check_output(output: Any, max_bytes: int) -> str | None:
    """None if the output may be recorded, else the reason, naming type or size."""
    try:
        encoded = json.dumps(output, allow_nan=False)
    except (TypeError, ValueError) as exc:
        where = _find_unserialisable(output, "output")
        if where:
            return f"step output is not JSON-serialisable: {where[0]} is of type {where[1]}; return plain dicts, lists, strings and numbers"
        return f"step output is not JSON-serialisable: {exc}"
    size = len(encoded.encode("utf-8"))
    if size > max_bytes:
        return (
            f"step output is {size} bytes, over the {max_bytes}-byte cap (limits.max_output_kb); "
            "return aggregates, not raw data"
        )
    return None


def _find_unserialisable(value: Any, path: str, depth: int = 0) -> tuple[str, str] | None:
    if depth > 100:
        return (path, "nesting deeper than 100 levels")
    if value is None or isinstance(value, (str, bool, int)):
        return None
    if isinstance(value, float):
        return None if value == value and value not in (float("inf"), float("-inf")) else (path, f"float {value}")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _find_unserialisable(item, f"{path}[{i}]", depth + 1)
            if found:
                return found
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                return (f"{path} key {key!r}", type(key).__name__)
            found = _find_unserialisable(item, f"{path}[{key!r}]", depth + 1)
            if found:
                return found
        return None
    return (path, type(value).__qualname__)


def _flush_and_exit(code: int) -> None:
    """Exit without waiting for threads a sync step may have left running."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
