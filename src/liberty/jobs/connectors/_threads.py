"""Blocking driver calls on worker threads, interruptible from trio.

A thread cannot be cancelled, and abandoning one would leave a connection in
use by two parties.  So a cancelled call (deadline or outer cancellation)
asks the driver to interrupt the running statement, then still waits for the
thread to finish before the connection is handed on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import outcome
import trio

T = TypeVar("T")


class _Progress:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = False
        self.done = False


async def run_interruptible(
    fn: Callable[[], T],
    interrupt: Callable[[], object],
    *,
    limiter: trio.CapacityLimiter,
) -> T:
    """Run `fn` on a worker thread; if this task is cancelled meanwhile, call `interrupt` (thread-safe)."""
    progress = _Progress()

    def work() -> T:
        with progress.lock:
            progress.started = True
        try:
            return fn()
        finally:
            with progress.lock:
                progress.done = True

    def interrupt_if_running() -> None:
        with progress.lock:
            if progress.started and not progress.done:
                try:
                    interrupt()
                except Exception:  # best effort: if it fails, the statement just runs to its end
                    pass

    async def guard() -> None:
        try:
            await trio.sleep_forever()
        finally:
            if not progress.done:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(interrupt_if_running)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(guard)
        try:
            result = await trio.to_thread.run_sync(outcome.capture, work, limiter=limiter)
        finally:
            nursery.cancel_scope.cancel()
    return result.unwrap()
