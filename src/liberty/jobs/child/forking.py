"""Forking an attempt as the supervisor's own child, in one fork instead of two.

The zygote's attempts must be the supervisor's children (it reaps them and
reads their exit codes).  A double fork gets there by re-parenting, but the
throw-away middle process costs a whole extra fork and exit of the zygote's
address space: about a third of the zygote's CPU per attempt, measured.
`clone(CLONE_PARENT)` makes the new process our parent's child directly.

`os.fork()` cannot pass that flag, so the clone is made through libc's
`syscall()` with the interpreter's own before/after-fork hooks around it, as
`os.fork()` does.  A raw clone skips glibc's fork wrapper, which would set the
thread id that glibc caches in its thread descriptor (`raise()`,
`pthread_kill()` and `abort()` read it); `CLONE_CHILD_SETTID` has the kernel
write it instead, at the offset a probe fork finds when the zygote starts.
Where any of this is unavailable (not glibc on x86-64/aarch64, no unique offset,
the clone refused), `SiblingForker.method` says so and a double fork is used.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import struct
from collections.abc import Callable

_CLONE_PARENT = 0x00008000
_CLONE_CHILD_SETTID = 0x01000000
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}
_SCAN_BYTES = 4096

CLONE_PARENT = "clone-parent"
DOUBLE_FORK = "double-fork"


class SiblingForker:
    """Forks processes that are children of our parent.  Single-threaded callers only."""

    def __init__(self) -> None:
        self.method = DOUBLE_FORK
        self.why = ""
        self._clone = None
        try:
            self._clone = _CloneParent()
        except OSError as exc:
            self.why = str(exc)
        else:
            self.method = CLONE_PARENT

    def fork(self) -> int:
        """0 in the new process; its pid in ours.  Nothing here ever waits on it."""
        if self._clone is not None:
            return self._clone.fork()
        return _double_fork()


class _CloneParent:
    def __init__(self) -> None:
        number = _SYS_CLONE.get(platform.machine())
        if number is None:
            raise OSError(f"no clone syscall number known for {platform.machine()}")
        if platform.libc_ver()[0] != "glibc":
            raise OSError(f"libc is {platform.libc_ver()[0] or 'unknown'}, not glibc: its thread id cache is not known")
        libc = ctypes.CDLL(None, use_errno=True)
        libc.pthread_self.restype = ctypes.c_void_p
        # PyDLL keeps the GIL through the call, as os.fork() holds it across fork().
        self._syscall = ctypes.PyDLL(None, use_errno=True).syscall
        self._syscall.restype = ctypes.c_long
        self._number = ctypes.c_long(number)
        offset = _tid_offset(libc.pthread_self())
        self._tid_address = ctypes.c_void_p(libc.pthread_self() + offset)
        # The kernel's clone argument order: flags, stack, parent_tid, child_tid, tls on x86-64;
        # flags, stack, parent_tid, tls, child_tid on aarch64.
        flags = ctypes.c_ulong(_CLONE_PARENT | _CLONE_CHILD_SETTID | signal.SIGCHLD)
        null = ctypes.c_void_p(0)
        if platform.machine() == "x86_64":
            self._args = (flags, null, null, self._tid_address, null)
        else:
            self._args = (flags, null, null, null, self._tid_address)
        self._check()

    def fork(self) -> int:
        return self._clone(self._args)

    def _clone(self, args: tuple[ctypes.c_ulong | ctypes.c_void_p, ...]) -> int:
        api = ctypes.pythonapi
        api.PyOS_BeforeFork()
        pid = self._syscall(self._number, *args)
        if pid == 0:
            api.PyOS_AfterFork_Child()
            return 0
        err = ctypes.get_errno()
        api.PyOS_AfterFork_Parent()
        if pid < 0:
            raise OSError(err, f"clone(CLONE_PARENT): {os.strerror(err)}")
        return pid

    def _check(self) -> None:
        """One real clone (without CLONE_PARENT, so we reap it): the new process must find its own tid in glibc's cache."""
        flags = ctypes.c_ulong(_CLONE_CHILD_SETTID | signal.SIGCHLD)
        address = self._tid_address.value
        verdict = _ask_a_fork(
            lambda: self._clone((flags, *self._args[1:])),
            lambda: b"1" if _cached_tid(address) == os.getpid() else b"0",
        )
        if verdict != b"1":
            raise OSError("a process made by a raw clone() did not find its own thread id in glibc's cache")


def _ask_a_fork(fork: Callable[[], int], question: Callable[[], bytes]) -> bytes:
    """Fork, answer `question` in the new process, reap it; the answer, or b"" if it died first."""
    r, w = os.pipe()
    try:
        pid = fork()
        if pid == 0:
            try:
                os.write(w, question())
            finally:
                os._exit(0)
        os.close(w)
        w = -1
        answer = os.read(r, 64)
        os.waitpid(pid, 0)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    return answer


def _cached_tid(address: int | None) -> int:
    return struct.unpack("i", ctypes.string_at(address, 4))[0]


def _tid_offset(descriptor: int) -> int:
    """Where glibc keeps the thread id: the one word that holds our tid here and the child's tid after os.fork()."""
    mine = os.getpid()  # the main thread's tid
    before = ctypes.string_at(descriptor, _SCAN_BYTES)
    candidates = [o for o in range(0, _SCAN_BYTES - 3, 4) if struct.unpack_from("i", before, o)[0] == mine]

    def hits() -> bytes:
        after = ctypes.string_at(descriptor, _SCAN_BYTES)
        found = [o for o in candidates if struct.unpack_from("i", after, o)[0] == os.getpid()]
        return struct.pack("i", found[0] if len(found) == 1 else -1)

    data = _ask_a_fork(os.fork, hits)
    offset = struct.unpack("i", data)[0] if len(data) == 4 else -1
    if offset < 0:
        raise OSError(f"glibc's cached thread id not found in its thread descriptor ({len(candidates)} candidate words)")
    return offset


def _double_fork() -> int:
    """Fork twice so the process re-parents to our parent (a subreaper)."""
    report_r, report_w = os.pipe()
    middle = os.fork()
    if middle == 0:
        pid = -1
        try:
            os.close(report_r)
            pid = os.fork()
            if pid > 0:
                os.write(report_w, struct.pack("i", pid))
        finally:
            if pid != 0:
                os._exit(0)
        try:
            os.close(report_w)
        except BaseException:
            os._exit(3)  # nothing may return into the caller's loop but a clean new process
        return 0
    os.close(report_w)
    try:
        data = os.read(report_r, 4)
    finally:
        os.close(report_r)
        os.waitpid(middle, 0)
    if len(data) != 4:
        raise OSError("the intermediate fork died before reporting the new process's pid")
    return struct.unpack("i", data)[0]
