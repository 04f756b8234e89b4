"""Walking and killing an attempt's process tree (`supervisor/processes.py`), on real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from liberty.jobs.supervisor.processes import is_child_of, kill_tree, stat_fields, tree_pids

_TREE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.fixture
def tree():
    """A child that has started a grandchild; both killed afterwards."""
    proc = subprocess.Popen([sys.executable, "-c", _TREE], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    grandchild = int(proc.stdout.readline())
    yield proc.pid, grandchild
    for pid in (grandchild, proc.pid):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + 10
    while not _dead(grandchild) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_tree_pids_lists_the_root_then_its_descendants(tree: tuple[int, int]) -> None:
    child, grandchild = tree
    assert tree_pids(child) == [child, grandchild]


def test_is_child_of_holds_for_a_real_child(tree: tuple[int, int]) -> None:
    child, grandchild = tree
    assert is_child_of(child, os.getpid())
    assert is_child_of(grandchild, child)


def test_is_child_of_refuses_a_process_under_another_parent(tree: tuple[int, int]) -> None:
    child, grandchild = tree
    assert not is_child_of(grandchild, os.getpid())
    assert not is_child_of(child, grandchild)


def test_is_child_of_refuses_a_thread_id_of_an_unrelated_process(tree: tuple[int, int]) -> None:
    # A reaped child's pid reused as one of our threads' ids: its walk would reach our whole tree.
    child, _ = tree
    ready, done = threading.Event(), threading.Event()
    tid: list[int] = []

    def worker() -> None:
        tid.append(threading.get_native_id())
        ready.set()
        done.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        ready.wait(10)
        assert tid[0] != os.getpid()
        assert not is_child_of(tid[0], child)
    finally:
        done.set()
        thread.join()


def test_is_child_of_refuses_a_pid_that_is_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not is_child_of(proc.pid, os.getpid())


def test_kill_tree_kills_root_and_descendants_but_never_the_caller(tree: tuple[int, int]) -> None:
    child, grandchild = tree
    killed = kill_tree(child, spare=())
    assert killed == 1  # the grandchild; the root is killed but left to its owner to reap
    assert os.waitpid(child, 0)[1] == 9
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not _dead(grandchild):
        time.sleep(0.01)
    assert _dead(grandchild)


def _dead(pid: int) -> bool:
    """Gone, or a zombie (re-parented to us if an earlier test made this process a subreaper)."""
    fields = stat_fields(pid)
    if fields is not None and fields[0] == b"Z":
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass  # not ours: init reaps it
        return True
    return fields is None


_KILL_WITH_OWN_THREAD = """
import subprocess, sys, threading, psutil
from liberty.jobs.supervisor.processes import kill_tree
ready, done = threading.Event(), threading.Event()
tid = []
def worker():
    tid.append(threading.get_native_id()); ready.set(); done.wait(30)
threading.Thread(target=worker, daemon=True).start()
ready.wait(10)
root = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
kill_tree(root.pid, known=[psutil.Process(tid[0])])
root.wait()
print("alive", flush=True)
"""


def test_kill_tree_never_signals_a_thread_of_the_caller() -> None:
    # A stale pid that became one of our thread ids: SIGSTOP/SIGKILL to it would stop or kill us.
    out = subprocess.run(
        [sys.executable, "-c", _KILL_WITH_OWN_THREAD], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert (out.returncode, out.stdout.strip()) == (0, "alive"), out.stderr
