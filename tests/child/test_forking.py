"""`SiblingForker`: the zygote's attempts are born as the supervisor's own children.

Each test runs a throw-away "zygote" (`python -c`) under this test process,
which plays the supervisor: it must be able to reap the grandchild itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from liberty.jobs.child import forking
from liberty.jobs.supervisor import become_subreaper

_ZYGOTE = r"""
import json, os, signal, ssl, sys, threading
from liberty.jobs.child import forking
ssl.RAND_bytes(16)  # OpenSSL's generator is seeded before the fork: the child must not replay it
forker = forking.SiblingForker() if sys.argv[1] == "auto" else None
if forker is None:
    forker = forking.SiblingForker.__new__(forking.SiblingForker)
    forker.method, forker.why, forker._clone = forking.DOUBLE_FORK, "forced", None
r, w = os.pipe()
pid = forker.fork()
if pid == 0:
    got = []
    signal.signal(signal.SIGUSR1, lambda *a: got.append("raise"))
    signal.raise_signal(signal.SIGUSR1)       # glibc raise() reads the cached thread id
    t = threading.Thread(target=lambda: got.append("thread"))
    t.start(); t.join()
    os.write(w, json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "got": got, "openssl": ssl.RAND_bytes(16).hex()}).encode())
    os._exit(7)
os.close(w)
child = json.loads(os.read(r, 4096))
print(json.dumps({"method": forker.method, "why": forker.why, "zygote": os.getpid(), "forked": pid, "child": child,
                  "openssl": ssl.RAND_bytes(16).hex()}), flush=True)
"""


def _run_zygote(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _ZYGOTE, mode], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _reap(pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    raise AssertionError(f"process {pid} was never reaped")


@pytest.fixture(autouse=True)
def _subreaper() -> None:
    become_subreaper()  # the double fork re-parents to the nearest subreaper: us, as to the supervisor


def test_this_host_forks_with_clone_parent() -> None:
    """glibc on x86-64 (this machine): the single-fork path must be the one in use, not the fallback."""
    report = _run_zygote("auto")
    assert report["method"] == forking.CLONE_PARENT, report["why"]


@pytest.mark.parametrize("mode", ["auto", "double-fork"])
def test_the_new_process_is_our_child_and_we_reap_its_exit_code(mode: str) -> None:
    report = _run_zygote(mode)
    assert report["child"]["pid"] == report["forked"]
    assert _reap(report["forked"]) == 7


@pytest.mark.parametrize("mode", ["auto", "double-fork"])
def test_the_new_process_can_raise_signals_and_start_threads(mode: str) -> None:
    report = _run_zygote(mode)
    _reap(report["forked"])
    assert report["child"]["got"] == ["raise", "thread"]


def test_clone_parent_process_has_the_supervisor_as_parent_from_birth() -> None:
    report = _run_zygote("auto")
    _reap(report["forked"])
    assert report["child"]["ppid"] == os.getpid()
    assert report["zygote"] != os.getpid()


@pytest.mark.parametrize("mode", ["auto", "double-fork"])
def test_the_new_process_does_not_replay_openssls_random_bytes(mode: str) -> None:
    report = _run_zygote(mode)
    _reap(report["forked"])
    assert report["child"]["openssl"] != report["openssl"]
