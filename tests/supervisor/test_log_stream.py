"""The run log of a real step: every line arrives, in order, even around failures and sudden death."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from liberty.jobs import Job, Limits, Step, Supervisor
from liberty.jobs.history import LogLine, RunView
from liberty.jobs.supervisor.session import _output_lines
from supervisor_helpers import messages

STEPS = """
import os, signal, sys

async def chatty(ctx, *, lines, **_):
    for i in range(lines):
        ctx.log.info(f"line {i}")
    return {"lines": lines}

async def chatty_then_garbage(ctx, *, lines, **_):
    for i in range(lines):
        ctx.log.info(f"line {i}")
    os.write(4, b"not a message\\n")
    for i in range(lines, lines + 100):
        ctx.log.info(f"line {i}")
    return {"lines": lines}

async def last_words(ctx, **_):
    ctx.log.warning("last words")
    os.kill(os.getpid(), signal.SIGKILL)

async def printer(ctx, *, lines, **_):
    for i in range(lines):
        print(f"out {i}")
        print(f"err {i}", file=sys.stderr)
    sys.stdout.flush()
    return {"lines": lines}

async def escapes(ctx, **_):
    for text in ['quote " and backslash \\\\', "tab\\tnewline\\nend", "naïve ☃ 𝄞", "", "\\x7f del"]:
        ctx.log.error(text)
    return {}
"""


async def run_step(tmp_path: Path, function: str, **params: object) -> tuple[RunView, list[LogLine]]:
    plugins = tmp_path / "plugins"
    plugins.mkdir(exist_ok=True)
    (plugins / "log_steps.py").write_text(textwrap.dedent(STEPS))
    step = Step(name="s", python=f"log_steps:{function}", timeout_seconds=60, limits=Limits(max_log_mb=64))
    async with Supervisor(plugins=plugins, history=tmp_path / "history.db") as sup:
        run = await sup.run(Job(name="logs", steps=[step]), params)
        return run, sup.store.logs(run.run_id, limit=10**6)


@pytest.mark.trio
async def test_every_ctx_log_line_is_stored_once_in_order(tmp_path: Path) -> None:
    run, logs = await run_step(tmp_path, "chatty", lines=50_000)
    assert run.status == "SUCCEEDED"
    assert messages(logs, "log") == [f"line {i}" for i in range(50_000)]
    assert [line.id for line in logs] == sorted(line.id for line in logs)


@pytest.mark.trio
async def test_lines_before_a_bad_message_are_kept_and_the_attempt_fails(tmp_path: Path) -> None:
    run, logs = await run_step(tmp_path, "chatty_then_garbage", lines=20_000)
    assert (run.status, run.steps[0].error["reason"]) == ("FAILED", "protocol")
    assert messages(logs, "log") == [f"line {i}" for i in range(20_000)]


@pytest.mark.trio
async def test_a_line_logged_just_before_a_sigkill_is_stored(tmp_path: Path) -> None:
    run, logs = await run_step(tmp_path, "last_words")
    assert run.steps[0].error["reason"] == "crashed"
    assert [(line.level, line.message) for line in logs if line.stream == "log"] == [("WARNING", "last words")]


@pytest.mark.trio
async def test_stdout_and_stderr_lines_keep_their_order(tmp_path: Path) -> None:
    run, logs = await run_step(tmp_path, "printer", lines=20_000)
    assert run.status == "SUCCEEDED"
    assert messages(logs, "stdout") == [f"out {i}" for i in range(20_000)]
    assert messages(logs, "stderr") == [f"err {i}" for i in range(20_000)]


@pytest.mark.trio
async def test_text_needing_json_escapes_arrives_unchanged(tmp_path: Path) -> None:
    run, logs = await run_step(tmp_path, "escapes")
    assert run.status == "SUCCEEDED"
    assert messages(logs, "log") == ['quote " and backslash \\', "tab\tnewline\nend", "naïve ☃ 𝄞", "", "\x7f del"]


@pytest.mark.parametrize(
    ("data", "lines", "rest"),
    [
        (b"a\n\nbc\nd", ["a", "", "bc"], b"d"),
        (b"w" * 65536 + b"\n", ["w" * 65536], b""),  # exactly the cap: one piece, newline consumed
        (b"w" * 65541 + b"\nx", ["w" * 65536, "w" * 5], b"x"),
        (b"y" * 70000, ["y" * 65536], b"y" * 4464),  # no newline yet: a full piece goes out
        (b"\xff\n", ["\ufffd"], b""),
    ],
)
def test_output_is_cut_into_lines_of_at_most_64_kib(data: bytes, lines: list[str], rest: bytes) -> None:
    assert _output_lines(data) == (lines, rest)
