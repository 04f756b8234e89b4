"""The zygote's warm-up, in an interpreter of its own: the attempt's path quickened, nothing else changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

_STATE = """
import asyncio, dis, json, os, sys, threading
from liberty.jobs.child import runtime, warmup

def state():
    return {
        "fds": sorted(os.listdir("/proc/self/fd")),
        "threads": len(os.listdir("/proc/self/task")),
        "path": list(sys.path),
        "hooks": len(sys.path_hooks),
        "importer_cache": sorted(k for k in sys.path_importer_cache if k),
        "modules": sorted(sys.modules),
        "loop": asyncio.get_event_loop_policy()._local._loop is not None,
        "run_attempt": [i.opname for i in dis.get_instructions(runtime.run_attempt, adaptive=True)][0],
    }
"""


def _before_and_after() -> tuple[dict[str, object], dict[str, object]]:
    code = _STATE + "before = state()\nwarmup.warm_up()\nprint(json.dumps([before, state()]))\n"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    before, after = json.loads(out.stdout)
    return before, after


def test_the_warm_up_quickens_the_attempt_path_and_leaves_everything_else_as_it_was() -> None:
    before, after = _before_and_after()
    assert before.pop("run_attempt") == "RESUME"  # never run: not quickened yet
    assert after.pop("run_attempt") == "RESUME_QUICK"
    assert after == before  # no descriptor, thread, path entry, hook, finder, module or event loop left behind


def test_a_warm_up_that_fails_is_said_and_leaves_the_process_usable() -> None:
    code = _STATE + textwrap.dedent("""
        before = state()
        warmup.rehearse = lambda spec: 1 / 0  # a walk that fails half-way
        warmup.warm_up()
        print(json.dumps([before, state()]))
    """)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "warm-up stopped (ZeroDivisionError" in out.stderr
    before, after = json.loads(out.stdout)
    before.pop("run_attempt"), after.pop("run_attempt")
    assert after == before
