"""What a sandbox report means for an attempt: refuse, warn once, or say nothing."""

from __future__ import annotations

from liberty.jobs.supervisor.containment import sandbox_gaps, sandbox_problem

APPLIED = {"applied": True, "detail": "ok"}


def report(**measures: dict[str, object]) -> dict[str, dict[str, object]]:
    return {"landlock": APPLIED, "capabilities": APPLIED, **measures}


def test_a_failed_protection_the_host_has_refuses_the_attempt() -> None:
    problem = sandbox_problem(report(landlock={"applied": False, "detail": "EPERM"}))
    assert problem is not None and "landlock: EPERM" in problem


def test_a_fully_applied_sandbox_is_no_problem_and_no_gap() -> None:
    assert sandbox_problem(report()) is None
    assert sandbox_gaps(report(), pids_capped=False) == ""


def test_rlimit_nproc_ignored_for_root_is_a_gap_without_a_pids_cgroup() -> None:
    r = report(rlimit_nproc={"applied": False, "detail": "ignored: the child runs as uid 0"})
    assert sandbox_problem(r) is None
    assert "rlimit_nproc not applied (ignored: the child runs as uid 0)" in sandbox_gaps(r, pids_capped=False)


def test_rlimit_nproc_ignored_for_root_is_no_gap_when_the_cgroup_caps_pids() -> None:
    r = report(rlimit_nproc={"applied": False, "detail": "ignored: the child runs as uid 0"})
    assert sandbox_gaps(r, pids_capped=True) == ""


def test_a_failed_cgroup_join_refuses_the_attempt() -> None:
    problem = sandbox_problem(report(cgroup={"applied": False, "detail": "PermissionError: cgroup.procs"}))
    assert problem is not None and "cgroup: PermissionError" in problem


def test_a_prepared_report_silent_about_the_cgroup_asked_for_is_a_bad_handshake() -> None:
    from liberty.jobs.protocol import Prepared
    from liberty.jobs.supervisor.warm import prepared_problem

    asked = {"workdir": "/tmp", "cgroups": ["/sys/fs/cgroup/unified/x"]}
    assert "cgroup" in (prepared_problem(Prepared(report=report()), sandbox=asked) or "")
    assert prepared_problem(Prepared(report=report(cgroup=APPLIED)), sandbox=asked) is None
    assert prepared_problem(Prepared(report=report()), sandbox={**asked, "cgroups": []}) is None
