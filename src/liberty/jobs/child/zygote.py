"""The zygote: a warm, clean child runtime that forks one process per attempt.

It imports asyncio and the child runtime and nothing else: no plugin, no
connector, no credential, no supervisor state.  It runs no threads, so a fork
is safe.  Each request arrives on a SOCK_SEQPACKET control socket with four
file descriptors (protocol in/out, stdout, stderr) passed by SCM_RIGHTS; the
zygote double-forks so the attempt re-parents to the supervisor (a child
subreaper) which then waits for it like any child of its own.
"""

from __future__ import annotations

import array
import asyncio  # noqa: F401  (preloaded: the point of the zygote)
import json
import os
import random
import socket
import struct
from collections.abc import Callable

from . import channel as _channel  # noqa: F401
from . import context as _context  # noqa: F401
from . import loader as _loader  # noqa: F401
from . import runtime
from .. import sandbox as _sandbox  # noqa: F401

ZYGOTE_FD_ENV = "NOMAFLOW_ZYGOTE_FD"
SPARES_FD_ENV = "NOMAFLOW_ZYGOTE_SPARES_FD"
_MAX_REQUEST = 1024 * 1024
_NFDS = 4


def main() -> None:
    fd = int(os.environ.pop(ZYGOTE_FD_ENV))
    spares_fd = int(os.environ.pop(SPARES_FD_ENV))
    sock = socket.socket(fileno=fd)
    sock.send(json.dumps({"ready": True, "pid": os.getpid()}).encode())
    spare: _Spare | None = None
    while True:
        if spare is None:
            spare = _make_spare(sock, spares_fd)  # off the critical path: while no request waits
        try:
            data, ancdata, _flags, _addr = sock.recvmsg(_MAX_REQUEST, socket.CMSG_SPACE(_NFDS * 4))
        except (ConnectionResetError, OSError):
            os._exit(0)
        fds = _received_fds(ancdata)
        if not data:
            os._exit(0)  # the supervisor is gone; the spare sees EOF and exits too
        try:
            request = json.loads(data)
            if len(fds) != _NFDS:
                raise ValueError(f"expected {_NFDS} descriptors, got {len(fds)}")
            pid, spare = _hand_to_spare(spare, data, fds), None
            if pid is None:
                pid = _fork_attempt(sock, request, fds)
            reply = {"id": request.get("id"), "pid": pid}
        except (ValueError, OSError) as exc:
            reply = {"id": None, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            for f in fds:
                os.close(f)
        sock.send(json.dumps(reply).encode())


class _Spare:
    """An attempt process forked ahead of its request, waiting for it on its own socket."""

    def __init__(self, pid: int, channel: socket.socket) -> None:
        self.pid = pid
        self.channel = channel


def _make_spare(sock: socket.socket, spares_fd: int) -> _Spare | None:
    """Fork the next attempt ahead of time; its pid goes to the supervisor, which reaps it if unused."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = _double_fork(lambda: _wait_as_spare(sock, ours, theirs, spares_fd))
    except OSError:
        ours.close()
        theirs.close()
        return None
    theirs.close()
    os.write(spares_fd, struct.pack("i", pid))
    return _Spare(pid, ours)


def _wait_as_spare(control: socket.socket, ours: socket.socket, theirs: socket.socket, spares_fd: int) -> None:
    control.close()
    ours.close()
    os.close(spares_fd)
    try:
        data, ancdata, _flags, _addr = theirs.recvmsg(_MAX_REQUEST, socket.CMSG_SPACE(_NFDS * 4))
    except OSError:
        os._exit(0)
    fds = _received_fds(ancdata)
    if not data or len(fds) != _NFDS:
        os._exit(0)  # the zygote is gone, or sent nothing usable
    theirs.close()
    _become_attempt(None, json.loads(data), fds)


def _hand_to_spare(spare: _Spare | None, data: bytes, fds: list[int]) -> int | None:
    """Give the request to the waiting spare; None if there is none or it is gone."""
    if spare is None:
        return None
    try:
        spare.channel.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    except OSError:
        return None
    finally:
        spare.channel.close()
    return spare.pid


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return fds


def _fork_attempt(sock: socket.socket, request: dict, fds: list[int]) -> int:
    return _double_fork(lambda: _become_attempt(sock, request, fds))


def _double_fork(become: Callable[[], None]) -> int:
    """Fork twice so the process re-parents to the supervisor (a subreaper); return its pid."""
    report_r, report_w = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(report_r)
            pid = os.fork()
            if pid == 0:
                os.close(report_w)
                become()
            os.write(report_w, struct.pack("i", pid))
        finally:
            os._exit(0)
    os.close(report_w)
    try:
        data = os.read(report_r, 4)
    finally:
        os.close(report_r)
        os.waitpid(middle, 0)
    if len(data) != 4:
        raise OSError("the intermediate fork died before reporting the attempt's pid")
    return struct.unpack("i", data)[0]


def _become_attempt(sock: socket.socket | None, request: dict, fds: list[int]) -> None:
    """In the forked attempt: own session, own stdio, own environment, then serve."""
    try:
        os.setsid()
        if sock is not None:
            sock.close()
        proto_in, proto_out, out_w, err_w = fds
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.close(out_w)
        os.close(err_w)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        random.seed()
        fd_in, fd_out = runtime.adopt_protocol_fds(f"{proto_in},{proto_out}")
        os.closerange(fd_out + 1, 65536)
        runtime.serve(fd_in, fd_out)
    except BaseException as exc:  # nothing may return into the zygote's loop
        try:
            os.write(2, f"nomaflow: the attempt forked by the zygote failed outside the step: {exc!r}\n".encode())
        finally:
            os._exit(3)
    os._exit(0)


if __name__ == "__main__":
    main()
