"""The child's end of the protocol pipes: a locked writer and a reader thread.

The reader runs on its own thread so that a cancel flag lands even while sync
plugin code holds the event loop, and so that replies reach code waiting from
any thread.  EOF on the pipe means the supervisor is gone: the child exits at
once rather than run unsupervised.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
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

    def send(self, message: ChildMessage) -> None:
        data = encode(message, max_line=self._max_line)
        with self._write_lock:
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self._fd_out, view)
                except BrokenPipeError:
                    os._exit(EXIT_PARENT_GONE)
                view = view[n:]

    def receive(self) -> ParentMessage:
        """Blocking read of one message; used before the reader thread starts."""
        while not self._pending_lines:
            data = os.read(self._fd_in, 65536)
            if not data:
                os._exit(EXIT_PARENT_GONE)
            self._pending_lines.extend(self._splitter.feed(data))
        return decode_parent_message(self._pending_lines.pop(0))

    def new_id(self) -> int:
        with self._calls_lock:
            self._next_id += 1
            return self._next_id

    def expect_reply(self, call_id: int) -> concurrent.futures.Future[Reply]:
        """For a caller that blocks (get_connector, possibly from a worker thread)."""
        fut: concurrent.futures.Future[Reply] = concurrent.futures.Future()

        def deliver(reply: Reply) -> None:
            try:
                fut.set_result(reply)
            except concurrent.futures.InvalidStateError:
                pass  # the caller gave up meanwhile

        with self._calls_lock:
            self._calls[call_id] = deliver
        return fut

    def expect_reply_async(self, call_id: int) -> asyncio.Future[Reply]:
        """For a caller on the event loop: the reader thread resolves it with one loop hop."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Reply] = loop.create_future()

        def resolve(reply: Reply) -> None:
            if not fut.done():  # the awaiting task may have been cancelled
                fut.set_result(reply)

        with self._calls_lock:
            self._calls[call_id] = lambda reply: loop.call_soon_threadsafe(resolve, reply)
        return fut

    def expect_rows(self, stream_id: int, deliver: Callable[[Rows], None]) -> None:
        with self._calls_lock:
            self._streams[stream_id] = deliver

    def forget_stream(self, stream_id: int) -> None:
        with self._calls_lock:
            self._streams.pop(stream_id, None)

    def start_reader(self) -> None:
        threading.Thread(target=self._read_forever, name="nomaflow-reader", daemon=True).start()

    def _read_forever(self) -> None:
        try:
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
        if isinstance(msg, Cancel):
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
