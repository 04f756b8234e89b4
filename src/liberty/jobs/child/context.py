"""The real `ctx` a step receives inside the child."""

from __future__ import annotations

from typing import Any

from ..protocol import Call, Start
from ..protocol.codec import encode_log
from ..types import StepRecord
from .channel import Channel

MAX_LOG_MESSAGE = 64 * 1024
_DESCRIBE_TIMEOUT = 60.0


class ChildLog:
    """`ctx.log`: each call is one line in the run's log stream."""

    def __init__(self, channel: Channel, log_level: str) -> None:
        self._channel = channel
        self._debug = log_level == "DEBUG"

    def _emit(self, level: str, msg: object) -> None:
        text = msg if type(msg) is str else str(msg)
        if len(text) > MAX_LOG_MESSAGE:
            text = f"{text[:MAX_LOG_MESSAGE]}… [truncated {len(text) - MAX_LOG_MESSAGE} characters]"
        self._channel.send(encode_log(level, text))  # the line, straight: no message object per call

    def debug(self, msg: object) -> None:
        if self._debug:
            self._emit("DEBUG", msg)

    def info(self, msg: object) -> None:
        self._emit("INFO", msg)

    def warning(self, msg: object) -> None:
        self._emit("WARNING", msg)

    warn = warning

    def error(self, msg: object) -> None:
        self._emit("ERROR", msg)

    def exception(self, msg: object) -> None:
        import traceback

        self._emit("ERROR", f"{msg}\n{traceback.format_exc()}")


class ChildContext:
    """Satisfies `liberty.jobs.types.StepContext`; every connector use crosses the pipe."""

    def __init__(self, channel: Channel, start: Start) -> None:
        self._channel = channel
        self._start = start
        self.log = ChildLog(channel, start.log_level)
        self.params: dict[str, Any] = dict(start.params)
        self.session_user = start.session_user
        self.run_id = start.run_id
        self.job_id = start.job_id
        self.log_level = start.log_level
        self.step_name = start.step
        self.attempt = start.attempt

    def is_cancelled(self) -> bool:
        return self._channel.cancelled.is_set()

    def previous_step(self, name: str) -> StepRecord:
        record = self._start.previous_steps.get(name)
        if record is None:
            known = ", ".join(self._start.previous_steps) or "none"
            raise LookupError(f"no previous step named {name!r} in job {self.job_id!r}; finished steps: {known}")
        return StepRecord(
            name=name,
            status=record.get("status", ""),
            output=record.get("output"),
            attempts=record.get("attempts", 0),
            error=record.get("error"),
        )

    def get_connector(self, name: str) -> Any:
        """Ask the supervisor for the connector; unknown or not allowed raises here."""
        from .connectors import make_proxy

        call_id = self._channel.new_id()
        fut = self._channel.expect_reply(call_id)
        self._channel.send(Call(id=call_id, connector=name, method="describe"))
        reply = fut.result(timeout=_DESCRIBE_TIMEOUT)
        if not reply.ok:
            from ..protocol.values import decode_exception

            raise decode_exception(reply.error or {})
        return make_proxy(self._channel, name, reply.value)

    def __repr__(self) -> str:
        return f"<StepContext run={self.run_id} job={self.job_id} step={self.step_name} attempt={self.attempt}>"
