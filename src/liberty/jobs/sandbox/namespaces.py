"""A private network namespace (loopback only), via a user namespace when not root.

Python 3.11 has no `os.unshare`, hence ctypes.  `unshare` changes the calling
thread only and CLONE_NEWUSER refuses a multi-threaded process, so this runs
on the child's only thread.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct

from .._sysfiles import write_small
from . import prctl

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1

_libc = ctypes.CDLL(None, use_errno=True)


def unshare(flags: int) -> None:
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare({flags:#x}): {os.strerror(err)}")


def enter_user_namespace() -> None:
    """Become root of a new user namespace, mapped to our own ids (no other id is reachable)."""
    uid, gid = os.geteuid(), os.getegid()
    unshare(CLONE_NEWUSER)
    # After a uid change the process is undumpable and /proc/self/* belongs to root: not writable by us.
    was_dumpable = prctl.is_dumpable()
    if not was_dumpable:
        prctl.set_dumpable(True)
    try:
        write_small("/proc/self/setgroups", b"deny")
        write_small("/proc/self/uid_map", f"{uid} {uid} 1\n".encode())
        write_small("/proc/self/gid_map", f"{gid} {gid} 1\n".encode())
    finally:
        if not was_dumpable:
            prctl.set_dumpable(False)


def loopback_up() -> None:
    """A fresh netns has `lo` down; bring it up so 127.0.0.1 works inside."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack_from("16sh", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req + b"\0" * 22))[1]
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | _IFF_UP) + b"\0" * 22)


def isolate_network() -> str:
    """Enter a new network namespace with only loopback; return how ("netns" or "userns+netns")."""
    try:
        unshare(CLONE_NEWNET)
        how = "netns"
    except PermissionError:
        enter_user_namespace()
        unshare(CLONE_NEWNET)
        how = "userns+netns"
    loopback_up()
    return how
