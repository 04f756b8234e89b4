"""Run attack code in a real child interpreter after it sealed itself with `sandbox.apply`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from liberty.jobs.sandbox import AppliedReport, SandboxSpec, default_readable

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
PLUGINS = ROOT / "plugins"

_PRELUDE = """
import json, os, sys
from liberty.jobs.sandbox import SandboxSpec, apply

def attempt(f):
    try:
        return {"ok": True, "value": f()}
    except OSError as exc:
        return {"ok": False, "error": type(exc).__name__, "errno": exc.errno}

def result(**values):
    print(json.dumps(values), flush=True)

report = apply(SandboxSpec.from_dict(json.loads(sys.argv[1])))
print(json.dumps(report.to_dict()), flush=True)
"""


@attrs.frozen
class Outcome:
    report: AppliedReport
    result: dict[str, Any] | None
    returncode: int
    stderr: str


Runner = Callable[..., Outcome]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    return work


@pytest.fixture
def base_spec(workdir: Path) -> SandboxSpec:
    return SandboxSpec(workdir=str(workdir), readable=default_readable(str(PLUGINS)))


@pytest.fixture
def run_sandboxed() -> Runner:
    def run(spec: SandboxSpec, attack: str, *, before: str = "", timeout: float = 30) -> Outcome:
        """`before` runs ahead of apply() (imports a uid-dropped child could no longer reach)."""
        code = textwrap.dedent(before) + _PRELUDE + textwrap.dedent(attack)
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(spec.to_dict())],
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(SRC), "PYTHONDONTWRITEBYTECODE": "1"},
            cwd=spec.workdir if os.path.isdir(spec.workdir) else None,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        lines = proc.stdout.splitlines()
        assert lines, f"the child printed nothing (rc {proc.returncode}): {proc.stderr[-2000:]}"
        report = AppliedReport.from_dict(json.loads(lines[0]))
        result = json.loads(lines[-1]) if len(lines) > 1 else None
        return Outcome(report, result, proc.returncode, proc.stderr)

    return run


@pytest.fixture
def fake_supervisor() -> Any:
    """A process outside the sandbox holding a secret in its environment, as the supervisor does."""
    proc = subprocess.Popen(["sleep", "60"], env={"NOMAFLOW_SECRET": "hunter2"})
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def tcp_server() -> Any:
    """A listening TCP socket on 127.0.0.1 in the test's own network namespace; yields its port."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]
