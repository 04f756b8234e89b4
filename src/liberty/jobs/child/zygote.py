"""The zygote: a warm, clean child runtime that forks one process per attempt.

It imports asyncio and the child runtime and nothing else: no plugin, no
connector, no credential, no supervisor state.  It runs no threads, so a fork
is safe.  Each request arrives on a SOCK_SEQPACKET control socket with four
file descriptors (protocol in/out, stdout, stderr) passed by SCM_RIGHTS; the
attempt is made the supervisor's own child (`forking.py`: one clone with
CLONE_PARENT, or a double fork where that is unavailable), which then waits
for it like any child of its own.  Forking ahead
of the request is the supervisor's business (`supervisor/warm.py`): it
prepares whole attempts, sandbox included, not just processes.
"""

from __future__ import annotations

import array
import asyncio
import gc
import json
import os
import random
import socket

from . import channel as _channel  # noqa: F401
from . import context as _context  # noqa: F401
from . import loader as _loader  # noqa: F401
from . import runtime
from .forking import SiblingForker
from .. import sandbox as _sandbox  # noqa: F401
from .._sysfiles import write_small
from ..sandbox import prctl as _prctl

ZYGOTE_FD_ENV = "NOMAFLOW_ZYGOTE_FD"
_MAX_REQUEST = 1024 * 1024
_NFDS = 4


def main() -> None:
    fd = int(os.environ.pop(ZYGOTE_FD_ENV))
    sock = socket.socket(fileno=fd)
    _set_name("nomaflow-zygote")
    forker = SiblingForker()
    # Made once here rather than in every attempt's first `set_event_loop` (a third of its cost);
    # it holds no loop and no descriptor, only the (empty) per-thread slot for one.
    asyncio.get_event_loop_policy()
    _run_one_event_loop()
    runtime.install_stack_dump()
    # The zygote never execs: an empty bounding set costs it nothing and spares each attempt the drop.
    # Its capabilities stay (attempts need them to seal themselves) until each attempt's capset.
    _prctl.empty_bounding_set()
    # Everything imported so far lives as long as the zygote: out of the collector's
    # reach, so a collection in an attempt does not touch (and copy) these pages.
    gc.freeze()
    try:
        sock.send(json.dumps({"ready": True, "pid": os.getpid(), "fork": forker.method, "why": forker.why}).encode())
    except OSError:
        os._exit(0)  # the supervisor gave up on this start (cancelled or gone)
    while True:
        try:
            data, ancdata, _flags, _addr = sock.recvmsg(_MAX_REQUEST, socket.CMSG_SPACE(_NFDS * 4))
        except (ConnectionResetError, OSError):
            os._exit(0)
        fds = _received_fds(ancdata)
        if not data:
            os._exit(0)  # the supervisor is gone
        try:
            request = json.loads(data)
            if len(fds) != _NFDS:
                raise ValueError(f"expected {_NFDS} descriptors, got {len(fds)}")
            reply = {"id": request.get("id"), "pid": _fork_attempt(forker, sock, request, fds)}
        except (ValueError, OSError) as exc:
            reply = {"id": None, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            for f in fds:
                os.close(f)
        try:
            sock.send(json.dumps(reply).encode())
        except OSError:
            os._exit(0)  # the supervisor is gone


def _run_one_event_loop() -> None:
    """Create, run and close a loop, so that what asyncio builds on first use is built here, once,
    not in every attempt (a fifth of an attempt's loop set-up).  Closed, it leaves no descriptor."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()


def _replace_environ(env: dict[str, str]) -> None:
    """Make `os.environ` exactly `env`, touching only what differs (most of it is the zygote's own)."""
    current = os.environ
    for key in [k for k in current if k not in env]:
        del current[key]
    for key, value in env.items():
        if current.get(key) != value:
            current[key] = value


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return fds


def _set_name(name: str) -> None:
    """What `ps -o comm` and `top` show for this process (15 bytes at most)."""
    try:
        write_small("/proc/self/comm", name.encode())
    except OSError:
        pass  # cosmetic: a process keeps its inherited name


def _fork_attempt(forker: SiblingForker, sock: socket.socket, request: dict, fds: list[int]) -> int:
    pid = forker.fork()
    if pid == 0:
        _become_attempt(sock, request, fds)  # never returns
    return pid


def _become_attempt(sock: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked attempt: own session, own stdio, own environment, then serve."""
    try:
        os.setsid()
        _set_name("nomaflow-step")
        sock.close()
        proto_in, proto_out, out_w, err_w = fds
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.close(out_w)
        os.close(err_w)
        _replace_environ(request["env"])
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
