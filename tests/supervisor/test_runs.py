"""Runs through the real supervisor: real child interpreters, real pipes, real signals."""

from __future__ import annotations

import json
import os
import sqlite3
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from liberty.jobs import Job, Limits, Retry, Step, Supervisor
from liberty.jobs.errors import NomaflowError
from liberty.jobs.history import HistoryStore
from liberty.jobs.history import store as history_store
from liberty.jobs.history import LogLine, RunView
from supervisor_helpers import gone, messages, plugins_dir

pytestmark = pytest.mark.trio

SPEC_PLUGINS = Path(__file__).resolve().parents[2] / "plugins"

# Behaviours that depend on how the child process comes to be run in both start modes.
both_start_modes = pytest.mark.parametrize("start_mode", ["zygote", "spawn"])


# --- helpers --------------------------------------------------------------------


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    return plugins_dir(tmp_path)


def plugin(plugins: Path, source: str, name: str = "p") -> str:
    """Write a plugin module; returns its module name."""
    (plugins / f"{name}.py").write_text(textwrap.dedent(source))
    return name


def step(python: str, name: str = "s", **kwargs: Any) -> Step:
    kwargs.setdefault("timeout_seconds", 30)
    kwargs.setdefault("cancel_grace_seconds", 2)
    return Step(name=name, python=python, **kwargs)


def writable(*paths: Path) -> Limits:
    """The sandbox lets a step write only its work dir and what it declares."""
    return Limits(writable=[str(p) for p in paths])


def job(*steps: Step, **kwargs: Any) -> Job:
    return Job(name=kwargs.pop("name", "test-job"), steps=list(steps), **kwargs)


@asynccontextmanager
async def supervisor(plugins: Path, **kwargs: Any) -> AsyncIterator[Supervisor]:
    async with Supervisor(plugins=plugins, **{"history": ":memory:", **kwargs}) as sup:
        yield sup


async def run_job(plugins: Path, the_job: Job, *, start_mode: str = "zygote", **kwargs: Any) -> tuple[RunView, list[LogLine]]:
    async with supervisor(plugins, start_mode=start_mode) as sup:
        run = await sup.run(the_job, **kwargs)
        return run, sup.store.logs(run.run_id)


async def run_step(
    plugins: Path, python: str, *, start_mode: str = "zygote", **step_kwargs: Any
) -> tuple[RunView, list[LogLine]]:
    return await run_job(plugins, job(step(python, **step_kwargs)), start_mode=start_mode)


async def eventually_gone(pid: int, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        await trio.sleep(0.05)
    return True


async def wait_for_file(path: Path, within: float = 30.0) -> None:
    with trio.fail_after(within):
        while not path.exists():
            await trio.sleep(0.05)


async def wait_until_running(sup: Supervisor, run_id: str) -> None:
    with trio.fail_after(30):
        while (await sup.get_run(run_id)).steps[0].status != "RUNNING":
            await trio.sleep(0.05)


# --- the spec's examples ------------------------------------------------------------


async def test_spec_generate_monthly_writes_its_pdf(tmp_path: Path) -> None:
    target = tmp_path / "out" / "summary.pdf"
    run, logs = await run_job(
        SPEC_PLUGINS,
        job(
            step(
                "reports.summary:generate_monthly",
                op_kwargs={"target_path": str(target)},
                limits=writable(target.parent),
            ),
            params={"period": "2026-04"},
        ),
    )
    assert run.status == "SUCCEEDED"
    assert run.steps[0].output == {"path": str(target), "size_bytes": target.stat().st_size}
    assert target.read_bytes().startswith(b"%PDF")
    assert "wrote 2026-04 summary" in messages(logs, "log")


async def test_spec_long_loop_processes_every_item() -> None:
    run, _ = await run_step(SPEC_PLUGINS, "examples.cancellation:long_loop", op_kwargs={"items": list(range(250))})
    assert run.status == "SUCCEEDED" and run.steps[0].output == {"processed": 250}


async def test_spec_render_pdf_runs_in_a_thread() -> None:
    run, _ = await run_step(SPEC_PLUGINS, "examples.cpu_bound:render_pdf", op_kwargs={"data": {"title": "t", "n": [1, 2]}})
    assert run.status == "SUCCEEDED" and run.steps[0].output["bytes"] > 1000


async def test_spec_big_etl_logs_its_heartbeat() -> None:
    run, logs = await run_step(SPEC_PLUGINS, "examples.heartbeat:big_etl")
    assert run.status == "SUCCEEDED" and run.steps[0].output == {"rows": 1_000_000}
    beats = messages(logs, "log")
    assert beats[0] == "▶ 50000 / 1000000 (5%)" and beats[-1] == "▶ 1000000 / 1000000 (100%)"
    assert len(beats) == 20


async def test_spec_upsert_releases_reads_the_previous_step() -> None:
    run, logs = await run_job(
        SPEC_PLUGINS,
        job(
            step("examples.chaining:fetch_releases", name="fetch-releases"),
            step("examples.chaining:upsert_releases", name="upsert-releases"),
        ),
    )
    assert run.status == "SUCCEEDED"
    assert run.steps[1].output == {"upserted": 3}
    assert "upserted 3 releases" in messages(logs, "log")


async def test_spec_check_upstream_fails_with_its_message_and_traceback() -> None:
    run, _ = await run_step(SPEC_PLUGINS, "examples.failures:check_upstream")
    assert run.status == "FAILED"
    error = run.steps[0].error
    assert error["type"] == "RuntimeError" and error["reason"] == "exception"
    assert error["message"] == "upstream returned 500 — body: Internal Server Error"
    assert "failures.py" in error["traceback"] and "check_upstream" in error["traceback"]
    assert "RuntimeError: upstream returned 500" in error["traceback"]


async def test_spec_prune_attachments_resolves_through_the_package(tmp_path: Path) -> None:
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    os.utime(old, (time.time() - 90 * 86400,) * 2)
    run, _ = await run_step(
        SPEC_PLUGINS,
        "housekeeping:prune_attachments",
        op_kwargs={"directory": str(tmp_path), "older_than_days": 30},
        limits=writable(tmp_path),
    )
    assert run.status == "SUCCEEDED" and run.steps[0].output == {"deleted": 1, "kept": 1}
    assert not old.exists() and new.exists()


async def test_spec_log_levels_land_in_the_run_log() -> None:
    run, logs = await run_step(SPEC_PLUGINS, "examples.logging_demo:log_levels")
    assert run.status == "SUCCEEDED"
    assert [(l.level, l.message) for l in logs if l.stream == "log"] == [
        ("INFO", "starting batch"),
        ("INFO", "▶ batch 1 of 3"),
        ("WARNING", "missing field on row 42 — skipping"),
        ("ERROR", "upstream returned 500 — retry policy will decide"),
    ]


# --- failures ---------------------------------------------------------------------------


async def test_exception_fails_the_step_with_type_message_and_traceback(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        async def boom(ctx, **_):
            raise ValueError("bad period 2026-13")
        """,
    )
    run, logs = await run_step(plugins, f"{mod}:boom")
    assert run.status == "FAILED"
    error = run.steps[0].error
    assert (error["type"], error["message"], error["reason"]) == ("ValueError", "bad period 2026-13", "exception")
    assert 'raise ValueError("bad period 2026-13")' in error["traceback"]
    assert run.steps[0].attempt_records[0].reason == "exception"


async def test_exception_of_a_plugin_defined_type_is_recorded_with_its_module(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        class UpstreamDown(Exception):
            pass

        async def boom(ctx, **_):
            raise UpstreamDown("503")
        """,
    )
    run, _ = await run_step(plugins, f"{mod}:boom")
    assert run.steps[0].error["type"] == f"{mod}.UpstreamDown" and run.steps[0].error["message"] == "503"


async def test_output_that_is_not_json_fails_naming_the_type(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        import datetime

        async def bad(ctx, **_):
            return {"when": datetime.datetime(2026, 4, 1)}
        """,
    )
    run, _ = await run_step(plugins, f"{mod}:bad")
    assert run.status == "FAILED"
    assert run.steps[0].error["reason"] == "output"
    assert "datetime" in run.steps[0].error["message"] and "when" in run.steps[0].error["message"]


async def test_output_over_max_output_kb_fails_naming_the_size(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        async def big(ctx, **_):
            return {"rows": "x" * 5000}
        """,
    )
    run, _ = await run_step(plugins, f"{mod}:big", limits=Limits(max_output_kb=1))
    assert run.status == "FAILED" and run.steps[0].error["reason"] == "output"
    size = len(json.dumps({"rows": "x" * 5000}))
    assert str(size) in run.steps[0].error["message"] and "1024" in run.steps[0].error["message"]


async def test_missing_function_fails_with_import_error(plugins: Path) -> None:
    mod = plugin(plugins, "async def present(ctx, **_):\n    return {}\n")
    run, _ = await run_step(plugins, f"{mod}:absent")
    assert run.status == "FAILED"
    assert run.steps[0].error["type"] == "ImportError" and "absent" in run.steps[0].error["message"]


async def test_missing_module_fails_with_module_not_found_naming_the_plugins_dir(plugins: Path) -> None:
    run, _ = await run_step(plugins, "nowhere:f")
    assert run.steps[0].error["type"] == "ModuleNotFoundError"
    assert str(plugins) in run.steps[0].error["message"]


@both_start_modes
async def test_os_exit_is_crashed_with_the_exit_code(plugins: Path, start_mode: str) -> None:
    mod = plugin(
        plugins,
        """
        import os, sys

        async def die(ctx, **_):
            sys.stderr.write("about to exit\\n")
            sys.stderr.flush()
            os._exit(3)
        """,
    )
    run, _ = await run_step(plugins, f"{mod}:die", start_mode=start_mode)
    assert run.status == "FAILED" and run.steps[0].error["reason"] == "crashed"
    assert "exit code 3" in run.steps[0].error["message"]
    assert "about to exit" in run.steps[0].error["message"]  # the stderr tail


@both_start_modes
async def test_segfault_is_crashed_with_sigsegv(plugins: Path, start_mode: str) -> None:
    mod = plugin(
        plugins,
        """
        import ctypes

        async def segv(ctx, **_):
            ctypes.string_at(0)
        """,
    )
    run, _ = await run_step(plugins, f"{mod}:segv", start_mode=start_mode)
    assert run.status == "FAILED" and run.steps[0].error["reason"] == "crashed"
    assert "SIGSEGV" in run.steps[0].error["message"]


# --- protocol violations ------------------------------------------------------------------


async def test_garbage_on_the_protocol_pipe_fails_with_protocol_and_supervisor_carries_on(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        import asyncio, os

        async def garbage(ctx, **_):
            os.write(4, b"garbage\\n")
            await asyncio.sleep(30)

        async def fine(ctx, **_):
            return {"fine": True}
        """,
    )
    async with supervisor(plugins) as sup:
        t0 = time.monotonic()
        bad = await sup.run(job(step(f"{mod}:garbage")))
        assert time.monotonic() - t0 < 20
        good = await sup.run(job(step(f"{mod}:fine")))
    assert bad.status == "FAILED" and bad.steps[0].error["reason"] == "protocol"
    assert good.status == "SUCCEEDED" and good.steps[0].output == {"fine": True}


async def test_unhashable_message_tag_fails_with_protocol_and_supervisor_carries_on(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        import asyncio, os

        async def listtag(ctx, **_):
            os.write(4, b'{"t": []}\\n')
            await asyncio.sleep(30)

        async def fine(ctx, **_):
            return {"fine": True}
        """,
    )
    async with supervisor(plugins) as sup:
        bad = await sup.run(job(step(f"{mod}:listtag")))
        good = await sup.run(job(step(f"{mod}:fine")))
    assert bad.status == "FAILED" and bad.steps[0].error["reason"] == "protocol"
    assert good.status == "SUCCEEDED"


async def test_parent_message_from_the_child_is_a_protocol_violation(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        import asyncio, os

        async def fake_cancel(ctx, **_):
            os.write(4, b'{"t":"cancel","stage":"flag"}\\n')
            await asyncio.sleep(30)
        """,
    )
    run, _ = await run_step(plugins, f"{mod}:fake_cancel")
    assert run.steps[0].error["reason"] == "protocol"


async def test_second_done_is_a_protocol_violation(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        import os

        async def twice(ctx, **_):
            os.write(4, b'{"t":"done","output":{"first":1}}\\n')
            return {"second": 2}
        """,
    )
    run, _ = await run_step(plugins, f"{mod}:twice")
    assert run.status == "FAILED" and run.steps[0].error["reason"] == "protocol"
    assert "after the step's result" in run.steps[0].error["message"]


async def test_log_after_done_is_a_protocol_violation(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        import os

        async def late(ctx, **_):
            os.write(4, b'{"t":"done","output":null}\\n')
            ctx.log.info("too late")
            os._exit(0)
        """,
    )
    run, _ = await run_step(plugins, f"{mod}:late")
    assert run.status == "FAILED" and run.steps[0].error["reason"] == "protocol"


async def test_deeply_nested_output_does_not_crash_the_supervisor(plugins: Path) -> None:
    """Valid JSON, under every cap, but nested 600 deep: it must not break the next step's start."""
    mod = plugin(
        plugins,
        """
        import os

        async def deep(ctx, **_):
            os.write(4, b'{"t":"done","output":' + b"[" * 600 + b"]" * 600 + b"}\\n")
            os._exit(0)

        async def fine(ctx, **_):
            return {"fine": True}
        """,
    )
    async with supervisor(plugins) as sup:
        run = await sup.run(job(step(f"{mod}:deep", name="deep"), step(f"{mod}:fine", name="next")))
        after = await sup.run(job(step(f"{mod}:fine")))
    assert run.status in ("SUCCEEDED", "FAILED")
    assert after.status == "SUCCEEDED"


async def test_non_json_param_does_not_crash_the_supervisor(plugins: Path) -> None:
    mod = plugin(plugins, "async def fine(ctx, **_):\n    return {'fine': True}\n")
    async with supervisor(plugins) as sup:
        try:
            run = await sup.run(job(step(f"{mod}:fine")), params={"x": float("nan")})
        except (ValueError, TypeError, NomaflowError) as exc:  # refusing the request up front is fine too
            assert any(word in str(exc).lower() for word in ("nan", "float", "json"))
        else:
            assert run.status == "FAILED"
        after = await sup.run(job(step(f"{mod}:fine")))
    assert after.status == "SUCCEEDED"


# --- timeouts and cancellation --------------------------------------------------------------


async def test_async_busy_loop_times_out_well_under_ten_seconds(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        async def spin(ctx, **_):
            while True:
                pass
        """,
    )
    t0 = time.monotonic()
    run, logs = await run_step(plugins, f"{mod}:spin", timeout_seconds=2, cancel_grace_seconds=1)
    elapsed = time.monotonic() - t0
    assert run.status == "TIMED_OUT" and run.steps[0].error["reason"] == "timeout"
    assert 2 <= elapsed < 10
    assert "killed" in run.steps[0].error["message"]


@both_start_modes
async def test_sync_step_ignoring_sigterm_is_timed_out_and_its_process_is_gone(
    plugins: Path, tmp_path: Path, start_mode: str
) -> None:
    """Its task is cancelled at half the grace (the worker thread is abandoned), and the
    process exits at once: no signal is needed, so ignoring SIGTERM changes nothing."""
    mod = plugin(
        plugins,
        """
        import os, signal, time
        from pathlib import Path

        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # at import: the step itself runs in a worker thread

        def stubborn(ctx, *, pidfile, **_):
            Path(pidfile).write_text(str(os.getpid()))
            while True:
                time.sleep(1000)
        """,
    )
    pidfile = tmp_path / "pid"
    t0 = time.monotonic()
    run, _ = await run_step(
        plugins,
        f"{mod}:stubborn",
        timeout_seconds=1,
        cancel_grace_seconds=1,
        op_kwargs={"pidfile": str(pidfile)},
        limits=writable(tmp_path),
        start_mode=start_mode,
    )
    assert time.monotonic() - t0 < 10
    assert run.status == "TIMED_OUT" and "its task was cancelled" in run.steps[0].error["message"]
    assert await eventually_gone(int(pidfile.read_text()))


async def test_cooperative_cancel_of_long_loop_logs_where_it_stopped() -> None:
    grace = 5
    async with supervisor(SPEC_PLUGINS) as sup:
        handle = await sup.start(
            job(step("examples.cancellation:long_loop", cancel_grace_seconds=grace, op_kwargs={"items": list(range(20_000))}))
        )
        await wait_until_running(sup, handle.run_id)
        await trio.sleep(1.0)
        t0 = time.monotonic()
        assert await sup.cancel(handle.run_id)
        run = await handle.wait()
        elapsed = time.monotonic() - t0
        logs = sup.store.logs(run.run_id)
    assert run.status == "CANCELLED" and run.steps[0].status == "CANCELLED"
    assert elapsed < grace
    warnings = [l for l in logs if l.stream == "log" and l.level == "WARNING"]
    assert len(warnings) == 1 and warnings[0].message.startswith("cancelled at item ")
    assert warnings[0].message.endswith("/20000")
    assert "cooperatively" in run.steps[0].error["message"]


async def test_non_cooperative_cancel_kills_after_the_grace(plugins: Path, tmp_path: Path) -> None:
    mod = plugin(
        plugins,
        """
        from pathlib import Path

        async def spin(ctx, *, marker, **_):
            Path(marker).touch()
            while True:
                pass
        """,
    )
    marker = tmp_path / "started"
    spin = step(f"{mod}:spin", cancel_grace_seconds=1, op_kwargs={"marker": str(marker)}, limits=writable(tmp_path))
    async with supervisor(plugins) as sup:
        handle = await sup.start(job(spin))
        await wait_for_file(marker)
        t0 = time.monotonic()
        await sup.cancel(handle.run_id)
        run = await handle.wait()
        elapsed = time.monotonic() - t0
    assert run.status == "CANCELLED" and run.steps[0].error["reason"] == "cancelled"
    assert "killed" in run.steps[0].error["message"]
    assert 1 <= elapsed < 6


@both_start_modes
async def test_a_step_killed_after_the_grace_records_the_stack_it_was_stuck_in(
    plugins: Path, tmp_path: Path, start_mode: str
) -> None:
    mod = plugin(
        plugins,
        """
        from pathlib import Path

        def busy_forever():
            while True:
                pass

        async def stuck(ctx, *, marker, **_):
            Path(marker).touch()
            busy_forever()
        """,
    )
    marker = tmp_path / "started"
    stuck = step(f"{mod}:stuck", cancel_grace_seconds=0.4, op_kwargs={"marker": str(marker)}, limits=writable(tmp_path))
    async with supervisor(plugins, start_mode=start_mode) as sup:
        handle = await sup.start(job(stuck))
        await wait_for_file(marker)
        await sup.cancel(handle.run_id)
        run = await handle.wait()
    trace = run.steps[0].error["traceback"]
    assert run.status == "CANCELLED" and "killed" in run.steps[0].error["message"]
    assert trace.startswith("Stacks when it was killed (faulthandler):")
    assert "busy_forever" in trace and "stuck" in trace


async def test_is_cancelled_turns_true_while_a_sync_step_blocks(plugins: Path, tmp_path: Path) -> None:
    mod = plugin(
        plugins,
        """
        import time
        from pathlib import Path

        def wait_for_cancel(ctx, *, marker, **_):
            Path(marker).touch()
            while not ctx.is_cancelled():
                time.sleep(0.05)
            ctx.log.warning("saw the cancel flag")
            return {"saw_cancel": True}
        """,
    )
    marker = tmp_path / "started"
    waiting = step(f"{mod}:wait_for_cancel", cancel_grace_seconds=10, op_kwargs={"marker": str(marker)}, limits=writable(tmp_path))
    async with supervisor(plugins) as sup:
        handle = await sup.start(job(waiting))
        await wait_for_file(marker)
        t0 = time.monotonic()
        await sup.cancel(handle.run_id)
        run = await handle.wait()
        elapsed = time.monotonic() - t0
        logs = sup.store.logs(run.run_id)
    assert "saw the cancel flag" in messages(logs, "log")
    assert run.status == "CANCELLED" and "cooperatively" in run.steps[0].error["message"]
    assert elapsed < 5  # well before half the grace, when the task cancel would come


async def test_is_cancelled_turns_true_while_async_code_blocks_the_loop(plugins: Path, tmp_path: Path) -> None:
    mod = plugin(
        plugins,
        """
        import time
        from pathlib import Path

        async def hog_loop(ctx, *, marker, **_):
            Path(marker).touch()
            while not ctx.is_cancelled():
                time.sleep(0.05)  # never awaits: the event loop is blocked throughout
            ctx.log.warning("saw the cancel flag")
            return {"saw_cancel": True}
        """,
    )
    marker = tmp_path / "started"
    waiting = step(f"{mod}:hog_loop", cancel_grace_seconds=10, op_kwargs={"marker": str(marker)}, limits=writable(tmp_path))
    async with supervisor(plugins) as sup:
        handle = await sup.start(job(waiting))
        await wait_for_file(marker)
        await sup.cancel(handle.run_id)
        run = await handle.wait()
        logs = sup.store.logs(run.run_id)
    assert "saw the cancel flag" in messages(logs, "log")
    assert run.status == "CANCELLED"


async def test_cancel_of_a_finished_run_leaves_it_succeeded(plugins: Path) -> None:
    mod = plugin(plugins, "async def fine(ctx, **_):\n    return {}\n")
    async with supervisor(plugins) as sup:
        run = await sup.run(job(step(f"{mod}:fine")))
        await sup.cancel(run.run_id)
        assert (await sup.get_run(run.run_id)).status == "SUCCEEDED"


# --- output capture ---------------------------------------------------------------------------


async def test_print_and_stderr_land_in_the_run_log(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        import sys

        async def chatty(ctx, **_):
            print("hello from print")
            sys.stderr.write("hello from stderr\\n")
            return {}
        """,
    )
    run, logs = await run_step(plugins, f"{mod}:chatty")
    assert run.status == "SUCCEEDED"
    assert messages(logs, "stdout") == ["hello from print"]
    assert messages(logs, "stderr") == ["hello from stderr"]


@both_start_modes
async def test_c_level_write_to_fd_1_lands_in_the_run_log(plugins: Path, start_mode: str) -> None:
    mod = plugin(
        plugins,
        """
        import os

        async def raw(ctx, **_):
            os.write(1, b"written straight to fd 1\\n")
            os.write(2, b"written straight to fd 2\\n")
            return {}
        """,
    )
    run, logs = await run_step(plugins, f"{mod}:raw", start_mode=start_mode)
    assert run.status == "SUCCEEDED"
    assert "written straight to fd 1" in messages(logs, "stdout")
    assert "written straight to fd 2" in messages(logs, "stderr")


async def test_unterminated_last_output_line_is_not_lost(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        import os

        async def partial(ctx, **_):
            os.write(1, b"no newline at the end")
            return {}
        """,
    )
    _, logs = await run_step(plugins, f"{mod}:partial")
    assert messages(logs, "stdout") == ["no newline at the end"]


async def test_history_records_log_lines_in_order(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        async def many(ctx, **_):
            for i in range(500):
                ctx.log.info(f"line {i}")
            return {}
        """,
    )
    run, logs = await run_step(plugins, f"{mod}:many")
    assert messages(logs, "log") == [f"line {i}" for i in range(500)]
    assert all(l.step == "s" and l.attempt == 1 and l.run_id == run.run_id for l in logs if l.stream == "log")
    ids = [l.id for l in logs]
    assert ids == sorted(ids)


async def test_run_and_logs_persist_in_a_history_file(plugins: Path, tmp_path: Path) -> None:
    mod = plugin(plugins, "async def hello(ctx, **_):\n    ctx.log.info('kept')\n    return {'n': 1}\n")
    db = tmp_path / "runs.db"
    async with Supervisor(plugins=plugins, history=db) as sup:
        run_id = (await sup.run(job(step(f"{mod}:hello")))).run_id
    with HistoryStore(db) as store:
        run = store.get_run(run_id)
        assert run.status == "SUCCEEDED" and run.steps[0].output == {"n": 1}
        assert "kept" in messages(store.logs(run_id), "log")


# --- process tree ----------------------------------------------------------------------------


@both_start_modes
async def test_grandchild_in_its_own_session_is_gone_after_the_attempt(plugins: Path, start_mode: str) -> None:
    mod = plugin(
        plugins,
        """
        import subprocess

        async def spawn(ctx, **_):
            proc = subprocess.Popen(["sleep", "1000"], start_new_session=True)
            return {"pid": proc.pid}
        """,
    )
    run, _ = await run_step(plugins, f"{mod}:spawn", start_mode=start_mode)
    assert run.status == "SUCCEEDED"
    assert await eventually_gone(run.steps[0].output["pid"])


@both_start_modes
async def test_double_forked_daemon_is_gone_after_the_attempt(plugins: Path, start_mode: str) -> None:
    mod = plugin(
        plugins,
        """
        import os, time

        async def daemonize(ctx, **_):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.setsid()
                if os.fork() == 0:
                    os.write(w, str(os.getpid()).encode())
                    os.close(w)
                    os.execvp("sleep", ["sleep", "1000"])
                os._exit(0)
            os.close(w)
            os.waitpid(pid, 0)
            return {"pid": int(os.read(r, 100))}
        """,
    )
    run, _ = await run_step(plugins, f"{mod}:daemonize", start_mode=start_mode)
    assert run.status == "SUCCEEDED"
    assert await eventually_gone(run.steps[0].output["pid"])


@both_start_modes
async def test_double_forked_python_daemon_is_gone_after_the_attempt(plugins: Path, start_mode: str) -> None:
    """The daemon never execs: only what the supervisor knows of the attempt can find it."""
    mod = plugin(
        plugins,
        """
        import os, time

        async def daemonize(ctx, **_):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.setsid()
                if os.fork() == 0:
                    os.write(w, str(os.getpid()).encode())
                    os.close(w)
                    time.sleep(1000)
                    os._exit(0)
                os._exit(0)
            os.close(w)
            os.waitpid(pid, 0)
            return {"pid": int(os.read(r, 100))}
        """,
    )
    run, _ = await run_step(plugins, f"{mod}:daemonize", start_mode=start_mode)
    pid = run.steps[0].output["pid"]
    try:
        assert run.status == "SUCCEEDED"
        assert await eventually_gone(pid)
    finally:
        if not gone(pid):
            psutil.Process(pid).kill()


@both_start_modes
async def test_edited_plugin_is_picked_up_on_the_next_run(plugins: Path, start_mode: str) -> None:
    path = plugins / "edited.py"
    path.write_text("async def f(ctx, **_):\n    return 111\n")
    async with supervisor(plugins, start_mode=start_mode) as sup:
        first = await sup.run(job(step("edited:f")))
        before = path.stat()
        path.write_text("async def f(ctx, **_):\n    return 222\n")
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        second = await sup.run(job(step("edited:f")))
    assert (first.steps[0].output, second.steps[0].output) == (111, 222)


@both_start_modes
async def test_child_environment_is_scrubbed(plugins: Path, start_mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOMAFLOW_TEST_SECRET", "hunter2")
    mod = plugin(plugins, "import os\nasync def env(ctx, **_):\n    return dict(os.environ)\n")
    run, _ = await run_step(plugins, f"{mod}:env", start_mode=start_mode)
    env = run.steps[0].output
    assert "NOMAFLOW_TEST_SECRET" not in env and "hunter2" not in json.dumps(env)
    assert env["HOME"] != os.environ.get("HOME")


# --- runs, steps, attempts ------------------------------------------------------------------


async def test_exception_inside_the_supervisor_block_propagates(plugins: Path) -> None:
    """Without this, every assertion written inside `async with Supervisor(...)` could never fail."""
    with pytest.raises(LookupError, match="raised by the caller"):
        async with supervisor(plugins):
            raise LookupError("raised by the caller")


async def test_retry_succeeds_on_the_third_attempt(plugins: Path, tmp_path: Path) -> None:
    mod = plugin(
        plugins,
        """
        from pathlib import Path

        async def flaky(ctx, *, counter, **_):
            path = Path(counter)
            n = int(path.read_text()) + 1 if path.exists() else 1
            path.write_text(str(n))
            if n < 3:
                raise RuntimeError(f"attempt {n} failed")
            return {"attempt": n}
        """,
    )
    run, _ = await run_step(
        plugins,
        f"{mod}:flaky",
        retry=Retry(max_attempts=3, delay_seconds=0),
        op_kwargs={"counter": str(tmp_path / "n")},
        limits=writable(tmp_path),  # the count outlives each attempt's own work dir
    )
    assert run.status == "SUCCEEDED"
    s = run.steps[0]
    assert (s.status, s.attempts, s.output, s.error) == ("SUCCEEDED", 3, {"attempt": 3}, None)
    assert [(a.attempt, a.status) for a in s.attempt_records] == [(1, "FAILED"), (2, "FAILED"), (3, "SUCCEEDED")]
    assert s.attempt_records[0].error["message"] == "attempt 1 failed"


async def test_retry_gives_up_after_max_attempts(plugins: Path) -> None:
    mod = plugin(plugins, "async def always(ctx, **_):\n    raise RuntimeError('nope')\n")
    run, _ = await run_step(plugins, f"{mod}:always", retry=Retry(max_attempts=2, delay_seconds=0))
    assert run.status == "FAILED" and run.steps[0].attempts == 2 and len(run.steps[0].attempt_records) == 2


async def test_steps_after_a_failure_are_skipped(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        async def ok(ctx, **_):
            return {"ok": True}

        async def fail(ctx, **_):
            raise RuntimeError("stop here")
        """,
    )
    run, _ = await run_job(
        plugins,
        job(step(f"{mod}:ok", name="a"), step(f"{mod}:fail", name="b"), step(f"{mod}:ok", name="c"), step(f"{mod}:ok", name="d")),
    )
    assert run.status == "FAILED"
    assert [(s.name, s.status) for s in run.steps] == [("a", "SUCCEEDED"), ("b", "FAILED"), ("c", "SKIPPED"), ("d", "SKIPPED")]
    assert [s.attempt_records for s in run.steps[2:]] == [[], []]


async def test_concurrent_runs_overlap(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        import asyncio

        async def nap(ctx, **_):
            await asyncio.sleep(1.5)
            return {"run": ctx.run_id}
        """,
    )
    the_job = job(step(f"{mod}:nap"))
    async with supervisor(plugins) as sup:
        t0 = time.monotonic()
        await sup.run(the_job)
        one = time.monotonic() - t0
        t0 = time.monotonic()
        handles = [await sup.start(the_job) for _ in range(5)]
        runs = [await h.wait() for h in handles]
        five = time.monotonic() - t0
    assert [r.status for r in runs] == ["SUCCEEDED"] * 5
    assert sorted(r.steps[0].output["run"] for r in runs) == sorted(h.run_id for h in handles)
    assert five < 3 * one, (five, one)


async def test_params_merge_job_then_op_kwargs_then_run_overrides(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        async def show(ctx, **kwargs):
            return {"kwargs": kwargs, "params": ctx.params}
        """,
    )
    run, _ = await run_job(
        plugins,
        job(
            step(f"{mod}:show", op_kwargs={"b": "op", "c": "op", "d": "op"}),
            params={"a": "job", "b": "job", "c": "job"},
        ),
        params={"c": "run", "e": "run"},
    )
    expected = {"a": "job", "b": "op", "c": "run", "d": "op", "e": "run"}
    assert run.steps[0].output == {"kwargs": expected, "params": expected}


async def test_ctx_fields_reach_the_plugin(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        async def fields(ctx, *, period, **_):
            ctx.log.debug("debug is on")
            return {
                "run_id": ctx.run_id,
                "job_id": ctx.job_id,
                "session_user": ctx.session_user,
                "log_level": ctx.log_level,
                "params": ctx.params,
                "cancelled": ctx.is_cancelled(),
            }
        """,
    )
    async with supervisor(plugins) as sup:
        run = await sup.run(
            job(step(f"{mod}:fields"), name="ctx-job", params={"period": "2026-04"}, log_level="DEBUG"),
            session_user="alice",
        )
        logs = sup.store.logs(run.run_id)
    assert run.steps[0].output == {
        "run_id": run.run_id,
        "job_id": "ctx-job",
        "session_user": "alice",
        "log_level": "DEBUG",
        "params": {"period": "2026-04"},
        "cancelled": False,
    }
    assert ("DEBUG", "debug is on") in [(l.level, l.message) for l in logs if l.stream == "log"]


async def test_debug_log_is_dropped_at_info_level(plugins: Path) -> None:
    mod = plugin(plugins, "async def quiet(ctx, **_):\n    ctx.log.debug('hidden')\n    ctx.log.info('shown')\n    return {}\n")
    _, logs = await run_step(plugins, f"{mod}:quiet")
    assert messages(logs, "log") == ["shown"]


async def test_previous_step_with_an_unknown_name_raises_lookup_error(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        async def first(ctx, **_):
            return {"n": 1}

        async def second(ctx, **_):
            return ctx.previous_step("no-such-step").output
        """,
    )
    run, _ = await run_job(plugins, job(step(f"{mod}:first", name="first"), step(f"{mod}:second", name="second")))
    error = run.steps[1].error
    assert error["type"] == "LookupError" and "no-such-step" in error["message"] and "first" in error["message"]


async def test_get_connector_without_connectors_raises_lookup_error_across_the_pipe(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        async def needs_db(ctx, **_):
            ctx.get_connector("reporting")
        """,
    )
    run, _ = await run_step(plugins, f"{mod}:needs_db")
    error = run.steps[0].error
    assert run.status == "FAILED" and error["type"] == "LookupError"
    assert "reporting" in error["message"] and "connectors.toml" in error["message"]


async def test_usage_is_recorded_for_a_cpu_burning_step(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        import time

        async def burn(ctx, **_):
            t = time.process_time()
            while time.process_time() - t < 0.6:
                pass
            return {}
        """,
    )
    run, _ = await run_step(plugins, f"{mod}:burn")
    s = run.steps[0]
    assert s.wall_s > 0.6 and s.cpu_s >= 0.5 and s.peak_rss_mb > 5
    record = s.attempt_records[0]
    assert record.wall_s > 0.6 and record.cpu_s >= 0.5 and record.peak_rss_mb > 5


async def test_a_step_without_a_memory_limit_reports_the_peak_of_its_own_process(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        async def hold(ctx, **_):
            block = bytearray(80 << 20)
            block[::4096] = b"1" * len(block[::4096])
            del block
            return {}
        """,
    )
    run, _ = await run_step(plugins, f"{mod}:hold")  # gone before any sample: the kernel's own peak
    s = run.steps[0]
    assert run.status == "SUCCEEDED", s.error
    assert s.peak_rss_mb >= 80


async def test_usage_counts_a_subprocess_that_holds_memory_and_is_gone_before_the_step_ends(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        import subprocess, sys

        async def helper(ctx, **_):
            code = "import time; x = bytearray(96 << 20); x[::4096] = b'1' * len(x[::4096]); time.sleep(0.3)"
            subprocess.run([sys.executable, "-c", code], check=True)
            return {}
        """,
    )
    run, _ = await run_step(plugins, f"{mod}:helper")
    s = run.steps[0]
    assert run.status == "SUCCEEDED", s.error
    assert s.peak_rss_mb >= 96  # the helper's, not the step process's own
    assert s.attempt_records[0].usage["max_processes"] >= 2


# --- the run's row and its first step ----------------------------------------------


def _history_locked_elsewhere(sup: Supervisor, seconds: float) -> None:
    """Another connection holds the database's write lock for a while, as another process
    would (a CLI's `cancel`): `start` cannot write the run's row at once on the event loop,
    so it writes it on a worker thread, which waits for the lock."""
    other = sqlite3.connect(sup.history_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")

    def release() -> None:
        other.execute("COMMIT")
        other.close()

    threading.Timer(seconds, release).start()


def _slow_create_run(sup: Supervisor, seconds: float, fail: bool = False) -> list[str]:
    """Widen the window in which `start` writes the run's row (a real write, made late); the ids asked for."""
    create, asked = sup.store.create_run, []

    def slow(run_id: str, *args: Any, **kwargs: Any) -> None:
        asked.append(run_id)
        time.sleep(seconds)
        if fail:
            raise NomaflowError("the history refused the run (test)")
        create(run_id, *args, **kwargs)

    sup.store.create_run = slow  # type: ignore[method-assign]
    return asked


async def test_the_first_step_starts_while_the_run_is_recorded_and_its_early_lines_are_kept(plugins: Path, tmp_path: Path) -> None:
    mod = plugin(
        plugins,
        """
        import time

        async def early(ctx, **_):
            t = time.time()
            ctx.log.info("first thing")
            print("printed at once", flush=True)
            return {"t": t}
        """,
    )
    async with supervisor(plugins, history=str(tmp_path / "history.db")) as sup:
        await sup.run(job(step(f"{mod}:early")))  # warm: the next start uses a spare
        _slow_create_run(sup, 0.5)
        _history_locked_elsewhere(sup, 0.1)
        handle = await sup.start(job(step(f"{mod}:early")))
        returned = time.time()
        run = await handle.wait()
        logs = sup.store.logs(run.run_id)
    assert run.status == "SUCCEEDED", run.steps[0].error
    assert run.steps[0].output["t"] < returned  # it ran before `start` returned
    assert {"first thing", "printed at once"} <= {line.message for line in logs}


async def test_a_run_whose_row_cannot_be_written_leaves_nothing_and_start_raises(plugins: Path, tmp_path: Path) -> None:
    mod = plugin(
        plugins,
        """
        import asyncio

        async def waits(ctx, **_):
            ctx.log.info("started")
            await asyncio.sleep(60)
        """,
    )
    async with supervisor(plugins, history=str(tmp_path / "history.db")) as sup:
        before = await sup.run(job(step(f"{mod}:waits", timeout_seconds=1)))
        asked = _slow_create_run(sup, 0.5, fail=True)
        with trio.fail_after(20):  # a spare prepared (one after a cold start): the refused run's step starts warm in it
            while not sup._spares.pids() or sup._spares._making:
                await trio.sleep(0.01)
        waiting = sup._spares.pids()
        _history_locked_elsewhere(sup, 0.1)
        with pytest.raises(NomaflowError, match="refused the run"):
            await sup.start(job(step(f"{mod}:waits")))
        claimed = waiting - sup._spares.pids()
        assert len(claimed) == 1 and all(gone(pid) for pid in claimed)  # the step had started; it is gone
        assert sup._active == {}
        assert [r.run_id for r in sup.store.list_runs()] == [before.run_id]
        assert len(asked) == 1 and sup.store.logs(asked[0]) == []
        sup.store.create_run = type(sup.store).create_run.__get__(sup.store)  # type: ignore[method-assign]
        after = await sup.run(job(step(f"{mod}:waits", timeout_seconds=1)))
    assert after.status == "TIMED_OUT"


async def test_a_busy_history_still_gets_every_write_of_a_run(plugins: Path, tmp_path: Path) -> None:
    """Another process holding the database's write lock sends the run's writes to a worker
    thread, which waits for it: the record is the same as when they go on the event loop."""
    mod = plugin(plugins, "async def ok(ctx, **_):\n    return {'n': 1}\n")
    async with supervisor(plugins, history=str(tmp_path / "history.db")) as sup:
        quick = await sup.run(job(step(f"{mod}:ok"), step(f"{mod}:ok", name="two")))
        _history_locked_elsewhere(sup, 0.3)
        busy = await sup.run(job(step(f"{mod}:ok"), step(f"{mod}:ok", name="two")))
        stored = sup.store.get_run(busy.run_id)
    for run in (quick, busy, stored):
        assert run.status == "SUCCEEDED"
        assert [(s.name, s.status, s.output) for s in run.steps] == [("s", "SUCCEEDED", {"n": 1}), ("two", "SUCCEEDED", {"n": 1})]


async def test_a_supervisor_checkpoints_its_history_on_a_worker_thread(
    plugins: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(history_store, "CHECKPOINT_EVERY", 3)
    mod = plugin(plugins, "async def ok(ctx, **_):\n    return None\n")
    path = tmp_path / "history.db"
    async with supervisor(plugins, history=str(path)) as sup:
        threads: list[str] = []
        checkpoint = sup.store.checkpoint

        def watched() -> None:
            threads.append(threading.current_thread().name)
            checkpoint()

        sup.store.checkpoint = watched  # type: ignore[method-assign]
        size = path.stat().st_size
        for _ in range(8):
            await sup.run(job(step(f"{mod}:ok")))
        grown = path.stat().st_size
    assert threads and threading.main_thread().name not in threads
    assert grown > size  # the runs' rows reached the database file, not only its write-ahead log


async def test_a_run_id_already_running_is_refused(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        import asyncio

        async def waits(ctx, **_):
            await asyncio.sleep(60)
        """,
    )
    async with supervisor(plugins) as sup:
        first = await sup.start(job(step(f"{mod}:waits")), run_id="same-id")
        with pytest.raises(NomaflowError, match="already running"):
            await sup.start(job(step(f"{mod}:waits")), run_id="same-id")
        await sup.cancel(first.run_id)
        assert (await first.wait()).status == "CANCELLED"


async def test_a_run_id_given_that_the_history_already_has_is_refused_before_anything_starts(plugins: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    mod = plugin(
        plugins,
        f"""
        async def touch(ctx, **_):
            open({str(marker)!r}, "w").close()
        """,
    )
    the_job = job(step(f"{mod}:touch", limits=writable(tmp_path)))
    async with supervisor(plugins) as sup:
        first = await sup.run(the_job, run_id="taken-id")
        marker.unlink()
        with pytest.raises(NomaflowError, match="already exists"):
            await sup.start(the_job, run_id="taken-id")
        await trio.sleep(0.5)  # a step started by mistake would have written its marker by now
        assert not marker.exists()
        assert [r.run_id for r in sup.store.list_runs()] == [first.run_id]
