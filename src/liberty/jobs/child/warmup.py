"""The zygote's warm-up: the attempt's path walked in-process, before the first fork.

CPython 3.11 rewrites a function's bytecode as it runs it (quickened after a
few calls, then each instruction specialised to the types it meets) and counts
calls on every code object.  An attempt forked from a zygote that never ran
that path does all of this itself, and every such write copies a page of the
zygote's memory: each attempt, again.  Walked here first, a dozen times, the
path is already quickened in the memory the attempts inherit.  Measured on the
spares' rehearsal in a forked child: 1.9-2.0 ms of CPU and 570-580 page
faults without, 1.5-1.6 ms and 490 with.

Only what has no effect outside this process is walked: the zygote request's
body parsed, the protocol over pipes of its own, the sandbox spec and a report
(the Landlock ruleset built and closed, never enforced), an event loop, what a
spare does while it waits, the import of the shipped stand-in module through
the plugins loader (then forgotten), its step run on the loop, the result
sent.  Nothing is sealed, no thread is started, every descriptor is closed,
and `sys.path`, its hooks and caches and `sys.modules` are as before.  A walk
that fails ends the warm-up, said on stderr: attempts are then only slower.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..protocol import CompiledSource, Prepare, encode
from ..sandbox import SandboxSpec, default_readable, files_apart, outermost, sandbox_problem
from ..sandbox.apply import rehearse
from .channel import Channel
from .loader import REHEARSAL_DIR, REHEARSAL_MODULE, forget_compiled, install_plugins_path
from .runtime import REHEARSAL_START, compile_expected, handshake, rehearse_start, run_attempt

WARM_UP_ROUNDS = 12  # measured: 8 to 16 quicken it all; more only leaves more holes in the heap


def warm_up(rounds: int = WARM_UP_ROUNDS, *, read_request: Callable[[bytes], object] | None = None) -> None:
    """Walk the attempt's path `rounds` times (see the module's docstring); `read_request`
    reads a zygote request's body as the attempt does: this one asks for the environment
    the process already has."""
    readable, files = files_apart(outermost(default_readable(REHEARSAL_DIR)))  # as the supervisor's spec has them
    spec = SandboxSpec(workdir=REHEARSAL_DIR, readable=readable, readable_files=files).to_dict()
    body = json.dumps({"env": dict(os.environ), "cwd": "/"}).encode()
    known: CompiledSource | None = None  # the first walk compiles the stand-in; the others are handed its code
    try:
        for _ in range(rounds):
            if read_request is not None:
                read_request(body)
            known = _walk(spec, known) or known
    except Exception as exc:  # a slower zygote, not a broken one
        print(f"nomaflow zygote: warm-up stopped ({type(exc).__name__}: {exc}); attempts start without it", file=sys.stderr)
    finally:
        asyncio.set_event_loop(None)


def _walk(spec: dict[str, object], known: CompiledSource | None) -> CompiledSource | None:
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    loop: asyncio.AbstractEventLoop | None = None
    try:
        # What the supervisor sends a spare, then the attempt's own steps.
        prepare_msg = Prepare(plugins=REHEARSAL_DIR, sandbox=spec, expect=REHEARSAL_START.function, code=known)
        os.write(w_in, encode(prepare_msg) + encode(REHEARSAL_START))
        channel = Channel(r_in, w_out)
        prepare = channel.receive()
        if not isinstance(prepare, Prepare):
            raise TypeError(f"the warm-up read back {type(prepare).__name__}, not its prepare")
        report = rehearse(SandboxSpec.from_dict(spec))
        sandbox_problem(report)
        with _plugins_path(prepare.plugins):
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            rehearse_start(loop, prepare.plugins)  # what a spare does while it waits
            fresh = compile_expected(prepare)
            channel.send(handshake(report, fresh))
            run_attempt(channel, channel.wait_start(), prepare.plugins, loop)
            return fresh
    finally:
        if loop is not None:
            loop.close()
        for fd in (r_in, w_in, r_out, w_out):
            os.close(fd)


@contextmanager
def _plugins_path(plugins: str) -> Iterator[None]:
    """`install_plugins_path` for the walk, and everything it and the import left undone again."""
    path, hooks, cached = list(sys.path), list(sys.path_hooks), set(sys.path_importer_cache)
    install_plugins_path(plugins)
    try:
        yield
    finally:
        sys.path[:] = path
        sys.path_hooks[:] = hooks
        for key in set(sys.path_importer_cache) - cached:
            del sys.path_importer_cache[key]
        sys.modules.pop(REHEARSAL_MODULE, None)
        forget_compiled()
