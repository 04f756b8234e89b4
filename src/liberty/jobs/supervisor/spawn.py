"""Starting a child interpreter for one attempt, with a scrubbed environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import attrs
import trio

import liberty.jobs

from ..protocol import PROTOCOL_FDS_ENV
from .processes import ATTEMPT_TOKEN_ENV

_PACKAGE_ROOT = str(Path(liberty.jobs.__file__).resolve().parents[2])
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_PASSTHROUGH = ("TZ", "LANG", "LC_ALL")


def child_environment(*, workdir: str, token: str, extra: dict[str, str] | None = None) -> dict[str, str]:
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
        ATTEMPT_TOKEN_ENV: token,
    }
    for key in _PASSTHROUGH:
        if key in os.environ and key != "LANG":
            env[key] = os.environ[key]
    env.update(extra or {})
    return env


@attrs.define
class ChildProcess:
    process: trio.Process
    to_child: trio.lowlevel.FdStream
    from_child: trio.lowlevel.FdStream

    @property
    def pid(self) -> int:
        return self.process.pid

    async def aclose(self) -> None:
        for stream in (self.to_child, self.from_child):
            await stream.aclose()


async def spawn_child(*, workdir: str, env: dict[str, str]) -> ChildProcess:
    """Start `python -m liberty.jobs.child` in its own session with the protocol pipes."""
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
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
    return ChildProcess(process, trio.lowlevel.FdStream(to_child_w), trio.lowlevel.FdStream(from_child_r))
