"""Finding, freezing, killing and reaping an attempt's whole process tree.

A step may fork, `setsid()` and double-fork; killing its process group is not
enough.  The supervisor makes itself a child subreaper so orphans re-parent to
it instead of init, tags every attempt's environment with a token, and kills
what the descendant walk, the process group and the token find, freezing
first so nothing forks away between the walk and the kill.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Iterable

import psutil

from .._sysfiles import read_small

ATTEMPT_TOKEN_ENV = "NOMAFLOW_ATTEMPT"
_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process; False where the kernel refuses."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def tree_pids(pid: int) -> list[int]:
    """`pid` and its descendants, by walking /proc/<pid>/task/*/children.

    Costs O(size of the tree), where psutil's `children()` reads every process
    on the host: this runs for every live attempt several times a second.
    A pid read from a children list is followed only if it still names a child
    of that parent (`is_child_of`): between the read and the visit it may have
    been reaped and reused, even as a thread id of the supervisor itself, whose
    whole tree would then be counted, and killed.
    """
    out: list[int] = []
    seen = {pid}
    stack = [pid]
    while stack:
        current = stack.pop()
        out.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = [int(x) for x in read_small(f"/proc/{current}/task/{tid}/children").split()]
            except (OSError, ValueError):
                continue
            for child in children:
                if child not in seen and is_child_of(child, current):
                    seen.add(child)
                    stack.append(child)
    return out


def is_child_of(pid: int, parent: int) -> bool:
    """True if `pid` is now a process (or thread) whose parent process is `parent`."""
    fields = stat_fields(pid)
    return fields is not None and len(fields) > 1 and fields[1] == str(parent).encode()


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat: with the pid, a process identity that survives pid reuse."""
    fields = stat_fields(pid)
    return fields[19].decode() if fields else None


def supervisor_tag(pid: int | None = None) -> str:
    """`sup-<pid>-<start time>`: names what a supervisor leaves on the host (cgroups, work dirs),
    so that a later one can tell whether its owner is still alive."""
    pid = os.getpid() if pid is None else pid
    return f"sup-{pid}-{_start_time(pid)}"


def supervisor_alive(tag: str) -> bool:
    """Whether the supervisor a `supervisor_tag` names still runs (True for what is not such a tag)."""
    parts = tag.split("-")
    if len(parts) < 2 or not parts[1].isdigit():
        return True  # not ours to judge
    start = _start_time(int(parts[1]))
    return start is not None and (len(parts) < 3 or parts[2] == start)


def stat_fields(pid: int) -> list[bytes] | None:
    """/proc/<pid>/stat after the command name (state first, as `proc(5)` numbers from 3); None if gone.

    Still readable for a zombie; the name is cut at its last ")" since it may hold spaces.
    """
    try:
        return read_small(f"/proc/{pid}/stat").rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _processes(pids: Iterable[int]) -> list[psutil.Process]:
    out = []
    for pid in pids:
        try:
            out.append(psutil.Process(pid))
        except psutil.Error:
            continue
    return out


def descendants(pid: int) -> list[psutil.Process]:
    return _processes(tree_pids(pid)[1:])


def direct_children() -> list[int]:
    """Our children as the main thread sees them: where orphans re-parent to a subreaper."""
    me = os.getpid()
    try:
        return [int(x) for x in read_small(f"/proc/{me}/task/{me}/children").split()]
    except (OSError, ValueError):
        return []


def _has_token(proc: psutil.Process, token: str) -> bool:
    try:
        return proc.environ().get(ATTEMPT_TOKEN_ENV) == token
    except psutil.Error:
        return False


def _adopted_with_token(token: str, exclude: set[int]) -> list[psutil.Process]:
    """Orphans re-parented to us (subreaper) that carry this attempt's token."""
    found = []
    for child in _processes(pid for pid in direct_children() if pid not in exclude):
        if _has_token(child, token):
            found.append(child)
            found.extend(descendants(child.pid))
    return found


def kill_tree(
    root_pid: int,
    *,
    token: str | None = None,
    known: Iterable[psutil.Process] = (),
    spare: Iterable[int] = (),
) -> int:
    """SIGKILL the root, its group, its descendants, and token-tagged orphans; return how many died.

    `known` are processes seen earlier (psutil guards them against pid reuse);
    `spare` lists pids never to touch (other attempts' roots).  Killed
    processes that were re-parented to us are reaped here; the root is left
    for its owner to reap.
    """
    spare_set = set(spare) | _own_thread_ids()  # our pid among them
    victims: dict[int, psutil.Process] = {}
    for _ in range(20):
        found = descendants(root_pid) + [p for p in known if p.pid not in victims]
        if token:
            found.extend(_adopted_with_token(token, spare_set | {root_pid}))
        new = [
            p for p in found if p.pid not in victims and p.pid not in spare_set and p.pid != root_pid
        ]
        if not new:
            break
        for proc in new:
            victims[proc.pid] = proc
            try:
                proc.suspend()
            except psutil.Error:
                pass
    try:
        os.killpg(root_pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.kill(root_pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for proc in victims.values():
        try:
            proc.kill()
        except psutil.Error:
            pass
    _reap(victims.values())
    return len(victims)


def _own_thread_ids() -> set[int]:
    """Our pid and every thread id of ours: a signal to any of them hits this whole process."""
    me = os.getpid()
    try:
        return {int(t) for t in os.listdir(f"/proc/{me}/task")} | {me}
    except (OSError, ValueError):
        return {me}


def _reap(procs: Iterable[psutil.Process]) -> None:
    me = os.getpid()
    for proc in procs:
        try:
            if proc.ppid() != me:
                continue
            proc.wait(timeout=2)
        except psutil.TimeoutExpired:
            continue
        except psutil.Error:
            continue


def signal_name(returncode: int) -> str:
    """Popen return code to words: 'exit code 3' or 'signal SIGSEGV'."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"
