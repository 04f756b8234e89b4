"""Which sandbox measures this host allows, each tried for real in a throwaway fork.

The measures are irreversible, so every probe runs in its own forked child
that reports over a pipe and exits; the caller is left untouched.
"""

from __future__ import annotations

import json
import os
import pwd
import resource
import socket
import sys
from collections.abc import Callable
from typing import Any

from . import landlock, namespaces, prctl

UNPRIVILEGED_USERS = ("nobody", "nfsnobody")


def in_fork(check: Callable[[], str]) -> dict[str, Any]:
    """Run `check` in a forked child (irreversible measures never touch the caller): {'ok': True, 'detail': ...} or the error it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child side
        os.close(r)
        try:
            result = {"ok": True, "detail": check()}
        except BaseException as exc:  # the probe's answer, whatever it is
            result = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
        try:
            os.write(w, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        return {"ok": False, "detail": f"probe process died ({os.waitstatus_to_exitcode(status)})"}
    return json.loads(data)


def _landlock(allowed: str) -> Callable[[], str]:
    def check() -> str:
        abi = landlock.abi_version()
        if abi < 1:
            raise OSError("Landlock is not enabled in this kernel (see /sys/kernel/security/lsm)")
        prctl.set_no_new_privs()
        rules = landlock.Ruleset()
        rules.allow(allowed, landlock.READ_WRITE)
        rules.restrict()
        with open(os.path.join(allowed, "ok"), "w") as f:
            f.write("x")
        try:
            os.listdir("/")
        except PermissionError:
            return f"ABI {abi}"
        raise OSError(f"ABI {abi} reported but a read outside the rules succeeded")

    return check


def _netns() -> str:
    how = namespaces.isolate_network()
    names = [name for _, name in socket.if_nameindex()]
    return f"{how}, interfaces {names}"


def _userns() -> str:
    """Asked as an unprivileged user when we are root: that is who needs it (netns without root)."""
    user = unprivileged_user()
    if os.getuid() == 0 and user is not None:
        _become(user)
    namespaces.enter_user_namespace()
    namespaces.unshare(namespaces.CLONE_NEWNET)
    namespaces.loopback_up()
    return f"uid {os.getuid()} can create a user namespace and a network namespace inside it"


def _no_new_privs() -> str:
    prctl.set_no_new_privs()
    if not prctl.has_no_new_privs():
        raise OSError("PR_SET_NO_NEW_PRIVS did not stick")
    return "set"


def _rlimits() -> str:
    for which, value in ((resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_FSIZE, 1 << 20), (resource.RLIMIT_CPU, 3600)):
        resource.setrlimit(which, (value, value))
        if resource.getrlimit(which) != (value, value):
            raise OSError(f"rlimit {which} did not stick")
    return "RLIMIT_CPU, RLIMIT_NOFILE, RLIMIT_FSIZE settable"


def _dumpable() -> str:
    prctl.set_dumpable(False)
    if prctl.is_dumpable():
        raise OSError("PR_SET_DUMPABLE=0 did not stick")
    return "PR_SET_DUMPABLE=0 sticks"


def _drop_capabilities() -> str:
    prctl.drop_capabilities()
    eff, bnd = prctl.effective_capabilities(), prctl.bounding_capabilities()
    if eff or bnd:
        raise OSError(f"capabilities left: effective {eff:#x}, bounding {bnd:#x}")
    return f"all capabilities dropped at uid {os.getuid()}"


def unprivileged_user() -> pwd.struct_passwd | None:
    for name in UNPRIVILEGED_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


def _become(user: pwd.struct_passwd) -> None:
    os.setgroups([])
    os.setresgid(user.pw_gid, user.pw_gid, user.pw_gid)
    os.setresuid(user.pw_uid, user.pw_uid, user.pw_uid)


def _separate_uid(paths: list[str]) -> Callable[[], str]:
    def check() -> str:
        user = unprivileged_user()
        if user is None:
            raise OSError(f"no unprivileged user ({', '.join(UNPRIVILEGED_USERS)}) in the passwd database")
        if os.getuid() != 0:
            raise OSError(f"not root (uid {os.getuid()}): cannot switch to {user.pw_name}")
        _become(user)
        unreadable = [p for p in paths if not os.access(p, os.R_OK | os.X_OK)]
        if unreadable:
            raise OSError(f"{user.pw_name} (uid {user.pw_uid}) cannot read {unreadable}: the interpreter must be readable by it")
        return f"{user.pw_name} (uid {user.pw_uid}) can read the interpreter"

    return check


def probe(interpreter_paths: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """{measure: {'ok': bool, 'detail': str}} for every sandbox measure, tried in throwaway forks."""
    paths = interpreter_paths or [p for p in sys.path if p and os.path.isdir(p)]
    import tempfile  # here, not at the top: the child imports this package and never probes

    with tempfile.TemporaryDirectory(prefix="nomaflow-probe-") as allowed:
        results = {"landlock": in_fork(_landlock(allowed))}
    return results | {
        "netns": in_fork(_netns),
        "userns": in_fork(_userns),
        "no_new_privs": in_fork(_no_new_privs),
        "rlimits": in_fork(_rlimits),
        "dumpable": in_fork(_dumpable),
        "drop_capabilities": in_fork(_drop_capabilities),
        "separate_uid": in_fork(_separate_uid(paths)),
    }
