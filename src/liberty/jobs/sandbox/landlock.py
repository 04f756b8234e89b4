"""Landlock through raw syscalls: the kernel's own unprivileged file-system sandbox.

ctypes rather than a library so the child needs nothing new to import.  Every
access right the running kernel's ABI knows is *handled* (denied unless a rule
grants it); rights of newer ABIs are never passed to an older kernel, which
would refuse the whole ruleset with EINVAL.  Restriction applies to the calling
thread and the threads and processes it later creates, so it must run on the
child's only thread.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import sys

_SYSCALLS = {  # identical on every architecture that has Landlock (generic table, added after unification)
    "create_ruleset": 444,
    "add_rule": 445,
    "restrict_self": 446,
}
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1
_RULE_NET_PORT = 2

EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5

NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1

_FS_BY_ABI = {
    1: (1 << 13) - 1,
    2: (1 << 14) - 1,
    3: (1 << 15) - 1,
    4: (1 << 15) - 1,
    5: (1 << 16) - 1,
}
_FILE_ONLY_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV

READ_ONLY = READ_FILE | READ_DIR | EXECUTE
READ_WRITE = (
    READ_ONLY
    | WRITE_FILE
    | REMOVE_DIR
    | REMOVE_FILE
    | MAKE_DIR
    | MAKE_REG
    | MAKE_SOCK
    | MAKE_FIFO
    | MAKE_SYM
    | REFER
    | TRUNCATE
)
DEVICE_RW = READ_FILE | WRITE_FILE | TRUNCATE | IOCTL_DEV


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class LandlockError(OSError):
    """The kernel refused a Landlock call; `errno` says why."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(name: str, *args: object) -> int:
    result = _libc.syscall(_SYSCALLS[name], *args)
    if result < 0:
        err = ctypes.get_errno()
        raise LandlockError(err, f"landlock_{name}: {os.strerror(err)}")
    return result


@functools.cache  # the running kernel's: asked once per process (the zygote's answer serves its attempts)
def abi_version() -> int:
    """The kernel's Landlock ABI, 0 when Landlock is absent or disabled at boot."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        return _syscall("create_ruleset", None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except LandlockError as exc:
        if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
            return 0
        raise


def fs_rights(abi: int) -> int:
    """Every file-system right the given ABI handles (ABI 5 and later add none)."""
    if abi <= 0:
        return 0
    return _FS_BY_ABI[min(abi, 5)]


def _attr_size(abi: int) -> int:
    if abi >= 6:
        return ctypes.sizeof(_RulesetAttr)
    if abi >= 4:
        return 16
    return 8


class Ruleset:
    """Collects path rules, then `restrict()` seals the calling thread for good."""

    def __init__(self, *, abi: int | None = None, deny_tcp: bool = False, scope: bool = True) -> None:
        self.abi = abi_version() if abi is None else abi
        if self.abi < 1:
            raise LandlockError(errno.EOPNOTSUPP, "Landlock is not available on this kernel")
        self.handled_fs = fs_rights(self.abi)
        self.handled_net = NET_BIND_TCP | NET_CONNECT_TCP if deny_tcp and self.abi >= 4 else 0
        self.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if scope and self.abi >= 6 else 0
        attr = _RulesetAttr(self.handled_fs, self.handled_net, self.scoped)
        self._fd = _syscall(
            "create_ruleset", ctypes.byref(attr), ctypes.c_size_t(_attr_size(self.abi)), ctypes.c_uint32(0)
        )
        self.rules: list[tuple[str, int]] = []
        self.skipped: list[tuple[str, str]] = []
        # One rule structure and one argument list for every `add_rule`: dozens of rules per
        # attempt, and ctypes objects made afresh for each cost as much as the call itself.
        self._rule = _PathBeneathAttr(0, -1)
        self._add_rule_args = (ctypes.c_int(self._fd), ctypes.c_int(_RULE_PATH_BENEATH), ctypes.byref(self._rule), ctypes.c_uint32(0))

    def allow(self, path: str, rights: int, *, directory: bool = True) -> bool:
        """Grant `rights` beneath `path`; a missing path is noted in `skipped`, not an error.

        A path is tried as a directory first (most rules are: no fstat for those);
        `directory=False` says it is a file, opened once, with only a file's rights
        (were it a directory after all, those narrow what it grants, never widen).
        """
        if self._fd < 0:
            raise LandlockError(errno.EBADF, "landlock_add_rule: the ruleset is closed")
        rights &= self.handled_fs
        try:
            fd = -1
            if directory:
                try:
                    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                except NotADirectoryError:
                    pass  # a file after all: opened as one below
            if fd < 0:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                rights &= _FILE_ONLY_RIGHTS
        except OSError as exc:
            self.skipped.append((path, exc.strerror or str(exc)))
            return False
        try:
            self._rule.allowed_access = rights
            self._rule.parent_fd = fd
            _syscall("add_rule", *self._add_rule_args)
        finally:
            os.close(fd)
        self.rules.append((path, rights))
        return True

    def restrict(self) -> None:
        """Enforce on this thread; needs no_new_privs (or CAP_SYS_ADMIN) first."""
        try:
            _syscall("restrict_self", ctypes.c_int(self._fd), ctypes.c_uint32(0))
        finally:
            self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
