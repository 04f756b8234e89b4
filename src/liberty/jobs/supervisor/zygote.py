"""The supervisor's side of the zygote (fork server); see `child/zygote.py`.

One zygote per `Supervisor`.  Requests are serialised (the zygote forks one
attempt at a time, in about a millisecond); if the zygote dies it is restarted
on the next request.
"""

from __future__ import annotations

import array
import json
import logging
import os
import signal
import socket
import subprocess
import sys

import trio

from ..protocol.zygote import MAX_REQUEST, REPLY, REQUEST_HEADER, ZYGOTE_FD_ENV
from .spawn import ChildHandle, child_pipes, reap_adopted, reap_adopted_with_peak

_START_TIMEOUT = 30.0
_REPLY_TIMEOUT = 10.0  # a fork takes about a millisecond
_EXIT_TIMEOUT = 5.0
_log = logging.getLogger(__name__)


class ZygoteError(OSError):
    """The zygote could not fork an attempt; the caller falls back to spawning."""


class Zygote:
    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self._lock = trio.Lock()
        self._process: trio.Process | None = None
        self._sock: trio.socket.SocketType | None = None
        self._next_id = 0
        self.pid: int | None = None
        self.restarts = 0
        self.fork_method = ""  # "clone-parent", or "double-fork" with the reason in fork_note
        self.fork_note = ""

    async def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = await trio.lowlevel.open_process(
                [sys.executable, "-s", "-P", "-m", "liberty.jobs.child.zygote"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                env={**self._env, ZYGOTE_FD_ENV: str(theirs.fileno())},
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = trio.socket.from_stdlib_socket(ours)
        with trio.move_on_after(_START_TIMEOUT):
            hello = json.loads(await self._sock.recv(4096) or b"{}")
            if hello.get("ready"):
                self.pid = self._process.pid
                self.fork_method = str(hello.get("fork", ""))
                self.fork_note = str(hello.get("why", ""))
                if self.fork_note and self.restarts == 0:
                    _log.warning("zygote: forking attempts with a double fork (%s)", self.fork_note)
                return
        await self._stop()
        raise ZygoteError("the zygote did not start (no ready message)")

    async def _stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._process is not None:
            with trio.move_on_after(5):
                await self._process.wait()
            if self._process.returncode is None:
                self._process.kill()
                await self._process.wait()
            self._process = None
        self.pid = None

    async def aclose(self) -> None:
        async with self._lock:
            with trio.CancelScope(shield=True):
                await self._stop()

    async def fork(self, *, workdir: str, env: dict[str, str], first: bytes = b"") -> ChildHandle:
        """A new attempt process, forked by the zygote; `first` waits for it in its protocol pipe."""
        (to_child_r, to_child_w), (from_child_r, from_child_w) = child_pipes(first)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        theirs = [to_child_r, from_child_w, out_w, err_w]
        ours = [to_child_w, from_child_r, out_r, err_r]
        try:
            async with self._lock:
                pid = await self._request(theirs, {"env": env, "cwd": workdir})
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
        except BaseException:  # cancelled while the zygote forked it: nobody else will reap it
            for fd in ours:
                os.close(fd)  # it exits on the EOF
            with trio.CancelScope(shield=True):
                await _reap_unwanted(pid)
            raise
        async def reap() -> int:
            code, handle.max_rss_bytes = await reap_adopted_with_peak(pid)
            return code

        handle = ChildHandle(
            pid,
            trio.lowlevel.FdStream(to_child_w),
            trio.lowlevel.FdStream(from_child_r),
            trio.lowlevel.FdStream(out_r),
            trio.lowlevel.FdStream(err_r),
            reap,
        )
        return handle

    async def _request(self, fds: list[int], payload: dict[str, object]) -> int:
        for attempt in range(2):
            if self._process is None or self._process.poll() is not None:
                if self._process is not None:
                    self.restarts += 1
                    await self._stop()
                await self._start()
            assert self._sock is not None
            self._next_id += 1
            data = REQUEST_HEADER.pack(self._next_id) + json.dumps(payload).encode()
            if len(data) > MAX_REQUEST:
                raise ZygoteError(f"the attempt's environment makes a {len(data)}-byte zygote request, over {MAX_REQUEST}")
            raw = b""
            try:
                # A request the zygote got forks a process: its reply is read even if the caller is
                # cancelled meanwhile (`fork` then reaps it), else the next request would read it.
                with trio.CancelScope(shield=True), trio.move_on_after(_REPLY_TIMEOUT):
                    await self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                    raw = await self._sock.recv(65536)
            except OSError:
                pass
            if not raw:  # dead, or hung past the timeout: stopped, and started again on the next request
                await self._stop()
                if attempt == 0:
                    self.restarts += 1
                    continue
                raise ZygoteError("the zygote died while forking an attempt")
            if len(raw) < REPLY.size:
                raise ZygoteError(f"the zygote sent a {len(raw)}-byte reply, shorter than {REPLY.size}")
            reply_id, pid = REPLY.unpack_from(raw)
            if reply_id != self._next_id:
                raise ZygoteError(f"the zygote answered request {reply_id}, not {self._next_id}")
            if pid <= 0:
                raise ZygoteError(f"the zygote could not fork: {raw[REPLY.size:].decode('utf-8', 'replace')}")
            return pid
        raise ZygoteError("unreachable")


async def _reap_unwanted(pid: int) -> None:
    """Reap an attempt process that was forked for a caller gone meanwhile (its pipes are closed)."""
    with trio.move_on_after(_EXIT_TIMEOUT):
        try:
            await reap_adopted(pid)
            return
        except ChildProcessError:
            return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        await reap_adopted(pid)
    except ChildProcessError as exc:
        _log.warning("zygote: could not reap an attempt forked for a cancelled start: %s", exc)
