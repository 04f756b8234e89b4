"""The child's end of the protocol pipes: a locked writer and a reader thread.

The reader runs on its own thread so that a cancel flag lands even while sync
plugin code holds the event loop, and so that replies reach code waiting from
any thread.  EOF on the pipe means the supervisor is gone: the child exits at
once rather than run unsupervised.

The thread starts when something is to be read after `start`, not before: a
step that never hears from the supervisor again (most of them) runs on one
thread, which saves about a quarter of a millisecond of CPU per attempt.  A
step that makes a call starts it as it asks; anything else (a cancel, a hang-up,
a protocol breach) makes the kernel signal the main thread (SIGIO, armed with
O_ASYNC on the pipe), whose handler starts it, even while sync code holds the
loop: the signal interrupts a sleep and runs between two bytecodes of a busy
loop.
"""

from __future__ import annotations

import _thread
import asyncio
import concurrent.futures
import fcntl
import os
import select
import signal
import struct
import sys
import threading
from collections.abc import Callable


from ..errors import ProtocolError
from ..protocol import (
    DEFAULT_MAX_LINE,
    Cancel,
    ChildMessage,
    LineSplitter,
    ParentMessage,
    Reply,
    Rows,
    Start,
    decode_parent_message,
    encode,
)

EXIT_PARENT_GONE = 70
EXIT_PROTOCOL = 71


class Channel:
    def __init__(self, fd_in: int, fd_out: int, *, max_line: int = DEFAULT_MAX_LINE) -> None:
        self._fd_in = fd_in
        self._fd_out = fd_out
        self._max_line = max_line
        self._splitter = LineSplitter(max_line)
        self._pending_lines: list[bytes] = []
        self._write_lock = threading.Lock()
        self._calls_lock = threading.Lock()
        self._next_id = 0
        self._calls: dict[int, Callable[[Reply], None]] = {}
        self._streams: dict[int, Callable[[Rows], None]] = {}
        self.cancelled = threading.Event()
        self.on_task_cancel: Callable[[], None] | None = None
        self._reader_once = _thread.allocate_lock()  # taken by whoever starts the reader thread
        self._flags_in: int | None = None  # the pipe's file flags, once `watch_for_messages` armed SIGIO
        self._reader_at_start = False  # SIGIO could not be armed: the reader starts with the step
        self._started = False  # `start` has been read: the pipe is the reader thread's to read
        self._finishing = False  # the result is on its way: a hang-up now is expected

    def send(self, message: ChildMessage | bytes) -> None:
        """Write a message (or a line `encode_log` already made) into the pipe before returning.

        Nothing is buffered on this side: a line that was sent survives the
        child being killed a moment later.
        """
        data = message if type(message) is bytes else encode(message, max_line=self._max_line)  # type: ignore[arg-type]
        with self._write_lock:
            try:
                n = os.write(self._fd_out, data)
                if n < len(data):  # a write over PIPE_BUF can be cut short (by a signal)
                    view = memoryview(data)[n:]
                    while view:
                        view = view[os.write(self._fd_out, view) :]
            except BrokenPipeError:
                os._exit(EXIT_PARENT_GONE)

    def receive(self) -> ParentMessage:
        """Blocking read of one message; used before the reader thread starts."""
        while not self._pending_lines:
            data = os.read(self._fd_in, 65536)
            if not data:
                os._exit(EXIT_PARENT_GONE)
            self._pending_lines.extend(self._splitter.feed(data))
        return decode_parent_message(self._pending_lines.pop(0))

    def wait_start(self) -> Start:
        """Block until `start` (the step to run) arrives; from then on a message wakes the reader thread.

        This thread reads `start` itself, before the reader thread exists: one
        wake-up when it arrives and no hand-over.
        """
        try:
            msg = self.receive()
        except ProtocolError as exc:
            print(f"nomaflow child: protocol failure from the supervisor: {exc}", file=sys.stderr, flush=True)
            os._exit(EXIT_PROTOCOL)
        if not isinstance(msg, Start):
            print(f"nomaflow child: protocol failure from the supervisor: {type(msg).__name__} before start", file=sys.stderr, flush=True)
            os._exit(EXIT_PROTOCOL)
        self._started = True
        if self._reader_at_start:
            self.start_reader()
        elif self._flags_in is not None:
            fcntl.fcntl(self._fd_in, fcntl.F_SETFL, self._flags_in | os.O_ASYNC)
            # What came before O_ASYNC was set raised no signal: read it now.
            if self._pending_lines or _readable(self._fd_in):
                self.start_reader()
        return msg

    def watch_for_messages(self) -> None:
        """Have the kernel signal this (the main) thread when the pipe has data after `start`.

        Called while the attempt waits to start, so the step's start pays for one
        `fcntl` only.  SIGIO goes to this thread by its id (`F_SETOWN_EX`): a signal
        that another thread took would not wake the event loop sleeping here.  It
        comes once at most (the reader then turns O_ASYNC off), and a blocking call
        it interrupts is retried by Python; a C extension that does not retry on
        EINTR sees one, on a cancel or a hang-up only.
        """
        try:
            fcntl.fcntl(self._fd_in, _F_SETOWN_EX, struct.pack("ii", _F_OWNER_TID, threading.get_native_id()))
            flags = fcntl.fcntl(self._fd_in, fcntl.F_GETFL)
        except OSError:
            self._reader_at_start = True  # not Linux's fcntl: nothing would wake a reader later
            return
        signal.signal(signal.SIGIO, self._on_sigio)
        self._flags_in = flags

    def finishing(self) -> None:
        """The result is about to be sent: the supervisor hangs up once it has it, and nothing need wake for that."""
        self._finishing = True

    def _on_sigio(self, signum: int, frame: object) -> None:
        if not self._finishing:
            self.start_reader()

    def new_id(self) -> int:
        with self._calls_lock:
            self._next_id += 1
            return self._next_id

    def expect_reply(self, call_id: int) -> concurrent.futures.Future[Reply]:
        """For a caller that blocks (get_connector, possibly from a worker thread)."""
        self.start_reader()
        fut: concurrent.futures.Future[Reply] = concurrent.futures.Future()

        def deliver(reply: Reply) -> None:
            try:
                fut.set_result(reply)
            except concurrent.futures.InvalidStateError:
                pass  # the caller gave up meanwhile

        with self._calls_lock:
            self._calls[call_id] = deliver
        return fut

    def expect_reply_async(self, call_id: int) -> PendingReply:
        """For a caller on the event loop: `await pending.wait()` after sending the call."""
        self.start_reader()
        pending = PendingReply(asyncio.get_running_loop())
        with self._calls_lock:
            self._calls[call_id] = pending.deliver
        return pending

    def expect_rows(self, stream_id: int, deliver: Callable[[Rows], None]) -> None:
        self.start_reader()
        with self._calls_lock:
            self._streams[stream_id] = deliver

    def forget_stream(self, stream_id: int) -> None:
        with self._calls_lock:
            self._streams.pop(stream_id, None)

    def start_reader(self) -> None:
        """Start the reader thread, once; it reads the pipe from `start` on.

        A bare `_thread` thread: `threading.Thread` adds an object nobody joins (the process
        ends with `os._exit`) and waits until the new thread runs; 0.45 ms of CPU against
        0.13 ms, measured in a child forked from the zygote.
        """
        if self._started and self._reader_once.acquire(False):  # before `start` the main thread reads
            _thread.start_new_thread(self._read_forever, ())

    def _read_forever(self) -> None:
        try:
            if self._flags_in is not None:  # this thread reads from now on: no more signals
                fcntl.fcntl(self._fd_in, fcntl.F_SETFL, self._flags_in)
            while True:
                while self._pending_lines:
                    self._dispatch(decode_parent_message(self._pending_lines.pop(0)))
                data = os.read(self._fd_in, 65536)
                if not data:
                    os._exit(EXIT_PARENT_GONE)
                self._pending_lines.extend(self._splitter.feed(data))
        except (ProtocolError, OSError) as exc:
            print(f"nomaflow child: protocol failure from the supervisor: {exc}", file=sys.stderr, flush=True)
            os._exit(EXIT_PROTOCOL)

    def _dispatch(self, msg: ParentMessage) -> None:
        if isinstance(msg, Start):  # the reader runs only once `wait_start` has the first one
            raise ProtocolError("a second start message")
        elif isinstance(msg, Cancel):
            self.cancelled.set()
            if msg.stage == "task" and self.on_task_cancel is not None:
                self.on_task_cancel()
        elif isinstance(msg, Reply):
            with self._calls_lock:
                deliver = self._calls.pop(msg.id, None)
            if deliver is None:
                raise ProtocolError(f"reply to unknown call id {msg.id}")
            deliver(msg)
        elif isinstance(msg, Rows):
            with self._calls_lock:
                deliver_rows = self._streams.get(msg.id)
            if deliver_rows is not None:
                deliver_rows(msg)
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__} after start")


class PendingReply:
    """A call's reply as the event loop's thread gets it: in place if it comes quickly, else awaited.

    While no other task is ready and no timer is due, the loop would only sleep
    in its selector until the reader thread hands the reply over: a self-pipe
    write, a wake-up and two loop iterations, more than a quick call costs in
    the supervisor.  Sleeping on the reply itself instead, for at most
    `IN_PLACE_SECONDS`, takes one thread wake-up; a slower reply is awaited as
    usual, and whatever else became ready meanwhile waited no longer than that.
    """

    __slots__ = ("_loop", "_state", "_arrived", "_reply", "_fut")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._state = threading.Lock()
        self._arrived = threading.Lock()
        self._arrived.acquire()
        self._reply: Reply | None = None
        self._fut: asyncio.Future[Reply] | None = None

    def deliver(self, reply: Reply) -> None:
        """On the reader thread."""
        with self._state:
            fut = self._fut
            if fut is None:  # the loop's thread is waiting in place, or has not started to wait
                self._reply = reply
                self._arrived.release()
                return
        self._loop.call_soon_threadsafe(_resolve, fut, reply)

    async def wait(self) -> Reply:
        window = _idle_window(self._loop)
        if window > 0:
            self._arrived.acquire(timeout=window)
        with self._state:
            reply = self._reply
            if reply is None:
                self._fut = fut = self._loop.create_future()
        if reply is not None:
            return reply
        return await fut


IN_PLACE_SECONDS = 0.002

_F_SETOWN_EX = 15  # Linux's fcntl numbers; Python's fcntl module does not name them
_F_OWNER_TID = 0


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _idle_window(loop: asyncio.AbstractEventLoop) -> float:
    """How long the loop has nothing to do but wait: 0 if a callback is ready (or if unknown)."""
    ready = getattr(loop, "_ready", None)
    timers = getattr(loop, "_scheduled", None)
    if ready is None or timers is None or ready:
        return 0.0
    if timers:
        return min(IN_PLACE_SECONDS, timers[0].when() - loop.time())
    return IN_PLACE_SECONDS


def _resolve(fut: asyncio.Future[Reply], reply: Reply) -> None:
    if not fut.done():  # the awaiting task may have been cancelled
        fut.set_result(reply)


def adopt_protocol_fds(spec: str) -> tuple[int, int]:
    """Move the inherited pipe ends to fds 3 and 4, not inheritable by grandchildren.

    `spec` is "IN,OUT" as the supervisor passed them; fds 3 and 4 may be among
    them, so both are first moved above 10.
    """
    import fcntl

    fd_in, fd_out = (int(x) for x in spec.split(","))
    high_in = fcntl.fcntl(fd_in, fcntl.F_DUPFD_CLOEXEC, 10)
    high_out = fcntl.fcntl(fd_out, fcntl.F_DUPFD_CLOEXEC, 10)
    for fd in {fd_in, fd_out}:
        os.close(fd)
    os.dup2(high_in, 3, inheritable=False)
    os.dup2(high_out, 4, inheritable=False)
    os.close(high_in)
    os.close(high_out)
    return 3, 4


__all__ = ["Channel", "adopt_protocol_fds", "EXIT_PARENT_GONE", "EXIT_PROTOCOL"]
