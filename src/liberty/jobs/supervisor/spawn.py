"""Starting a child interpreter for one attempt, with a scrubbed environment.

Two ways, one result (a `ChildHandle`): `spawn_child` starts a fresh
`python -m liberty.jobs.child`; the zygote (`supervisor/zygote.py`) forks a
warm one.  Either way the child gets the protocol pipes, its own stdout and
stderr pipes, its own process group (a spawned one a session of its own too),
the environment given, and the work directory.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import trio

import liberty.jobs

from ..protocol import PROTOCOL_FDS_ENV
from .processes import ATTEMPT_TOKEN_ENV

_PACKAGE_ROOT = str(Path(liberty.jobs.__file__).resolve().parents[2])
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_PASSTHROUGH = ("TZ", "LC_ALL")


def child_environment(*, workdir: str, token: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """An allowlist, never a copy: the supervisor's own variables may hold secrets."""
    env = {
        "PATH": _SAFE_PATH,
        "HOME": workdir,
        "TMPDIR": workdir,
        "PYTHONPATH": _PACKAGE_ROOT,
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8:backslashreplace",
        "LANG": "C.UTF-8",
    }
    if token is not None:
        env[ATTEMPT_TOKEN_ENV] = token
    for key in _PASSTHROUGH:
        if key in os.environ:
            env[key] = os.environ[key]
    env.update(extra or {})
    return env


@attrs.define
class ChildHandle:
    """One attempt's process and its four pipes, however it was started."""

    pid: int
    to_child: trio.lowlevel.FdStream
    from_child: trio.lowlevel.FdStream
    stdout: trio.abc.ReceiveStream
    stderr: trio.abc.ReceiveStream
    _wait: Callable[[], Awaitable[int]]
    # Its peak resident size, once reaped, where the reaper got its rusage (ru_maxrss: its
    # own, or that of a descendant it waited for, whichever was larger).
    max_rss_bytes: int | None = None

    async def wait(self) -> int:
        """Reap the process; the Popen-style return code (negative for a signal)."""
        return await self._wait()

    async def aclose(self) -> None:
        for stream in (self.to_child, self.from_child, self.stdout, self.stderr):
            if isinstance(stream, trio.lowlevel.FdStream):
                stream.close()  # one checkpoint for the four, below
            else:
                await stream.aclose()
        await trio.lowlevel.checkpoint()


PIPE_BYTES = 1024 * 1024
FIRST_BYTES = 64 * 1024  # what a pipe holds at its smallest, unread


def child_pipes(first: bytes = b"") -> tuple[tuple[int, int], tuple[int, int]]:
    """(to_child_r, to_child_w), (from_child_r, from_child_w); all close-on-exec; `first`
    already written into the one to the child, for it to read first.

    Grown to 1 MiB (the protocol's line cap) where the host allows, so a stream
    batch or a big reply goes out in one write instead of 16 wake-ups.
    """
    pipes = os.pipe(), os.pipe()
    try:
        for read_end, _ in pipes:
            try:
                fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:
                pass  # above /proc/sys/fs/pipe-max-size for this user: the default size still works
        if first:
            if len(first) > FIRST_BYTES:  # more than any pipe holds: the write would wait for a reader
                raise ValueError(f"{len(first)} bytes to write before the child starts, over {FIRST_BYTES}")
            os.write(pipes[0][1], first)
    except BaseException:
        for fd in (*pipes[0], *pipes[1]):
            os.close(fd)
        raise
    return pipes


async def spawn_child(*, workdir: str, env: dict[str, str], first: bytes = b"") -> ChildHandle:
    """Start `python -m liberty.jobs.child` in its own session with the protocol pipes (`first` in its own)."""
    (to_child_r, to_child_w), (from_child_r, from_child_w) = child_pipes(first)
    child_fds = (to_child_r, from_child_w)
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-s", "-P", "-m", "liberty.jobs.child"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=child_fds,
            env={**env, PROTOCOL_FDS_ENV: f"{to_child_r},{from_child_w}"},
            cwd=workdir,
            start_new_session=True,
        )
    except BaseException:
        for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
            os.close(fd)
        raise
    for fd in child_fds:
        os.close(fd)
    assert process.stdout is not None and process.stderr is not None
    return ChildHandle(
        process.pid,
        trio.lowlevel.FdStream(to_child_w),
        trio.lowlevel.FdStream(from_child_r),
        process.stdout,
        process.stderr,
        process.wait,
    )


async def reap_adopted(pid: int) -> int:
    """Wait for and reap a process that re-parented to us (we are its subreaper).

    Right after it was forked its parent may not have exited yet, so ECHILD
    for a short while means "not ours yet", not "gone".
    """
    return (await reap_adopted_with_peak(pid))[0]


async def reap_adopted_with_peak(pid: int) -> tuple[int, int | None]:
    """`reap_adopted`, and the process's peak resident size in bytes (`ChildHandle.max_rss_bytes`)."""
    try:
        got, status, usage = os.wait4(pid, os.WNOHANG)  # usually it has exited already: no pidfd then
    except ChildProcessError:
        got, status, usage = 0, 0, None  # not (yet) ours
    if got == pid:
        await trio.lowlevel.checkpoint()
        return os.waitstatus_to_exitcode(status), _peak_bytes(usage)
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise ChildProcessError(f"process {pid} is already gone (reaped elsewhere)") from None
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    for _ in range(200):
        try:
            got, status, usage = os.wait4(pid, os.WNOHANG)
        except ChildProcessError as exc:
            if exc.errno != errno.ECHILD:
                raise
            got, status, usage = 0, 0, None
        if got == pid:
            return os.waitstatus_to_exitcode(status), _peak_bytes(usage)
        await trio.sleep(0.01)
    raise ChildProcessError(f"process {pid} exited but never became our child to reap")


def _peak_bytes(usage: resource.struct_rusage | None) -> int | None:
    return usage.ru_maxrss * 1024 if usage is not None and usage.ru_maxrss > 0 else None  # Linux: KiB
