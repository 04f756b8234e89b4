"""Per-attempt cgroups against the real kernel: limits hold, kills take everyone, nothing is left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import psutil
import pytest

from liberty.jobs.supervisor.cgroups import AttemptCgroup, CgroupManager, CgroupSupport, detect

pytestmark = pytest.mark.timeout(60)

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture
def manager() -> Iterator[CgroupManager]:
    mgr = CgroupManager()
    try:
        yield mgr
    finally:
        assert mgr.close(), "the manager left cgroup directories behind"


def _gated(code: str) -> subprocess.Popen[str]:
    """A Python child that waits for 'go' on stdin, so the test can put it in a cgroup before it acts."""
    prelude = "import sys, os, time, json, subprocess\nsys.stdin.readline()\n"
    return subprocess.Popen(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if not _gone(p)]
        time.sleep(0.02)
    return alive


def _reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def test_detect_finds_memory_pids_and_kill_on_this_host() -> None:
    support = detect()
    assert support.mode in ("v1-hybrid", "v2"), support.summary()
    assert (support.memory, support.pids, support.kill) == (True, True, True), support.summary()


def test_detect_as_unprivileged_user_reports_why_nothing_is_usable() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            support = detect()
            os.write(w, json.dumps({"mode": support.mode, "missing": support.missing}).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        result = json.loads(f.read())
    os.waitpid(pid, 0)
    assert result["mode"] == "none"
    assert "permission denied" in result["missing"]["memory"]


def test_create_returns_none_when_the_host_has_no_cgroups() -> None:
    assert CgroupManager(CgroupSupport("none")).create("a1", memory_mb=64) is None


def test_memory_bomb_is_oom_killed_and_the_kill_is_detected(manager: CgroupManager) -> None:
    group = manager.create("oom", memory_mb=64)
    assert group is not None and group.memory_limit_bytes == 64 << 20
    proc = _gated("block = bytearray(300 << 20)\nprint('survived', flush=True)\n")
    try:
        group.add(proc.pid)
        assert group.oom_kills() == 0
        _go(proc)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert group.oom_killed()
        peak = group.peak_memory_bytes()
        assert peak is not None and peak <= (64 << 20) + (1 << 20)
    finally:
        _reap(proc)
        assert manager.release(group)


def test_process_count_stays_under_pids_max(manager: CgroupManager) -> None:
    group = manager.create("forks", max_processes=20)
    assert group is not None and group.pids_limit == 20
    proc = _gated(
        """
        started, refused = [], 0
        for _ in range(200):
            try:
                started.append(subprocess.Popen(["sleep", "30"]))
            except BlockingIOError:
                refused += 1
        print(json.dumps({"started": len(started), "refused": refused}), flush=True)
        time.sleep(30)
        """
    )
    try:
        group.add(proc.pid)
        _go(proc)
        assert proc.stdout is not None
        result = json.loads(proc.stdout.readline())
        assert result["refused"] > 0
        assert result["started"] < 20
        assert len(group.procs()) <= 20
        hits = group.pids_limit_hits()
        assert hits is not None and hits >= result["refused"]
        peak = group.pids_peak()
        assert peak is None or peak <= 20
    finally:
        assert manager.release(group)
        _reap(proc)


_DAEMON = """
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        print(os.getpid(), flush=True)
        time.sleep(30)
    os._exit(0)
time.sleep(30)
"""


def _daemon_escapes_kill(group: AttemptCgroup) -> None:
    proc = _gated(_DAEMON)
    try:
        group.add(proc.pid)
        _go(proc)
        assert proc.stdout is not None
        daemon = int(proc.stdout.readline())
        assert psutil.Process(daemon).ppid() != proc.pid
        assert daemon in group.procs()
        group.kill()
        assert _wait_gone([daemon, proc.pid]) == []
        assert group.wait_empty(5)
    finally:
        _reap(proc)


def test_kill_takes_a_setsid_double_forked_daemon(manager: CgroupManager) -> None:
    group = manager.create("daemon")
    assert group is not None
    try:
        _daemon_escapes_kill(group)
    finally:
        assert manager.release(group)


def test_kill_of_a_cgroup_whose_processes_have_exited_says_none_is_left(manager: CgroupManager) -> None:
    group = manager.create("emptied")
    assert group is not None
    proc = subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.PIPE)
    try:
        group.add(proc.pid)
        assert proc.wait(timeout=30) == 0
        assert group.procs() == []
        assert group.kill()
        assert group.procs() == []
    finally:
        _reap(proc)  # type: ignore[arg-type]
        assert manager.release(group)


def test_kill_without_cgroup_kill_freezes_and_signals_the_daemon_too() -> None:
    support = detect()
    v1_only = attrs.evolve(
        support,
        hierarchies=tuple(h for h in support.hierarchies if h.role not in ("unified", "v2")),
        kill=False,
    )
    assert v1_only.hierarchies, "needs at least one v1 hierarchy"
    mgr = CgroupManager(v1_only)
    group = mgr.create("fallback")
    assert group is not None and "unified" not in group.dirs
    try:
        _daemon_escapes_kill(group)
    finally:
        assert mgr.close()


def test_cpu_seconds_include_descendants(manager: CgroupManager) -> None:
    group = manager.create("cpu")
    assert group is not None
    proc = _gated(
        """
        child = subprocess.run([sys.executable, "-c", "import time\\nt=time.process_time()\\nwhile time.process_time()-t<0.4: pass"])
        """
    )
    try:
        group.add(proc.pid)
        _go(proc)
        assert proc.wait(timeout=30) == 0
        cpu = group.cpu_seconds()
        assert cpu is not None and cpu >= 0.35
    finally:
        _reap(proc)
        assert manager.release(group)


def test_remove_deletes_every_directory_and_is_idempotent(manager: CgroupManager) -> None:
    group = manager.create("rm", memory_mb=128, max_processes=10)
    assert group is not None
    proc = subprocess.Popen(["sleep", "30"])
    try:
        group.add(proc.pid)
        assert group.remove()
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert not [d for d in group.dirs.values() if d.exists()]
        assert group.remove()
    finally:
        _reap(proc)  # type: ignore[arg-type]
        manager.release(group)


def test_remove_now_refuses_a_cgroup_with_a_process_in_it_and_changes_nothing(manager: CgroupManager) -> None:
    group = manager.create("busy")
    assert group is not None
    proc = subprocess.Popen(["sleep", "30"])
    try:
        group.add(proc.pid)
        assert not group.remove_now()
        assert all(d.exists() for d in group.dirs.values()) and proc.poll() is None
    finally:
        assert manager.release(group)
        _reap(proc)  # type: ignore[arg-type]


def test_remove_now_deletes_a_cgroup_whose_processes_have_exited(manager: CgroupManager) -> None:
    group = manager.create("done")
    assert group is not None
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        group.add(proc.pid)
        assert proc.wait(timeout=30) == 0
        assert manager.release_now(group)
        assert not [d for d in group.dirs.values() if d.exists()]
        assert group.remove()  # and `remove` after it has nothing left to do
    finally:
        _reap(proc)  # type: ignore[arg-type]


_DYING_SUPERVISOR = f"""
import json, subprocess, sys, time
sys.path.insert(0, {SRC!r})
from liberty.jobs.supervisor.cgroups import CgroupManager
mgr = CgroupManager()
group = mgr.create("left", memory_mb=64, max_processes=10)
worker = subprocess.Popen(["sleep", "30"], start_new_session=True)
group.add(worker.pid)
print(json.dumps({{"tag": mgr.tag, "worker": worker.pid, "dirs": [str(d) for d in group.dirs.values()],
                  "roots": [str(mgr.root(h.role)) for h in mgr.support.hierarchies]}}), flush=True)
time.sleep(30)
"""


def _start_supervisor() -> tuple[subprocess.Popen[str], dict]:
    sup = subprocess.Popen([sys.executable, "-c", _DYING_SUPERVISOR], stdout=subprocess.PIPE, text=True)
    assert sup.stdout is not None
    return sup, json.loads(sup.stdout.readline())


def _kill_worker(info: dict | None) -> None:
    if info is not None and not _gone(info["worker"]):
        os.kill(info["worker"], signal.SIGKILL)


def test_cleanup_stale_removes_what_a_killed_supervisor_left(manager: CgroupManager) -> None:
    dead, left = _start_supervisor()
    try:
        dead.kill()
        dead.wait(timeout=10)
        assert all(Path(d).is_dir() for d in left["dirs"])
        assert not _gone(left["worker"])

        results = {r.tag: r for r in manager.cleanup_stale()}

        assert left["tag"] in results
        assert results[left["tag"]].removed and results[left["tag"]].processes_killed == 1
        assert not [d for d in left["dirs"] + left["roots"] if Path(d).exists()]
        assert _wait_gone([left["worker"]]) == []
    finally:
        _reap(dead)
        _kill_worker(left)


def test_cleanup_stale_spares_a_live_supervisor(manager: CgroupManager) -> None:
    live, info = _start_supervisor()
    try:
        assert info["tag"] not in {r.tag for r in manager.cleanup_stale()}
        assert all(Path(d).is_dir() for d in info["dirs"])
        assert not _gone(info["worker"])
    finally:
        _reap(live)
        manager.cleanup_stale()
        _kill_worker(info)


def test_a_parent_removed_under_the_manager_is_made_again(manager: CgroupManager) -> None:
    first = manager.create("before")
    assert first is not None and manager.release(first)
    for directory in first.dirs.values():
        directory.parent.rmdir()  # as a careless cleanup elsewhere would
    second = manager.create("after")
    assert second is not None
    assert all(d.is_dir() for d in second.dirs.values())
    assert manager.release(second)


# --- planned cgroups: made by the attempt's own process ---------------------------


def test_nothing_is_planned_before_the_parents_are_made(manager: CgroupManager) -> None:
    assert not manager.ready
    assert manager.plan("early") is None
    first = manager.create("first")
    assert first is not None and manager.release(first)
    assert manager.ready


def test_an_attempt_has_v1_memory_and_pids_cgroups_only_to_enforce_a_limit_or_count_the_peak(manager: CgroupManager) -> None:
    every = {h.role for h in manager.support.hierarchies}
    made = manager.create("first", account_memory=False)
    assert made is not None and set(made.dirs) == every - {"memory", "pids"}
    assert manager.release(made)
    limited = manager.plan("limited", memory_mb=64, max_processes=12, account_memory=False)
    memory_only = manager.plan("memory-only", memory_mb=64, account_memory=False)
    unlimited = manager.plan("unlimited", account_memory=False)
    counted = manager.plan("counted")  # the peak is the memory cgroup's to count
    assert limited is not None and memory_only is not None and unlimited is not None and counted is not None
    assert set(limited.dirs) == every
    assert set(memory_only.dirs) == every - {"pids"}
    assert set(unlimited.dirs) == every - {"memory", "pids"}
    assert set(counted.dirs) == every - {"pids"}
    assert unlimited.memory_limit_bytes is None and unlimited.pids_limit is None and not unlimited.limit_files
    for group in (limited, memory_only, unlimited, counted):
        assert manager.release(group)


def test_a_planned_cgroup_is_not_made_but_its_limits_are_decided(manager: CgroupManager) -> None:
    made = manager.create("first")
    assert made is not None and manager.release(made)
    group = manager.plan("planned", memory_mb=64, max_processes=12)
    assert group is not None and group.planned
    assert not any(d.exists() for d in group.dirs.values())
    assert group.memory_limit_bytes == 64 << 20 and group.pids_limit == 12
    values = {Path(path).name: value for path, value in group.limit_files.items()}
    assert values.get("memory.max", values.get("memory.limit_in_bytes")) == str(64 << 20)
    assert values["pids.max"] == "12"
    assert all(any(Path(path).parent == d for d in group.dirs.values()) for path in group.limit_files)
    assert manager.release(group)  # never made: nothing to remove, and that is fine


def test_after_a_planned_cgroup_was_not_made_the_next_is_made_with_its_parents(manager: CgroupManager) -> None:
    first = manager.create("first")
    assert first is not None and manager.release(first)
    for directory in first.dirs.values():
        directory.parent.rmdir()  # as a careless cleanup elsewhere would: a planned one cannot be made now
    manager.parents_lost()
    assert manager.plan("then") is None
    again = manager.create("again")
    assert again is not None and all(d.is_dir() for d in again.dirs.values())
    assert manager.release(again)
