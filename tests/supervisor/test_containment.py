"""What a sandbox report means for an attempt (refuse, warn once, or say nothing), and the janitor."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from liberty.jobs import Job, Limits, Step, Supervisor
from liberty.jobs.sandbox import sandbox_gaps, sandbox_problem
from liberty.jobs.supervisor.cgroups import AttemptCgroup
from liberty.jobs.supervisor.containment import Containment
from supervisor_helpers import plugins_dir

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


# -- the janitor: ended attempts' cgroups and work directories -----------------


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    return plugins_dir(
        tmp_path,
        where="import os\n\n\nasync def am_i(ctx, **_):\n"
        "    return {'cwd': os.getcwd(), 'inode': os.stat('.').st_ino, 'cgroup': open('/proc/self/cgroup').read()}\n",
    )


@pytest.mark.trio
async def test_a_run_ends_only_once_its_attempts_cgroup_and_work_dir_are_gone(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:", spares=0) as sup:
        run = await sup.run(Job(name="j", steps=[Step(name="s", python="where:am_i")]))
        out = run.steps[0].output
        assert run.status == "SUCCEEDED", run.steps[0].error
        assert not os.path.exists(out["cwd"])
        groups = [line.split(":", 2)[2] for line in out["cgroup"].splitlines() if "/att-" in line]
        assert groups
        mounts = {h.mount for h in sup.containment.cgroups.support.hierarchies}  # type: ignore[union-attr]
        assert not any(os.path.exists(m + g) for m in mounts for g in groups)


@pytest.mark.trio
async def test_a_later_attempt_works_in_an_earlier_ones_pristine_dir_under_a_new_name(plugins: Path) -> None:
    job = Job(name="j", steps=[Step(name="s", python="where:am_i")])
    async with Supervisor(plugins=plugins, history=":memory:", spares=0) as sup:
        first = (await sup.run(job)).steps[0].output
        second = (await sup.run(job)).steps[0].output
    assert first["cwd"] != second["cwd"] and first["inode"] == second["inode"]


async def _ended_attempt(plugins: Path, name: str) -> tuple[Containment, AttemptCgroup, str]:
    """An opened Containment (its janitor not running) and an attempt's cgroup and work directory."""
    containment = Containment(plugins=plugins)
    await containment.open()
    group = await trio.to_thread.run_sync(containment.contain, name, Limits())
    assert group is not None
    return containment, group, containment.workdirs.take()


@pytest.mark.trio
async def test_an_attempt_that_left_nothing_behind_is_cleaned_up_at_once(plugins: Path) -> None:
    containment, group, workdir = await _ended_attempt(plugins, "at-once")
    try:
        assert containment.discard(group, workdir).is_set()  # nothing waits for the janitor
        assert not any(d.exists() for d in group.dirs.values()) and not os.path.lexists(workdir)
        assert containment.workdirs.take() != workdir  # kept for reuse under a new name
    finally:
        await containment.close()


@pytest.mark.trio
async def test_a_work_directory_with_files_in_it_is_removed_by_the_janitor(plugins: Path) -> None:
    containment, group, workdir = await _ended_attempt(plugins, "files-left")
    Path(workdir, "output.csv").write_text("a,b\n")
    done = containment.discard(group, workdir)
    assert not done.is_set() and Path(workdir, "output.csv").exists()
    assert not any(d.exists() for d in group.dirs.values())  # empty: removed at once all the same
    await containment.close()
    assert done.is_set() and not os.path.lexists(workdir)


@pytest.mark.trio
async def test_what_the_janitor_did_not_reach_is_cleaned_up_on_close(plugins: Path) -> None:
    containment, group, workdir = await _ended_attempt(plugins, "janitor-test")
    left_behind = await trio.lowlevel.open_process(["sleep", "60"])  # a process the attempt left in its cgroup
    group.add(left_behind.pid)
    done = containment.discard(group, workdir)
    assert not done.is_set() and all(d.exists() for d in group.dirs.values())
    await containment.close()
    assert done.is_set()
    assert not os.path.lexists(workdir) and not any(d.exists() for d in group.dirs.values())
    assert await left_behind.wait() == -9  # killed with the cgroup


@pytest.mark.trio
async def test_after_the_first_attempt_each_makes_its_own_cgroup_before_it_runs(plugins: Path) -> None:
    job = Job(name="j", steps=[Step(name="s", python="where:am_i")])
    async with Supervisor(plugins=plugins, history=":memory:", spares=0) as sup:
        made_here: list[str] = []
        contain = sup.containment.contain

        def watched(name: str, limits: Limits) -> object:
            made_here.append(name)
            return contain(name, limits)

        sup.containment.contain = watched  # type: ignore[method-assign]
        first = await sup.run(job)  # its cgroup is made on a worker thread, parents included
        second = await sup.run(job)
    assert first.status == second.status == "SUCCEEDED", second.steps[0].error
    assert len(made_here) == 1 and first.run_id in made_here[0]
    for run in (first, second):
        groups = [line for line in run.steps[0].output["cgroup"].splitlines() if "/att-" in line]
        roles = {h.role for h in sup.containment.cgroups.support.hierarchies} - {"memory", "pids"}  # type: ignore[union-attr]
        assert len(groups) == len(roles)  # no memory or process limit: no v1 memory or pids cgroup


@pytest.mark.trio
async def test_an_attempt_that_cannot_make_its_cgroup_is_refused_and_the_next_one_runs(plugins: Path) -> None:
    job = Job(name="j", steps=[Step(name="s", python="where:am_i")])
    async with Supervisor(plugins=plugins, history=":memory:", spares=0) as sup:
        first = await sup.run(job)
        cgroups = sup.containment.cgroups
        assert cgroups is not None
        for h in cgroups.support.hierarchies:
            root = cgroups.root(h.role)
            assert root is not None
            root.rmdir()  # empty once the run ended; as a careless cleanup elsewhere would
        refused = await sup.run(job)
        again = await sup.run(job)
    assert first.status == again.status == "SUCCEEDED", again.steps[0].error
    assert refused.status == "FAILED"
    assert refused.steps[0].attempt_records[0].reason == "sandbox"
    assert "cgroup" in refused.steps[0].error["message"]


def test_the_spec_names_the_readable_paths_that_are_files(plugins: Path, tmp_path: Path) -> None:
    (tmp_path / "extra.conf").write_text("x")
    spec = Containment(plugins=plugins).sandbox_spec(Limits(readable=[str(tmp_path / "extra.conf")]), str(tmp_path), None)
    assert spec is not None
    assert str(tmp_path / "extra.conf") in spec["readable_files"] and "/etc/passwd" in spec["readable_files"]
    assert "/usr" in spec["readable"] and not any(os.path.isfile(p) for p in spec["readable"])


@pytest.mark.trio
async def test_quick_steps_end_through_their_cgroup_without_walking_the_process_tree(plugins: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Their report and exit come together; the report is read first, so the cgroup is known joined."""
    from liberty.jobs.supervisor import session

    walks: list[int] = []
    monkeypatch.setattr(session, "kill_tree", lambda pid, **_: walks.append(pid))
    job = Job(name="j", steps=[Step(name="s", python="where:am_i")])
    async with Supervisor(plugins=plugins, history=":memory:") as sup:
        handles = [await sup.start(job) for _ in range(40)]
        runs = [await h.wait() for h in handles]
    assert all(r.status == "SUCCEEDED" for r in runs)
    assert walks == []
