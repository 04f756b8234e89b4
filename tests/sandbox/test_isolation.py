"""What keeps a root child away from the supervisor's secrets, its cgroup and its signals."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from liberty.jobs.sandbox import SandboxSpec, prctl
from liberty.jobs.supervisor.cgroups import AttemptCgroup, CgroupManager

Runner = Any  # conftest.run_sandboxed

pytestmark = pytest.mark.timeout(60)

_SUPERVISOR = """
import ctypes, sys, time
if sys.argv[1] == "undumpable":
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE=0, as the real supervisor must
print("ready", flush=True)
time.sleep(60)
"""


def _supervisor(kind: str) -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SUPERVISOR, kind], env={"NOMAFLOW_SECRET": "hunter2"}, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def undumpable_supervisor() -> Iterator[int]:
    yield from _supervisor("undumpable")


@pytest.fixture
def dumpable_supervisor() -> Iterator[int]:
    yield from _supervisor("dumpable")


def _read_environ(pid: int) -> str:
    return f'result(environ=attempt(lambda: "hunter2" in open("/proc/{pid}/environ").read()))'


_DENIED = {"environ": {"ok": False, "error": "PermissionError", "errno": 13}}


def test_dropped_capabilities_hide_a_root_supervisors_environ(
    run_sandboxed: Runner, base_spec: SandboxSpec, dumpable_supervisor: int
) -> None:
    """ptrace-read needs the target's capabilities to be a subset of ours: none is no subset of root's."""
    spec = attrs.evolve(base_spec, landlock=False, drop_capabilities=True)
    out = run_sandboxed(spec, _read_environ(dumpable_supervisor))
    assert out.report["capabilities"].applied, out.report["capabilities"].detail
    assert out.result == _DENIED


def test_a_root_child_with_capabilities_reads_even_an_undumpable_supervisor(
    run_sandboxed: Runner, base_spec: SandboxSpec, undumpable_supervisor: int
) -> None:
    """Why PR_SET_DUMPABLE=0 alone is not enough as root: CAP_SYS_PTRACE overrides it."""
    spec = attrs.evolve(base_spec, landlock=False, drop_capabilities=False)
    out = run_sandboxed(spec, _read_environ(undumpable_supervisor))
    assert out.result == {"environ": {"ok": True, "value": True}}


def test_a_uid_drop_hides_even_a_dumpable_supervisor(run_sandboxed: Runner, base_spec: SandboxSpec, dumpable_supervisor: int) -> None:
    spec = attrs.evolve(base_spec, landlock=False, drop_capabilities=False, uid=65534, gid=65534)
    out = run_sandboxed(spec, _read_environ(dumpable_supervisor))
    assert out.report["uid"].applied
    assert out.result == _DENIED


def test_landlock_alone_hides_a_dumpable_supervisor(run_sandboxed: Runner, base_spec: SandboxSpec, dumpable_supervisor: int) -> None:
    spec = attrs.evolve(base_spec, drop_capabilities=False)
    out = run_sandboxed(spec, _read_environ(dumpable_supervisor))
    assert out.result == _DENIED


def test_the_child_cannot_lift_its_own_cgroup_limit(run_sandboxed: Runner, base_spec: SandboxSpec) -> None:
    mgr = CgroupManager()
    group = mgr.create("lift", memory_mb=64)
    assert group is not None
    limit = group.dirs["memory"] / "memory.limit_in_bytes"
    try:
        out = run_sandboxed(
            base_spec,
            f"result(lift=attempt(lambda: open({str(limit)!r}, 'w').write(str(1 << 40))))",
        )
        assert out.result == {"lift": {"ok": False, "error": "PermissionError", "errno": 13}}
        assert int(limit.read_text()) == 64 << 20
    finally:
        assert mgr.close()


def test_the_child_joins_its_cgroups_first_and_cannot_leave_them(run_sandboxed: Runner, base_spec: SandboxSpec) -> None:
    mgr = CgroupManager()
    group = mgr.create("join")
    assert group is not None
    spec = attrs.evolve(base_spec, cgroups=[str(d) for d in group.dirs.values()])
    parent = next(iter(group.dirs.values())).parent / "cgroup.procs"
    try:
        out = run_sandboxed(
            spec,
            "result(procs=open('/proc/self/cgroup').read().count('/att-join'),"
            f" leave=attempt(lambda: open({str(parent)!r}, 'w').write('0')))",
        )
        assert out.report["cgroup"].applied, out.report["cgroup"].detail
        assert out.result["procs"] == len(group.dirs)
        assert out.result["leave"]["ok"] is False
    finally:
        assert mgr.close()


def test_a_cgroup_the_child_cannot_join_is_reported_failed(run_sandboxed: Runner, base_spec: SandboxSpec) -> None:
    spec = attrs.evolve(base_spec, cgroups=["/sys/fs/cgroup/unified/nomaflow-no-such-cgroup"])
    out = run_sandboxed(spec, "result(ok=1)")
    assert not out.report["cgroup"].applied
    assert "nomaflow-no-such-cgroup" in out.report["cgroup"].detail


def _planned(mgr: CgroupManager, name: str, **limits: int) -> AttemptCgroup:
    first = mgr.create(f"{name}-first")  # the parents exist from here on
    assert first is not None and mgr.release(first)
    group = mgr.plan(name, **limits)
    assert group is not None
    return group


def _spec_for(base_spec: SandboxSpec, group: AttemptCgroup) -> SandboxSpec:
    return attrs.evolve(
        base_spec, cgroups=[str(d) for d in group.dirs.values()], make_cgroups=True, cgroup_limits=dict(group.limit_files)
    )


def test_the_child_makes_its_planned_cgroup_with_its_limits_before_joining_it(run_sandboxed: Runner, base_spec: SandboxSpec) -> None:
    mgr = CgroupManager()
    group = _planned(mgr, "planned", memory_mb=48, max_processes=9)
    memory = next(Path(p) for p in group.limit_files if Path(p).name in ("memory.max", "memory.limit_in_bytes"))
    try:
        out = run_sandboxed(_spec_for(base_spec, group), "result(procs=open('/proc/self/cgroup').read().count('/att-planned'))")
        assert out.report["cgroup"].applied, out.report["cgroup"].detail
        assert out.result == {"procs": len(group.dirs)}
        assert memory.read_text().strip() == str(48 << 20)
        assert Path(next(p for p in group.limit_files if p.endswith("pids.max"))).read_text().strip() == "9"
    finally:
        assert mgr.close()


def test_a_planned_cgroup_that_exists_already_is_reported_failed(run_sandboxed: Runner, base_spec: SandboxSpec) -> None:
    mgr = CgroupManager()
    group = _planned(mgr, "taken")
    next(iter(group.dirs.values())).mkdir()  # someone else's: never joined as if it were the attempt's
    try:
        out = run_sandboxed(_spec_for(base_spec, group), "result(ok=1)")
        assert not out.report["cgroup"].applied
        assert "FileExistsError" in out.report["cgroup"].detail
    finally:
        assert mgr.close()


def test_a_limit_file_outside_the_attempts_cgroups_is_refused(run_sandboxed: Runner, base_spec: SandboxSpec, tmp_path: Path) -> None:
    mgr = CgroupManager()
    group = _planned(mgr, "outside")
    elsewhere = tmp_path / "memory.max"
    elsewhere.write_text("untouched")
    spec = attrs.evolve(_spec_for(base_spec, group), cgroup_limits={str(elsewhere): "1"})
    try:
        out = run_sandboxed(spec, "result(ok=1)")
        assert not out.report["cgroup"].applied
        assert "outside the attempt's cgroups" in out.report["cgroup"].detail
        assert elsewhere.read_text() == "untouched"
    finally:
        assert mgr.close()


def test_the_child_ends_undumpable_without_capabilities(run_sandboxed: Runner, base_spec: SandboxSpec) -> None:
    out = run_sandboxed(
        base_spec,
        """
        from liberty.jobs.sandbox import prctl
        result(dumpable=prctl.is_dumpable(), caps=prctl.effective_capabilities(), bounding=prctl.bounding_capabilities(),
               no_new_privs=prctl.has_no_new_privs())
        """,
    )
    assert out.result == {"dumpable": False, "caps": 0, "bounding": 0, "no_new_privs": True}


def test_a_thread_started_before_apply_is_reported(run_sandboxed: Runner, base_spec: SandboxSpec) -> None:
    out = run_sandboxed(
        base_spec,
        "result()",
        before="import threading, time\nthreading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n",
    )
    assert not out.report["single_thread"].applied
    assert "2 threads" in out.report["single_thread"].detail


def _nobody_process(undumpable: bool) -> Iterator[int]:
    """A non-root 'supervisor': forked so it needs no interpreter files uid 65534 cannot read."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            prctl.set_dumpable(not undumpable)
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while _uid_of(pid) != 65534 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        yield pid
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Uid:"))


_SAME_UID_CHILD = {"uid": 65534, "gid": 65534, "landlock": False, "drop_capabilities": False}
_READ = 'result(environ=attempt(lambda: len(open("/proc/{pid}/environ").read()) > 0))'


def test_a_same_uid_child_reads_a_dumpable_non_root_supervisor(run_sandboxed: Runner, base_spec: SandboxSpec) -> None:
    for pid in _nobody_process(undumpable=False):
        out = run_sandboxed(attrs.evolve(base_spec, **_SAME_UID_CHILD), _READ.format(pid=pid))
        assert out.result == {"environ": {"ok": True, "value": True}}


def test_dumpable_0_hides_a_non_root_supervisor_from_same_uid_children(run_sandboxed: Runner, base_spec: SandboxSpec) -> None:
    for pid in _nobody_process(undumpable=True):
        out = run_sandboxed(attrs.evolve(base_spec, **_SAME_UID_CHILD), _READ.format(pid=pid))
        assert out.result == _DENIED


def _write_in_workdir() -> str:
    return 'result(write=attempt(lambda: open(os.path.join(os.getcwd(), "out"), "w").write("x")))'


@pytest.fixture
def reachable_workdir() -> Iterator[str]:
    """Directly under /tmp: pytest's own tmp root is 0700 root, which uid 65534 cannot traverse."""
    path = tempfile.mkdtemp(prefix="nomaflow-test-")
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_after_a_uid_drop_a_root_owned_workdir_is_not_writable_despite_landlock(
    run_sandboxed: Runner, base_spec: SandboxSpec, reachable_workdir: str
) -> None:
    """Landlock only narrows: the uid must own the work dir too (the supervisor chowns it)."""
    out = run_sandboxed(attrs.evolve(base_spec, workdir=reachable_workdir, uid=65534, gid=65534), _write_in_workdir())
    assert out.report["landlock"].applied and out.report["uid"].applied, out.report.to_dict()
    assert out.result == {"write": {"ok": False, "error": "PermissionError", "errno": 13}}


def test_after_a_uid_drop_a_chowned_workdir_is_writable_and_landlock_still_holds(
    run_sandboxed: Runner, base_spec: SandboxSpec, reachable_workdir: str
) -> None:
    os.chown(reachable_workdir, 65534, 65534)
    out = run_sandboxed(
        attrs.evolve(base_spec, workdir=reachable_workdir, uid=65534, gid=65534),
        'result(write=attempt(lambda: open("out", "w").write("x")), tmp=attempt(lambda: open("/tmp/nomaflow-escape", "w")))',
    )
    assert out.report["landlock"].applied, out.report.to_dict()
    assert out.result == {"write": {"ok": True, "value": 1}, "tmp": {"ok": False, "error": "PermissionError", "errno": 13}}


def test_landlock_rules_reach_paths_the_dropped_uid_cannot_traverse(run_sandboxed: Runner, base_spec: SandboxSpec) -> None:
    """The work dir under pytest's 0700 root still gets its rule: rules are collected before the drop."""
    out = run_sandboxed(attrs.evolve(base_spec, uid=65534, gid=65534), "result()")
    assert out.report["landlock"].applied, out.report["landlock"].detail
