"""The zygote: a warm, clean child runtime that forks one process per attempt.

It imports asyncio and the child runtime and nothing else: no plugin, no
connector, no credential, no supervisor state.  It runs no threads, so a fork
is safe.  Each request arrives on a SOCK_SEQPACKET control socket with four
file descriptors (protocol in/out, stdout, stderr) passed by SCM_RIGHTS
(framing in `protocol/zygote.py`); the attempt is made the supervisor's own
child (`forking.py`: one clone with CLONE_PARENT, or a double fork where that
is unavailable), which then waits for it like any child of its own.  Forking
ahead of the request is the supervisor's business (`supervisor/warm.py`): it
prepares whole attempts, sandbox included, not just processes.
"""

from __future__ import annotations

import array
import asyncio
import gc
import json
import mmap
import os
import random  # noqa: F401  (imported here for its at-fork hook, which reseeds each attempt: see `_become_attempt`)
import socket
import sys
from typing import Any

from . import channel as _channel  # noqa: F401
from . import context as _context  # noqa: F401
from . import loader as _loader
from . import runtime
from .forking import SiblingForker
from .warmup import warm_up
from .. import sandbox as _sandbox  # noqa: F401
from .._sysfiles import write_small
from ..protocol.codec import loads
from ..protocol.zygote import MAX_REQUEST, REPLY, REQUEST_FDS, REQUEST_HEADER, ZYGOTE_FD_ENV
from ..sandbox import prctl as _prctl


def main() -> None:
    fd = int(os.environ.pop(ZYGOTE_FD_ENV))
    sock = socket.socket(fileno=fd)
    _set_name("nomaflow-zygote")
    forker = SiblingForker()
    # Made once here rather than in every attempt's first `set_event_loop` (a third of its cost);
    # it holds no loop and no descriptor, only the (empty) per-thread slot for one.
    asyncio.get_event_loop_policy()
    # The shipped rehearsal stand-in is ours, not a plugin: compiled once here, not in every spare.
    try:
        _loader.keep_compiled(os.path.join(_loader.REHEARSAL_DIR, _loader.REHEARSAL_MODULE + ".py"))
    except (OSError, SyntaxError) as exc:
        print(f"nomaflow zygote: the rehearsal stand-in could not be compiled ahead ({exc}); spares compile it", file=sys.stderr)
    # The attempt's path, quickened once here; the request read back asks for the zygote's
    # own environment, so applying it changes nothing.
    warm_up(read_request=lambda body: _replace_environ(_attempt_request(loads(body))[0]))
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
    _serve(sock, forker)


def _serve(sock: socket.socket, forker: SiblingForker) -> None:
    """Fork one attempt per request, touching as little as it can in between (see `protocol.zygote`)."""
    # One buffer for every request, nothing allocated per read; private anonymous memory, so
    # that only the pages a request filled are mapped (a zeroed bytearray is 256 pages that
    # every fork copies the page table entries of, and every attempt's exit unmaps).
    buffer = mmap.mmap(-1, MAX_REQUEST, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    ancillary = socket.CMSG_SPACE(REQUEST_FDS * 4)
    while True:
        try:
            size, ancdata, flags, _addr = sock.recvmsg_into([buffer], ancillary)
        except OSError:
            os._exit(0)
        fds = _received_fds(ancdata)
        if not size:
            os._exit(0)  # the supervisor is gone
        request_id = 0
        try:
            if size < REQUEST_HEADER.size:
                raise ValueError(f"a request of {size} bytes is shorter than its header")
            (request_id,) = REQUEST_HEADER.unpack_from(buffer)
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ValueError(f"request over {MAX_REQUEST} bytes or {REQUEST_FDS} descriptors, cut short")
            if len(fds) != REQUEST_FDS:
                raise ValueError(f"expected {REQUEST_FDS} descriptors, got {len(fds)}")
            pid = forker.fork()
            if pid == 0:
                _become_attempt(sock, bytes(buffer[REQUEST_HEADER.size : size]), fds)  # never returns
            reply = REPLY.pack(request_id, pid)
        except (ValueError, OSError) as exc:
            reply = REPLY.pack(request_id, -1) + f"{type(exc).__name__}: {exc}".encode()
        finally:
            for f in fds:
                os.close(f)
        try:
            sock.send(reply)
        except OSError:
            os._exit(0)  # the supervisor is gone


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


def _become_attempt(sock: socket.socket, body: bytes, fds: list[int]) -> None:
    """In the forked attempt: own process group, own stdio, own environment, then serve."""
    try:
        # A group of its own (the supervisor's kill takes the tree by it) in the zygote's session,
        # which has no terminal.  Not a session of its own: on a host with scheduler autogroups
        # every new session is one, so each attempt was a group of its own, which cost each run
        # 4-7% more CPU (measured) and left the supervisor one share of the CPUs among as
        # many as there were attempts; together, attempts are one group beside the supervisor.
        os.setpgid(0, 0)
        _set_name("nomaflow-step")
        sock.close()
        proto_in, proto_out, out_w, err_w = fds
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.close(out_w)
        os.close(err_w)
        env, cwd = _attempt_request(loads(body))
        _replace_environ(env)
        os.chdir(cwd)
        # `random` was reseeded by its own at-fork hook, which PyOS_AfterFork_Child runs in every
        # attempt (forking.py calls it, as os.fork() does): seeding again would read the entropy twice.
        fd_in, fd_out = runtime.adopt_protocol_fds(f"{proto_in},{proto_out}")
        os.closerange(fd_out + 1, 65536)
        runtime.serve(fd_in, fd_out)
    except BaseException as exc:  # nothing may return into the zygote's loop
        try:
            os.write(2, f"nomaflow: the attempt forked by the zygote failed outside the step: {exc!r}\n".encode())
        finally:
            os._exit(3)
    os._exit(0)


def _attempt_request(request: Any) -> tuple[dict[str, str], str]:
    """The attempt's environment and working directory, checked."""
    if not isinstance(request, dict):
        raise ValueError(f"the zygote request must be a JSON object, got {type(request).__name__}")
    env, cwd = request.get("env"), request.get("cwd")
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError("the zygote request's env must map strings to strings")
    if not isinstance(cwd, str):
        raise ValueError(f"the zygote request's cwd must be a string, got {type(cwd).__name__}")
    return env, cwd


if __name__ == "__main__":
    main()
