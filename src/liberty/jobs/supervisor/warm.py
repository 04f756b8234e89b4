"""Warm spares: attempt processes prepared before the request that will use them.

Preparing an attempt (fork from the zygote, its own cgroup, the sandbox
sealed, the plugins path and the event loop set up) takes milliseconds and
does not depend on the step, only on its limits.  The pool does that work in
the background for the limits the latest start asked for, so that a start
just sends `start` to a child already waiting in its sandbox.  The plugin
itself is still imported fresh after `start`.

A spare whose preparation fails is dropped and that start goes cold, which
reports the same failure on the step the usual way; after a few failures in a
row the pool stops trying for those limits.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from ..config import Limits
from ..errors import ProtocolError
from ..protocol import (
    DEFAULT_MAX_LINE,
    PROTOCOL_VERSION,
    CompiledSource,
    LineSplitter,
    Prepare,
    Prepared,
    Ready,
    decode_child_message,
    encode,
)
from ..sandbox import sandbox_problem
from .cgroups import AttemptCgroup, CgroupError
from .compiled import CompiledSources
from .containment import Containment
from .processes import stat_fields
from .spawn import ChildHandle, child_environment

_log = logging.getLogger(__name__)

PREPARE_TIMEOUT = 30.0
MAX_FAILURES = 3
# A millisecond: measured, the median back-to-back start 13% sooner and no fewer runs/s (with no
# spare left ready there is no delay; 5 ms, always, once made back-to-back starts find none).
REFILL_DELAY = 0.001
CLAIM_WAIT = 0.25  # a start waits this long at most for the spare being prepared

StartChild = Callable[..., Awaitable[ChildHandle]]  # (workdir=, env=, first=): `first` goes in its protocol pipe


class PrepareError(Exception):
    """A spare could not be prepared; the start that wanted it goes cold."""


@attrs.define(eq=False)
class PreparedChild:
    """A started attempt process, contained and sealed, waiting for its `start` message."""

    child: ChildHandle
    workdir: str
    token: str
    group: AttemptCgroup | None
    report: dict[str, Any] | None
    compiled: CompiledSource | None = None  # the expected step's module, as this child compiled it


def limits_key(limits: Limits) -> str:
    """Equal limits, equal key.  Remembered per `Limits` object: a job's steps keep theirs from run to run."""
    known = _KEYS.get(id(limits))
    if known is not None and known[0] is limits:
        return known[1]
    key = json.dumps(attrs.asdict(limits), sort_keys=True)
    if len(_KEYS) >= 256:
        _KEYS.clear()
    _KEYS[id(limits)] = (limits, key)  # holding the object keeps its id from being reused
    return key


_KEYS: dict[int, tuple[Limits, str]] = {}


async def prepare_child(
    *,
    start_child: StartChild,
    containment: Containment,
    plugins: str,
    limits: Limits,
    name: str,
    making: set[PreparedChild] | None = None,
    expect: str | None = None,
    code: CompiledSource | None = None,
) -> PreparedChild:
    """Start a child, contain it, have it seal itself; every failure is a `PrepareError` with nothing left behind.

    `making` holds the child while it is being prepared, so its owner can tell its process apart;
    `expect` is the step it will most likely run (`Prepare.expect`), `code` that step's module
    as an earlier child compiled it (`Prepare.code`).
    """
    token = uuid.uuid4().hex
    workdir = containment.workdirs.take()
    group: AttemptCgroup | None = None
    try:
        group = await containment.cgroup_for(f"{name}-{token[:8]}", limits)
        spec = containment.sandbox_spec(limits, workdir, group)
        prepare = encode(Prepare(plugins=plugins, sandbox=spec, expect=expect, code=code, rehearse=True))
        # In its pipe before it exists: the new process reads `prepare` at once, and no one
        # here has to wake up between the fork and the handshake.
        child = await start_child(workdir=workdir, env=child_environment(workdir=workdir, token=token), first=prepare)
    except BaseException as exc:  # no process was handed over (cancelled while the zygote forks it, too)
        containment.workdirs.give_back(workdir)
        if group is not None:
            containment.discard(group, None)
        if isinstance(exc, (OSError, CgroupError, ValueError, ProtocolError)):
            raise PrepareError(f"could not start the child: {type(exc).__name__}: {exc}") from exc
        raise
    spare = PreparedChild(child=child, workdir=workdir, token=token, group=group, report=None)
    if making is not None:
        making.add(spare)
    try:
        with trio.fail_after(PREPARE_TIMEOUT):
            ready, prepared = await _first_two(child)
        problem = ready_problem(ready, child.pid) or prepared_problem(prepared, sandbox=spec)
        if problem:
            raise PrepareError(f"bad handshake from the child: {problem}")
        problem = sandbox_problem(prepared.report) if prepared.report is not None else None
        if spare.group is not None:
            containment.joined(spare.group, prepared.report)  # noted if it could not make its cgroup
        if problem:
            raise PrepareError(f"the sandbox could not be applied: {problem}")
        spare.report = prepared.report
        spare.compiled = prepared.compiled
        return spare
    except (PrepareError, ProtocolError, CgroupError, OSError, ValueError, trio.TooSlowError,
            trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        await dispose(spare, containment)
        if isinstance(exc, PrepareError):
            raise
        raise PrepareError(f"{type(exc).__name__}: {exc}") from exc
    except BaseException:
        await dispose(spare, containment)
        raise
    finally:
        if making is not None:
            making.discard(spare)


def ready_problem(msg: Any, pid: int) -> str | None:
    """What is wrong with a child's first message (it must be `ready`), or None."""
    if not isinstance(msg, Ready):
        return f"expected 'ready' first, got {type(msg).__name__.lower()}"
    if msg.version != PROTOCOL_VERSION:
        return f"child speaks protocol {msg.version}, supervisor {PROTOCOL_VERSION}"
    if msg.pid != pid:
        return f"'ready' claims pid {msg.pid}, the child is pid {pid}"
    return None


def prepared_problem(msg: Any, *, sandbox: dict[str, Any] | None) -> str | None:
    """What is wrong with the child's answer to `prepare`, or None (the report itself is judged apart)."""
    if not isinstance(msg, Prepared):
        return f"expected 'prepared' after ready, got {type(msg).__name__.lower()}"
    if (msg.report is None) != (sandbox is None):
        return "'prepared' report does not match the sandbox asked for"
    if sandbox is not None and sandbox.get("cgroups") and "cgroup" not in (msg.report or {}):
        return "'prepared' report does not say whether the child joined its cgroup"
    return None


async def _first_two(child: ChildHandle) -> tuple[Any, Any]:
    """The child's first two messages, and nothing after them (it says nothing more before `start`)."""
    splitter = LineSplitter(DEFAULT_MAX_LINE)
    lines: list[bytes] = []
    while len(lines) < 2:
        data = await child.from_child.receive_some(65536)
        if not data:
            raise PrepareError("the child exited while being prepared")
        lines.extend(splitter.feed(data))
    if len(lines) > 2:
        raise PrepareError("the child sent more than 'ready' and 'prepared' before 'start'")
    return decode_child_message(lines[0]), decode_child_message(lines[1])


def is_alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return bool(fields) and fields[0] not in (b"Z", b"X")


async def dispose(spare: PreparedChild, containment: Containment) -> None:
    """Kill, reap and clean up a spare that will not run a step (no plugin code ever ran in it)."""
    with trio.CancelScope(shield=True):  # cleanup: nothing may be left half done
        if spare.group is not None:
            spare.group.kill()
        try:
            os.kill(spare.child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            await spare.child.wait()
        except ChildProcessError as exc:
            _log.warning("could not reap spare %s: %s", spare.child.pid, exc)
        await spare.child.aclose()
        containment.discard(spare.group, spare.workdir)


class SparePool:
    """Keeps up to `size` prepared children for the limits most recently asked for."""

    def __init__(self, *, start_child: StartChild, containment: Containment, plugins: str, size: int = 1) -> None:
        self._start_child = start_child
        self._containment = containment
        self._plugins = plugins
        self.size = size
        self._ready: dict[str, collections.deque[PreparedChild]] = {}
        self._preparing: collections.Counter[str] = collections.Counter()
        self._want: str | None = None  # the key of the limits the latest start asked for
        self._want_limits = Limits()
        # How many to keep for the wanted limits: one after they change, one more for each start
        # a spare serves, up to `size`; steps alternating between limits waste one spare a switch.
        self._depth = 1
        self._expect: str | None = None  # the step the latest claim was for: the next spares compile it ahead
        self._sources = CompiledSources(plugins)  # ... or are given its code, compiled by an earlier spare
        self._failures = 0  # in a row, for the wanted limits
        self._wake = trio.Event()
        self._prepared = trio.Event()
        self._waiting = False
        self._making: set[PreparedChild] = set()
        self._nursery: trio.Nursery | None = None
        self.hits = 0
        self.misses = 0

    def pids(self) -> set[int]:
        """The processes of every spare, waiting or being prepared."""
        return {s.child.pid for q in self._ready.values() for s in q} | {s.child.pid for s in self._making}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The filler; runs in the supervisor's service nursery until cancelled, then disposes of every spare."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    key = self._want
                    while key is not None and self._wanted(key):  # up to `_depth` prepared at once
                        self._preparing[key] += 1
                        nursery.start_soon(self._fill_one, key, self._want_limits, self._expect)
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                for queue in self._ready.values():
                    while queue:
                        await dispose(queue.popleft(), self._containment)

    def _wanted(self, key: str) -> bool:
        have = len(self._ready.get(key, ())) + self._preparing[key]
        return have < self._depth and self._failures < MAX_FAILURES

    async def _fill_one(self, key: str, limits: Limits, expect: str | None) -> None:
        try:
            spare = await prepare_child(
                start_child=self._start_child,
                containment=self._containment,
                plugins=self._plugins,
                limits=limits,
                name="spare",
                making=self._making,
                expect=expect,
                code=self._sources.get(expect),
            )
        except PrepareError as exc:
            if key == self._want:
                self._failures += 1
                if self._failures == MAX_FAILURES:
                    _log.warning("no warm spares for these limits after %d failures in a row; the last: %s", MAX_FAILURES, exc)
            return
        finally:
            self._preparing[key] -= 1
            if not self._preparing[key]:
                del self._preparing[key]
            self._prepared.set()
            self._prepared = trio.Event()
        if key == self._want:
            self._failures = 0
        if expect is not None and spare.compiled is not None:
            self._sources.offer(expect, spare.compiled)
        if key != self._want or self._nursery is None:
            await dispose(spare, self._containment)
            return
        self._ready.setdefault(key, collections.deque()).append(spare)

    async def claim(self, limits: Limits, expect: str | None = None) -> PreparedChild | None:
        """A prepared child for these limits, or None (then start cold); asks for the next one,
        which compiles `expect` (the step this claim is for) ahead."""
        if self.size <= 0 or self._nursery is None:
            return None
        self._expect = expect
        key = limits_key(limits)
        if key != self._want:
            self._want, self._want_limits, self._failures, self._depth = key, limits, 0, 1
            for other in [k for k in self._ready if k != key]:
                for spare in self._ready.pop(other):
                    self._nursery.start_soon(dispose, spare, self._containment)
        spare = self._take(key)
        if spare is None and self._preparing.get(key) and not self._waiting:
            # One in the making is nearer than a cold start; one start waits for it.
            self._waiting = True
            try:
                with trio.move_on_after(CLAIM_WAIT):
                    await self._prepared.wait()
            finally:
                self._waiting = False
            spare = self._take(key)
        if spare is None:
            self.misses += 1
        else:
            self.hits += 1
            self._depth = min(self.size, self._depth + 1)
        if spare is not None and self._ready.get(key):
            # Another is ready for the next start: the replacement (a fork, and a child setting
            # itself up) waits a moment rather than compete for the CPUs with the step just started.
            self._nursery.start_soon(self._wake_after, REFILL_DELAY)
        else:
            self._wake.set()
        return spare

    async def _wake_after(self, delay: float) -> None:
        await trio.sleep(delay)
        self._wake.set()

    def _take(self, key: str) -> PreparedChild | None:
        queue = self._ready.get(key)
        while queue:
            spare = queue.popleft()
            if is_alive(spare.child.pid):
                return spare
            assert self._nursery is not None
            self._nursery.start_soon(dispose, spare, self._containment)
        return None
