"""What this host can enforce, decided once per Supervisor, applied per attempt.

Kernel-enforced where possible: a cgroup per attempt (memory, pids, kill of
the whole population), and inside the child a sandbox sealed before the
plugin is imported (rlimits, Landlock, a private network namespace, dropped
capabilities, no_new_privs).  A protection the host lacks is detected at start
and reported by `nomaflow doctor`; one that the host has but that fails for
an attempt fails that attempt closed instead of running the plugin unprotected.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import trio

from .._sysfiles import read_small
from ..config import Limits
from ..errors import NomaflowError
from ..sandbox import SandboxSpec, default_readable, files_apart, outermost
from ..sandbox.prctl import set_dumpable
from .cgroups import AttemptCgroup, CgroupManager
from .processes import direct_children, stat_fields
from .workdirs import Workdirs

_log = logging.getLogger(__name__)

# The child's own fds (stdio, protocol, asyncio's self-pipe, the reader) and
# threads (reader, to_thread workers) are not the plugin's to count.
FD_RESERVE = 16
THREAD_RESERVE = 8
_NAME = re.compile(r"[^A-Za-z0-9_.-]")


class Containment:
    def __init__(self, *, plugins: Path, enabled: bool = True) -> None:
        self.plugins = plugins
        self.enabled = enabled
        self.cgroups: CgroupManager | None = None
        self.workdirs = Workdirs()  # every attempt's work directory comes from here and goes back to it
        self.notes: list[str] = []
        # Every attempt is reaped with its rusage (the zygote's): the peak comes from there, and a
        # v1 memory cgroup is made only to enforce a memory limit (`CgroupManager._hierarchies`).
        self.peak_from_reaper = False
        self._leftovers: list[tuple[AttemptCgroup | None, str | None, trio.Event]] = []  # for the janitor
        self._leftovers_wake = trio.Event()

    async def open(self) -> None:
        if not self.enabled:
            self.notes.append("isolation is off (isolation = false): steps run without a sandbox or cgroup")
            await self._remove_stale_workdirs()
            return
        set_dumpable(False)
        self.cgroups = await trio.to_thread.run_sync(CgroupManager)
        if not self.cgroups.enabled:
            self.notes.append(f"no cgroups ({self.cgroups.support.summary()}): falling back to process-group kills and an RSS watchdog")
        elif self.cgroups.support.missing:
            self.notes.append(f"cgroups partial: {self.cgroups.support.summary()}")
        stale = await trio.to_thread.run_sync(self.cgroups.cleanup_stale)
        for item in stale:
            self.notes.append(f"cleaned up cgroups of a dead supervisor ({item.tag}): killed {item.processes_killed} process(es)")
        await self._remove_stale_workdirs()  # after the kill: nothing of theirs still writes in them
        for note in self.notes:
            _log.warning(note)

    async def _remove_stale_workdirs(self) -> None:
        for path in await trio.to_thread.run_sync(self.workdirs.cleanup_stale):
            self.notes.append(f"removed the work directories a dead supervisor left ({path})")

    async def close(self) -> None:
        """Finish what the janitor has not (it is stopped before this), then remove the work
        directories kept for reuse and our cgroup directories."""
        with trio.CancelScope(shield=True):
            await self._clean_leftovers()
            await trio.to_thread.run_sync(self.workdirs.close)
            if self.cgroups is not None:
                await trio.to_thread.run_sync(self.cgroups.close)

    def discard(self, group: AttemptCgroup | None, workdir: str | None) -> trio.Event:
        """Remove an ended attempt's cgroup (killed, emptied) and work directory; the returned
        event is set once they are gone.

        The usual end (its processes gone, its work directory as it was made) is
        cleaned up here, at once: a few system calls.  Whatever might have to wait
        (a process still in the cgroup, files to delete, no cgroup to prove that no
        process is left) goes to the janitor's thread; the owner may do other work
        meanwhile (the run's history write) and wait for the event after, and
        `close()` still finishes everything left before the supervisor stops.
        """
        done = trio.Event()
        if group is not None and self._clean_now(group, workdir):
            done.set()
            return done
        self._leftovers.append((group, workdir, done))
        self._leftovers_wake.set()
        return done

    def _clean_now(self, group: AttemptCgroup, workdir: str | None) -> bool:
        """`_clean` for an attempt that left nothing behind, without waiting; False changes
        nothing that `_clean` would not redo.  A hop to the janitor's thread measured about a
        millisecond of wake-ups and GIL hand-offs on every run, for a quarter of that in work."""
        if self.cgroups is None or not self.cgroups.release_now(group):
            return False
        if workdir is not None and not self.workdirs.reuse(workdir):
            return False  # the cgroup is gone, so the janitor removes the directory knowing nobody writes in it
        reap_zombies_from(f"att-{group.name}")
        return True

    async def run_janitor(self) -> None:
        """Cleans up ended attempts, all that piled up in one worker-thread hop; runs until cancelled."""
        while True:
            await self._leftovers_wake.wait()
            self._leftovers_wake = trio.Event()
            await self._clean_leftovers()

    async def _clean_leftovers(self) -> None:
        leftovers, self._leftovers = self._leftovers, []
        if leftovers:
            await trio.to_thread.run_sync(self._clean, leftovers)
            for *_, done in leftovers:
                done.set()

    def _clean(self, leftovers: list[tuple[AttemptCgroup | None, str | None, trio.Event]]) -> None:
        released: list[str] = []
        for group, workdir, _ in leftovers:
            emptied = False  # every process of the attempt is known to be gone
            if group is not None and self.cgroups is not None:
                try:
                    emptied = self.cgroups.release(group)
                    if not emptied:
                        _log.warning("attempt cgroup %s left behind: %s", group.name, group.leftover)
                    released.append(f"att-{group.name}")
                except (OSError, NomaflowError) as exc:  # one attempt's leftovers must not stop the others'
                    _log.warning("could not clean up the cgroup of attempt %s: %s", group.name, exc)
            if workdir is not None:
                if emptied:
                    self.workdirs.give_back(workdir)
                else:  # a process that escaped a tree kill could still write into it: never reused
                    shutil.rmtree(workdir, ignore_errors=True)
        if released:
            reap_zombies_from(*released)  # one pass over our children for the whole batch

    def sandbox_spec(self, limits: Limits, workdir: str, group: AttemptCgroup | None = None) -> dict[str, Any] | None:
        """What the child applies to itself on `prepare`, joining `group` first."""
        if not self.enabled:
            return None
        for path in limits.writable:
            # A declared directory that does not exist yet is created, so the rule can name it.
            Path(path).mkdir(parents=True, exist_ok=True)
        spec = self._spec_without_workdir(
            limits.cpu_seconds,
            limits.max_open_files,
            limits.max_file_mb,
            limits.max_processes,
            limits.network,
            tuple(limits.readable),
            tuple(limits.writable),
        )
        if group is None:
            return {**spec, "workdir": workdir}
        return {
            **spec,
            "workdir": workdir,
            "cgroups": [str(d) for d in group.dirs.values()],
            "make_cgroups": group.planned,
            "cgroup_limits": group.limit_files,
        }

    @functools.lru_cache(maxsize=32)  # noqa: B019  (one Containment per Supervisor; steps reuse a few limits)
    def _spec_without_workdir(
        self,
        cpu_seconds: float | None,
        max_open_files: int | None,
        max_file_mb: int | None,
        max_processes: int | None,
        network: bool,
        readable: tuple[str, ...],
        writable: tuple[str, ...],
    ) -> dict[str, Any]:
        dirs, files = files_apart(list(self._readable(readable)))
        return SandboxSpec(
            workdir="",
            cpu_seconds=cpu_seconds,
            max_open_files=max_open_files + FD_RESERVE if max_open_files else None,
            max_file_mb=max_file_mb,
            max_processes=max_processes + THREAD_RESERVE if max_processes else None,
            network=network,
            readable=dirs,
            readable_files=files,
            writable=list(writable),
        ).to_dict()

    @functools.lru_cache(maxsize=32)  # noqa: B019  (one Containment per Supervisor; a few distinct lists)
    def _readable(self, extra: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(outermost(default_readable(str(self.plugins), *extra)))

    async def cgroup_for(self, name: str, limits: Limits) -> AttemptCgroup | None:
        """The attempt's cgroup with the step's limits, which its process joins (`sandbox_spec`) before any plugin code.

        Planned, for that process to make as it joins (`CgroupManager.plan`), or,
        until this supervisor's parent directories exist, made by `contain` on a
        worker thread.  Raises `CgroupError`, `OSError` or `ValueError`.
        """
        if self.cgroups is None or not self.cgroups.enabled:
            return None
        if self.cgroups.ready:
            return self.cgroups.plan(
                _cgroup_name(name),
                memory_mb=limits.memory_mb,
                max_processes=self._max_processes(limits),
                account_memory=not self.peak_from_reaper,
            )
        return await trio.to_thread.run_sync(self.contain, name, limits)

    def contain(self, name: str, limits: Limits) -> AttemptCgroup | None:
        """A fresh cgroup with the step's limits, made now, for the child to join (`sandbox_spec`).

        Blocking: call it on a worker thread.  A cgroup mkdir takes the kernel's
        global cgroup mutex, so it can wait several milliseconds behind the
        janitor's rmdirs.  The child joins the cgroup itself, so no one waits on
        a migration (which can wait for an RCU grace period).
        """
        if self.cgroups is None or not self.cgroups.enabled:
            return None
        return self.cgroups.create(
            _cgroup_name(name),
            memory_mb=limits.memory_mb,
            max_processes=self._max_processes(limits),
            account_memory=not self.peak_from_reaper,
        )

    def joined(self, group: AttemptCgroup, report: dict[str, Any] | None) -> bool:
        """Whether the child's sandbox report says it is in `group` (made by it, if planned).

        A planned one it could not make (perhaps our parent directory was removed
        under us) has the next attempt's made here, parents included.
        """
        measure = (report or {}).get("cgroup")
        if isinstance(measure, dict) and measure.get("applied") is True:
            return True
        if group.planned and self.cgroups is not None:
            self.cgroups.parents_lost()
        return False

    @staticmethod
    def _max_processes(limits: Limits) -> int | None:
        return limits.max_processes + THREAD_RESERVE if limits.max_processes else None


def _cgroup_name(name: str) -> str:
    """An attempt's name as its cgroup's: only the characters a cgroup name may have, 120 at most."""
    return _NAME.sub("_", name)[:120]


def _zombie_children() -> bool:
    """Whether any child of ours has exited and waits to be reaped (none is reaped here)."""
    try:
        return os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return False


def reap_zombies_from(*cgroup_names: str) -> int:
    """Reap the killed escapees that re-parented to us (the subreaper) from these attempts' cgroups.

    A zombie still names its cgroup in /proc/<pid>/cgroup, so only those attempts'
    are taken; nothing another part of this process started is touched.
    """
    if not _zombie_children():
        return 0  # one system call, where the scan below reads a file per child
    reaped = 0
    for pid in direct_children():
        fields = stat_fields(pid)
        if not fields or fields[0] != b"Z":
            continue
        try:
            lines = read_small(f"/proc/{pid}/cgroup").decode().splitlines()
            if not any(_names(line, name) for line in lines for name in cgroup_names):
                continue
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                reaped += 1
        except (OSError, ChildProcessError):
            continue
    return reaped


def _names(cgroup_line: str, name: str) -> bool:
    """Whether a /proc/<pid>/cgroup line is cgroup `name` or beneath it."""
    return cgroup_line.rstrip().removesuffix(" (deleted)").endswith("/" + name) or f"/{name}/" in cgroup_line

