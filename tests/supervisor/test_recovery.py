"""After a supervisor dies with kill -9, the next one to start cleans up after it.

Real `nomaflow` processes on one history: the first runs a step whose setsid'd
grandchild would outlive everyone; it is killed with SIGKILL mid-step; then a
second `nomaflow run` starts and must kill what is left, remove the dead one's
cgroups and close its run as FAILED (`lost`).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import psutil
import pytest

pytestmark = pytest.mark.timeout(90)

NOMAFLOW = Path(sys.executable).parent / "nomaflow"
CGROUP_ROOT = Path("/sys/fs/cgroup")

PLUGIN = """
import os
import time


def hold(ctx, **_):
    grandchild = os.fork()
    if grandchild == 0:
        os.setsid()
        while True:
            time.sleep(1)
    ctx.log.info(f"holding: attempt {os.getpid()} grandchild {grandchild}")
    while True:
        time.sleep(0.2)


def nothing(ctx, **_):
    return "ok"
"""

JOB = """
name = "{name}"
[[steps]]
name = "{name}"
python = "holder:{function}"
timeout_seconds = 600
cancel_grace_seconds = 1
"""


def nomaflow(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(NOMAFLOW), *args], cwd=cwd, capture_output=True, text=True, timeout=60,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def supervisor_cgroups(pid: int) -> list[Path]:
    """`nomaflow/sup-<pid>-*` directories in every cgroup hierarchy."""
    found = []
    for top, dirs, _ in os.walk(CGROUP_ROOT):
        if Path(top).name == "nomaflow":
            found.extend(Path(top) / d for d in dirs if d.startswith(f"sup-{pid}-"))
            dirs.clear()
        elif len(Path(top).relative_to(CGROUP_ROOT).parts) >= 6:
            dirs.clear()
    return sorted(found)


def supervisor_workdirs(pid: int) -> list[Path]:
    """`<tmp>/nomaflow-sup-<pid>-*`: where that supervisor's attempts have their work directories."""
    return sorted(Path(tempfile.gettempdir()).glob(f"nomaflow-sup-{pid}-*"))


@attrs.define
class Holding:
    """A `nomaflow run` whose step is holding, with its attempt's pid and its grandchild's."""

    proc: subprocess.Popen[str]
    run_id: str
    attempt: int
    grandchild: int
    cgroups: list[Path]
    workdirs: list[Path]

    def pids(self) -> list[int]:
        return [self.attempt, self.grandchild]


def start_holding(project: Path) -> Holding:
    proc = subprocess.Popen(
        [str(NOMAFLOW), "run", "jobs/hold.toml"], cwd=project, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    seen, run_id, deadline = [], None, time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        if found := re.match(r"run ([0-9a-f]+) · job", line):
            run_id = found.group(1)
        if found := re.search(r"holding: attempt (\d+) grandchild (\d+)", line):
            assert run_id is not None, seen
            return Holding(
                proc, run_id, int(found.group(1)), int(found.group(2)), supervisor_cgroups(proc.pid), supervisor_workdirs(proc.pid)
            )
    proc.kill()
    raise AssertionError(f"the step never started holding: {''.join(seen)}")


def clean_up(holding: Holding, project: Path) -> None:
    """Leave nothing behind, whatever the test found (reaping only our own known pids)."""
    if holding.proc.poll() is None:
        nomaflow(project, "cancel", holding.run_id)
        try:
            holding.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            holding.proc.kill()
            holding.proc.wait(timeout=10)
    for pid in holding.pids():
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, os.WNOHANG)  # adopted by this process if it is a subreaper
        except ChildProcessError:
            pass


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recovery")
    (root / "plugins").mkdir()
    (root / "plugins" / "holder.py").write_text(PLUGIN)
    (root / "jobs").mkdir()
    (root / "jobs" / "hold.toml").write_text(JOB.format(name="hold", function="hold"))
    (root / "jobs" / "trivial.toml").write_text(JOB.format(name="trivial", function="nothing"))
    (root / "nomaflow.toml").write_text('history = "history.db"\n')
    return root


@attrs.frozen
class Recovery:
    before: dict[str, Any]
    after: dict[str, Any]
    dead: Holding
    next_run: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def recovered(project: Path) -> Iterator[Recovery]:
    """kill -9 a supervisor mid-step, then start the next one on the same history."""
    dead = start_holding(project)
    try:
        dead.proc.send_signal(signal.SIGKILL)
        dead.proc.wait(timeout=10)
        time.sleep(0.5)  # let the orphans notice (the attempt exits on EOF of its protocol pipe)
        before = {
            "grandchild": alive(dead.grandchild),
            "cgroups": [d for d in dead.cgroups if d.exists()],
            "workdirs": [d for d in dead.workdirs if d.exists()],
        }
        next_run = nomaflow(project, "run", "jobs/trivial.toml")
        after = {
            "pids": {pid: alive(pid) for pid in dead.pids()},
            "cgroups": [d for d in dead.cgroups if d.exists()],
            "workdirs": [d for d in dead.workdirs if d.exists()],
        }
        yield Recovery(before, after, dead, next_run)
    finally:
        clean_up(dead, project)


def test_the_next_supervisor_starts_and_runs_normally(recovered: Recovery) -> None:
    assert recovered.next_run.returncode == 0, recovered.next_run.stdout + recovered.next_run.stderr
    assert "trivial · SUCCEEDED" in recovered.next_run.stdout


def test_the_dead_supervisors_step_processes_are_killed_by_the_next_ones_start_up(recovered: Recovery) -> None:
    assert recovered.before["grandchild"], "the grandchild died with the supervisor: nothing was left to clean up"
    assert recovered.after["pids"] == {pid: False for pid in recovered.dead.pids()}


def test_the_dead_supervisors_cgroups_are_removed_by_the_next_ones_start_up(recovered: Recovery) -> None:
    assert recovered.dead.cgroups, "the dead supervisor had no nomaflow/sup-<pid>-* cgroup directory"
    assert recovered.before["cgroups"] == recovered.dead.cgroups, "they were gone before the next supervisor started"
    assert recovered.after["cgroups"] == []


def test_the_dead_supervisors_work_directories_are_removed_by_the_next_ones_start_up(recovered: Recovery) -> None:
    assert recovered.dead.workdirs, "the dead supervisor had no nomaflow-sup-<pid>-* work directory"
    assert recovered.before["workdirs"] == recovered.dead.workdirs, "they were gone before the next supervisor started"
    assert recovered.after["workdirs"] == []


def test_the_dead_supervisors_run_is_marked_failed_with_reason_lost(project: Path, recovered: Recovery) -> None:
    result = nomaflow(project, "show", recovered.dead.run_id, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["status"] == "FAILED"
    [step] = doc["steps"]
    assert (step["status"], step["error"]["reason"]) == ("FAILED", "lost")


def test_show_of_the_lost_run_says_the_supervisor_died(project: Path, recovered: Recovery) -> None:
    result = nomaflow(project, "show", recovered.dead.run_id)
    assert result.returncode == 0, result.stderr
    assert re.search(r"hold \S+ \(lost\): the supervisor running this step died", result.stdout), result.stdout


def test_a_live_supervisors_run_processes_and_cgroups_are_left_alone(project: Path) -> None:
    running = start_holding(project)
    try:
        result = nomaflow(project, "run", "jobs/trivial.toml")
        assert result.returncode == 0, result.stdout + result.stderr
        assert running.proc.poll() is None
        assert {pid: alive(pid) for pid in running.pids()} == {pid: True for pid in running.pids()}
        assert running.cgroups and all(d.exists() for d in running.cgroups)
        shown = json.loads(nomaflow(project, "show", running.run_id, "--json").stdout)
        assert shown["status"] == "RUNNING"
    finally:
        clean_up(running, project)
