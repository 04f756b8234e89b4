"""Warm spares: attempts prepared ahead of the request, sealed before the step is known."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio
import trio.testing

from liberty.jobs import Job, Limits, Step, Supervisor
from liberty.jobs.errors import ConfigError
from liberty.jobs.protocol import source_digest
from liberty.jobs.supervisor.containment import Containment
from liberty.jobs.supervisor.warm import SparePool, dispose, prepare_child
from liberty.jobs.supervisor.workdirs import Workdirs

from supervisor_helpers import gone, plugins_dir

pytestmark = [pytest.mark.trio, pytest.mark.timeout(60)]

PROBES = '''
import os


def whoami(ctx, **_):
    with open("/proc/self/cgroup") as f:
        cgroup = f.read()
    return {"pid": os.getpid(), "cwd": os.getcwd(), "cgroup": cgroup, "version": 1}
'''


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    return plugins_dir(tmp_path, probes=PROBES)


def job(limits: Limits | None = None) -> Job:
    return Job(name="warm", steps=[Step(name="s", python="probes:whoami", limits=limits or Limits())])


def output(run: object) -> dict:
    assert run.status == "SUCCEEDED", run.steps[0].error  # type: ignore[attr-defined]
    return run.steps[0].output  # type: ignore[attr-defined]


def pool(sup: Supervisor) -> SparePool:
    assert sup._spares is not None
    return sup._spares


async def waiting_spares(sup: Supervisor, n: int = 1) -> set[int]:
    """The pids of the spares once `n` are prepared and waiting."""
    with trio.fail_after(20):
        while len(pool(sup).pids()) < n or pool(sup)._making:
            await trio.sleep(0.01)
    return pool(sup).pids()


def status_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in f)}


async def test_the_default_is_up_to_four_spares_one_more_for_each_start_they_serve(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:") as sup:
        for expected in (1, 2, 3, 4, 4):
            output(await sup.run(job()))
            assert len(await waiting_spares(sup, expected)) == expected


async def test_after_a_change_of_limits_one_spare_is_kept_until_they_are_asked_for_again(plugins: Path) -> None:
    other = Limits(max_open_files=100)
    async with Supervisor(plugins=plugins, history=":memory:", spares=3) as sup:
        for _ in range(3):
            output(await sup.run(job()))
        await waiting_spares(sup, 3)
        output(await sup.run(job(other)))
        with trio.fail_after(10):
            while len(pool(sup).pids()) != 1 or pool(sup)._making:  # the old ones disposed of, one made
                await trio.sleep(0.01)
        await trio.sleep(0.2)
        assert len(pool(sup).pids()) == 1
        output(await sup.run(job(other)))
        assert len(await waiting_spares(sup, 2)) == 2


async def test_the_next_run_starts_in_the_spare_prepared_ahead(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:", spares=1) as sup:
        output(await sup.run(job()))
        [spare] = await waiting_spares(sup)
        hits = pool(sup).hits
        assert output(await sup.run(job()))["pid"] == spare
        assert pool(sup).hits == hits + 1


async def test_a_claim_that_takes_the_last_ready_spare_starts_its_replacement_at_once(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:", spares=1) as sup:
        output(await sup.run(job()))
        await waiting_spares(sup, 1)
        claimed = await pool(sup).claim(Limits(), "probes:whoami")
        assert claimed is not None
        try:
            assert pool(sup)._wake.is_set()
            await trio.testing.wait_all_tasks_blocked()  # the filler included: no timer stands in its way
            assert sum(pool(sup)._preparing.values()) == 1
        finally:
            await dispose(claimed, sup.containment)


async def test_a_claim_that_leaves_a_spare_ready_starts_its_replacement_a_moment_later(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:", spares=2) as sup:
        for _ in range(2):  # the second start is served by a spare: two are kept from then on
            output(await sup.run(job()))
        await waiting_spares(sup, 2)
        claimed = await pool(sup).claim(Limits(), "probes:whoami")
        assert claimed is not None
        try:
            assert not pool(sup)._wake.is_set()  # not yet: the step just started has the CPUs first
            with trio.fail_after(1):
                while not sum(pool(sup)._preparing.values()) and len(pool(sup).pids()) < 2:
                    await trio.sleep(0.0005)
        finally:
            await dispose(claimed, sup.containment)


async def test_a_waiting_spare_is_already_contained_and_sealed(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:", spares=1) as sup:
        output(await sup.run(job()))
        [spare] = await waiting_spares(sup)
        status = status_of(spare)
        with open(f"/proc/{spare}/cgroup") as f:
            cgroup = f.read()
        result = output(await sup.run(job()))
    assert status["NoNewPrivs"] == "1" and int(status["CapEff"], 16) == 0
    assert "att-spare-" in cgroup and result["cgroup"] == cgroup  # the step runs in the cgroup it waited in


async def test_an_edit_made_while_a_spare_waits_is_picked_up(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:", spares=1) as sup:
        assert output(await sup.run(job()))["version"] == 1
        [spare] = await waiting_spares(sup)
        (plugins / "probes.py").write_text(PROBES.replace('"version": 1', '"version": 2'))
        result = output(await sup.run(job()))
    assert (result["pid"], result["version"]) == (spare, 2)


async def test_spares_after_the_first_get_the_code_it_compiled_and_compile_nothing(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:", spares=1) as sup:
        output(await sup.run(job()))  # cold: the spare then made compiles probes.py and reports its code
        await waiting_spares(sup)
        kept = pool(sup)._sources.get("probes:whoami")
        assert kept is not None and kept.path == str(plugins / "probes.py")
        output(await sup.run(job()))  # in that spare; the next one is handed the code
        await waiting_spares(sup)
        [spare] = pool(sup)._ready[next(iter(pool(sup)._ready))]
        assert spare.compiled is None  # it compiled nothing, so reported nothing
        assert output(await sup.run(job()))["pid"] == spare.child.pid


async def test_an_edit_is_picked_up_by_spares_that_were_handed_the_old_code(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:", spares=1) as sup:
        for _ in range(2):
            assert output(await sup.run(job()))["version"] == 1
        await waiting_spares(sup)
        probes = plugins / "probes.py"
        probes.write_text(probes.read_text().replace('"version": 1', '"version": 2'))  # same length
        assert output(await sup.run(job()))["version"] == 2
        await waiting_spares(sup)
        assert output(await sup.run(job()))["version"] == 2  # this spare was handed the old code, and compiled
        await waiting_spares(sup)
        kept = pool(sup)._sources.get("probes:whoami")
        assert kept is not None and kept.digest == source_digest(probes.read_bytes())  # what it compiled, kept


async def test_unused_spares_are_killed_and_cleaned_up_when_the_supervisor_stops(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:", spares=2) as sup:
        for _ in range(2):
            output(await sup.run(job()))
        spares = await waiting_spares(sup, 2)
        workdirs = [os.readlink(f"/proc/{pid}/cwd") for pid in spares]
        manager = sup.containment.cgroups
        assert manager is not None and manager.enabled
        groups = [p for h in manager.support.hierarchies if (root := manager.root(h.role)) for p in root.glob("att-spare-*")]
        assert groups and all(Path(w).is_dir() for w in workdirs)
    assert all(gone(pid) for pid in spares)
    for pid in spares:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped by the supervisor, not left as a zombie of ours
    assert not any(g.exists() for g in groups) and not any(Path(w).exists() for w in workdirs)


async def test_a_step_with_other_limits_starts_cold_and_the_spares_follow_its_limits(plugins: Path) -> None:
    other = Limits(max_open_files=100)
    async with Supervisor(plugins=plugins, history=":memory:", spares=1) as sup:
        output(await sup.run(job()))
        [old] = await waiting_spares(sup)
        assert output(await sup.run(job(other)))["pid"] != old
        with trio.fail_after(10):
            while not gone(old):
                await trio.sleep(0.01)
        [new] = await waiting_spares(sup)
        assert output(await sup.run(job(other)))["pid"] == new


async def test_a_spare_that_died_while_waiting_is_not_used(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:", spares=1) as sup:
        output(await sup.run(job()))
        [spare] = await waiting_spares(sup)
        os.kill(spare, signal.SIGKILL)
        with trio.fail_after(10):
            while not gone(spare):
                await trio.sleep(0.01)
        assert output(await sup.run(job()))["pid"] != spare


async def test_a_spare_is_never_shared_by_two_steps(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:") as sup:
        handles = [await sup.start(job()) for _ in range(6)]
        pids = [output(await h.wait())["pid"] for h in handles]
    assert len(set(pids)) == len(pids)


async def test_spares_zero_turns_them_off(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:", spares=0) as sup:
        output(await sup.run(job()))
        await trio.sleep(0.2)
        assert sup._spares is None and sup._live_pids() <= {sup._zygote.pid if sup._zygote else -1}


async def test_a_negative_spares_count_is_refused(plugins: Path) -> None:
    with pytest.raises(ConfigError, match="spares"):
        Supervisor(plugins=plugins, history=":memory:", spares=-1)


async def test_a_spare_that_cannot_be_sealed_is_dropped_and_the_cold_start_reports_why(plugins: Path) -> None:
    # A writable path that cannot exist makes sealing fail: the pool gives up on those
    # limits and every run fails with reason `sandbox`, saying why, instead of running unsealed.
    bad = Limits(writable=["/proc/nomaflow-cannot-exist"])
    async with Supervisor(plugins=plugins, history=":memory:") as sup:
        runs = [await sup.run(job(bad)) for _ in range(3)]
    for run in runs:
        error = run.steps[0].error
        assert (run.status, error["reason"], error["type"]) == ("FAILED", "sandbox", "SandboxError"), error
        assert "/proc/nomaflow-cannot-exist" in error["message"]
    assert pool(sup).hits == 0


@pytest.mark.parametrize("limits", [Limits(), Limits(memory_mb=256), Limits(max_processes=50), Limits(memory_mb=256, max_processes=50)])
async def test_a_cold_started_step_joins_its_own_cgroup_in_every_hierarchy_it_needs_before_it_runs(
    plugins: Path, limits: Limits
) -> None:
    async with Supervisor(plugins=plugins, history=":memory:", spares=0) as sup:
        groups = sup.containment.cgroups
        assert groups is not None and groups.enabled
        result = output(await sup.run(job(limits)))
    lines = result["cgroup"].splitlines()
    hierarchies = {h.role for h in groups.support.hierarchies}
    if limits.memory_mb is None:
        hierarchies.discard("memory")  # v1 memory and pids cgroups only to enforce a limit
    if limits.max_processes is None:
        hierarchies.discard("pids")
    joined = [line for line in lines if "/att-" in line]
    assert len(joined) == len(hierarchies), lines  # one attempt cgroup per hierarchy it needs
    assert any(":memory:" in line for line in joined) == ("memory" in hierarchies)
    assert any(":pids:" in line for line in joined) == ("pids" in hierarchies)


async def test_limits_key_is_equal_for_equal_limits_and_differs_otherwise() -> None:
    from liberty.jobs.supervisor.warm import limits_key

    a, b, other = Limits(memory_mb=64, readable=["/x"]), Limits(memory_mb=64, readable=["/x"]), Limits(memory_mb=65)
    assert limits_key(a) == limits_key(a) == limits_key(b)
    assert limits_key(a) != limits_key(other)


async def test_a_spare_cancelled_while_its_process_starts_leaves_no_work_dir(tmp_path: Path) -> None:
    containment = Containment(plugins=tmp_path)
    containment.workdirs = Workdirs(str(tmp_path))

    async def never_started(**_: object) -> None:
        await trio.sleep_forever()

    with trio.move_on_after(0.05) as scope:
        await prepare_child(start_child=never_started, containment=containment, plugins=str(tmp_path), limits=Limits(), name="x")
    assert scope.cancelled_caught
    await containment.close()
    assert list(tmp_path.iterdir()) == []
