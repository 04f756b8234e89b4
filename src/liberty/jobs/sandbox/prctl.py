"""prctl and capability calls the sandbox and the supervisor both need."""

from __future__ import annotations

import ctypes
import os

from .._sysfiles import read_small

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_GET_SECUREBITS = 27
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37

# noroot + no_setuid_fixup + keep_caps_locked + no_cap_ambient_raise, each with its lock bit
_SECURE_NOROOT_ALL = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]  # converted in C, no objects made


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    result = _libc.prctl(option, arg2, arg3, arg4, arg5)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    return result


def set_dumpable(on: bool) -> None:
    """Off: same-uid processes without CAP_SYS_PTRACE can no longer ptrace us or read /proc/<pid>/environ|mem."""
    prctl(PR_SET_DUMPABLE, 1 if on else 0)


def is_dumpable() -> bool:
    return prctl(PR_GET_DUMPABLE) == 1


def is_subreaper() -> bool:
    value = ctypes.c_int(0)
    prctl(PR_GET_CHILD_SUBREAPER, ctypes.addressof(value))
    return value.value == 1


def set_no_new_privs() -> None:
    """Irreversible: execve can no longer grant privileges (setuid bits, file capabilities)."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def has_no_new_privs() -> bool:
    return prctl(PR_GET_NO_NEW_PRIVS) == 1


def _last_cap() -> int:
    try:
        return int(read_small("/proc/sys/kernel/cap_last_cap"))
    except OSError:
        return 40


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_CapDataPair = _CapData * 2  # a new class the first time: made here, at import, not in every attempt


def drop_capabilities() -> int:
    """Drop every capability for good, staying at the current uid; return the bounding set left.

    The bounding set is emptied first (needs CAP_SETPCAP) so a later execve
    cannot hand root its capabilities back; securebits make uid 0 ordinary.
    """
    try:
        prctl(PR_SET_SECUREBITS, _SECURE_NOROOT_ALL)
    except PermissionError:
        pass  # no CAP_SETPCAP: nothing to guard, we hold no capabilities worth keeping
    bounding = empty_bounding_set()
    try:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:
        pass
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _CapDataPair()
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    return bounding


def empty_bounding_set() -> int:
    """Drop what is left in the bounding set; return what stays in it (0 unless refused).

    The capabilities held now stay until `capset`.  The zygote empties its own
    once, so its attempts (which inherit it) have nothing left to drop.
    """
    global _bounding_empty
    if _bounding_empty:
        return 0  # a bounding set only ever shrinks, for this process and all it forks
    remaining = bounding_capabilities()
    for cap in range(_last_cap() + 1):
        if not remaining >> cap & 1:
            continue
        try:
            prctl(PR_CAPBSET_DROP, cap)
        except PermissionError:
            break
        except OSError:
            continue
        remaining &= ~(1 << cap)
    _bounding_empty = remaining == 0
    return remaining


_bounding_empty = False


def held_capabilities() -> int:
    """The effective set, from capget(2): cheaper than reading /proc/self/status."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _CapDataPair()
    if _libc.capget(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capget: {os.strerror(err)}")
    return data[0].effective | data[1].effective << 32


def effective_capabilities() -> int:
    return capability_sets()["CapEff"]


def bounding_capabilities() -> int:
    return capability_sets()["CapBnd"]


def capability_sets() -> dict[str, int]:
    """CapInh, CapPrm, CapEff, CapBnd and CapAmb of this thread, from one read of /proc/self/status."""
    sets = {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapBnd": 0, "CapAmb": 0}
    for line in read_small("/proc/self/status").decode().splitlines():
        if line.startswith("Cap"):
            key, _, value = line.partition(":")
            if key in sets:
                sets[key] = int(value.split()[0], 16)
    return sets
