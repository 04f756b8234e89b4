"""A call's reply reaches the event loop's thread in place when nothing else is waiting (`PendingReply`)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from liberty.jobs.child import channel
from liberty.jobs.child.channel import PendingReply
from liberty.jobs.protocol import Reply

pytestmark = pytest.mark.asyncio


def deliver_later(pending: PendingReply, delay: float, log: list[str]) -> threading.Thread:
    """What the reader thread does when the reply arrives, `delay` seconds from now."""

    def run() -> None:
        time.sleep(delay)
        log.append("reply")
        pending.deliver(Reply(id=1, ok=True, value=42))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


async def test_a_reply_on_an_idle_loop_is_taken_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "IN_PLACE_SECONDS", 10.0)
    pending = PendingReply(asyncio.get_running_loop())
    thread = deliver_later(pending, 0.05, [])
    reply = await pending.wait()
    thread.join()
    assert reply.value == 42


async def test_a_ready_callback_is_not_held_up_by_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "IN_PLACE_SECONDS", 10.0)
    loop = asyncio.get_running_loop()
    log: list[str] = []
    pending = PendingReply(loop)
    loop.call_soon(log.append, "other")
    thread = deliver_later(pending, 0.5, log)
    assert (await pending.wait()).value == 42
    thread.join()
    assert log == ["other", "reply"]


async def test_the_wait_in_place_ends_before_a_timer_is_due(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "IN_PLACE_SECONDS", 10.0)
    loop = asyncio.get_running_loop()
    log: list[str] = []
    pending = PendingReply(loop)
    loop.call_later(0.05, log.append, "timer")
    thread = deliver_later(pending, 0.5, log)
    assert (await pending.wait()).value == 42
    thread.join()
    assert log == ["timer", "reply"]


async def test_a_reply_slower_than_the_window_is_awaited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "IN_PLACE_SECONDS", 0.01)
    loop = asyncio.get_running_loop()
    log: list[str] = []
    pending = PendingReply(loop)
    other = threading.Timer(0.1, loop.call_soon_threadsafe, (log.append, "other thread"))
    other.start()
    thread = deliver_later(pending, 0.3, log)
    assert (await pending.wait()).value == 42
    thread.join()
    other.join()
    assert log == ["other thread", "reply"]  # the loop was free again while the reply was on its way


async def test_a_reply_after_the_waiter_was_cancelled_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "IN_PLACE_SECONDS", 0.0)
    pending = PendingReply(asyncio.get_running_loop())
    waiter = asyncio.ensure_future(pending.wait())
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    pending.deliver(Reply(id=1, ok=True, value=42))  # the reader thread may still deliver it
    await asyncio.sleep(0.01)  # the hop it schedules runs without error
