"""Resource limits hit by a real child: file size, open files, CPU, processes."""

from __future__ import annotations

import errno
import signal
import time
from typing import Any

import attrs
import pytest

from liberty.jobs.sandbox import SandboxSpec

Runner = Any  # conftest.run_sandboxed

pytestmark = pytest.mark.timeout(60)


def test_writing_past_max_file_mb_raises_efbig(run_sandboxed: Runner, base_spec: SandboxSpec) -> None:
    out = run_sandboxed(
        attrs.evolve(base_spec, max_file_mb=1),
        """
        def fill():
            with open("big", "wb") as f:
                f.write(b"x" * (1 << 20))
                f.write(b"x")
        result(fill=attempt(fill), size=os.path.getsize("big"))
        """,
    )
    assert out.report["rlimit_fsize"].applied
    assert out.result == {"fill": {"ok": False, "error": "OSError", "errno": errno.EFBIG}, "size": 1 << 20}


def test_opening_past_max_open_files_raises_emfile(run_sandboxed: Runner, base_spec: SandboxSpec) -> None:
    out = run_sandboxed(
        attrs.evolve(base_spec, max_open_files=32),
        """
        fds = []
        def exhaust():
            for _ in range(1000):
                fds.append(os.open("/dev/null", os.O_RDONLY))
        result(exhaust=attempt(exhaust), opened=len(fds))
        """,
    )
    assert out.result is not None
    assert out.result["exhaust"] == {"ok": False, "error": "OSError", "errno": errno.EMFILE}
    assert out.result["opened"] < 32


def test_a_busy_loop_dies_of_sigxcpu_at_the_cpu_limit(run_sandboxed: Runner, base_spec: SandboxSpec) -> None:
    started = time.monotonic()
    out = run_sandboxed(attrs.evolve(base_spec, cpu_seconds=1), "result(started=True)\nwhile True: pass")
    assert out.returncode == -signal.SIGXCPU
    assert time.monotonic() - started < 20


def test_ignoring_sigxcpu_only_buys_the_hard_margin_then_sigkill(run_sandboxed: Runner, base_spec: SandboxSpec) -> None:
    out = run_sandboxed(
        attrs.evolve(base_spec, cpu_seconds=1),
        """
        import resource, signal
        signal.signal(signal.SIGXCPU, signal.SIG_IGN)
        result(hard=resource.getrlimit(resource.RLIMIT_CPU)[1])
        while True: pass
        """,
    )
    assert out.result == {"hard": 3}
    assert out.returncode == -signal.SIGKILL


def test_max_processes_is_reported_ineffective_for_root(run_sandboxed: Runner, base_spec: SandboxSpec) -> None:
    out = run_sandboxed(attrs.evolve(base_spec, max_processes=5), "result()")
    assert not out.report["rlimit_nproc"].applied
    assert "uid 0" in out.report["rlimit_nproc"].detail


def test_max_processes_caps_forks_after_a_uid_drop(run_sandboxed: Runner, base_spec: SandboxSpec) -> None:
    spec = attrs.evolve(base_spec, max_processes=5, uid=65534, gid=65534, landlock=False)
    out = run_sandboxed(
        spec,
        """
        import signal, time
        children, refused = [], 0
        for _ in range(50):
            try:
                pid = os.fork()
            except BlockingIOError:
                refused += 1
                continue
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            children.append(pid)
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        result(forked=len(children), refused=refused)
        """,
        before="import json, os, signal, time, pwd\n",
    )
    assert out.report["uid"].applied and out.report["rlimit_nproc"].applied, out.report.to_dict()
    assert out.result is not None
    assert out.result["forked"] < 5 and out.result["refused"] > 0
