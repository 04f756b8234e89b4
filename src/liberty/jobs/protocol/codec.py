"""Sans-IO codec: message objects <-> JSON lines.

One cattrs converter, strict: every field must already have its declared JSON
type (no coercion of `"5"` to `5`), extra keys are refused, and each direction
accepts only its own messages, so a child cannot send a `start`.  Anything that
is not a valid message raises `ProtocolError` and nothing else.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import cattrs
from cattrs.strategies import configure_tagged_union

from .._strict import describe_error, make_strict_converter
from ..errors import ProtocolError
from .messages import TAGS, ChildMessage, ParentMessage

DEFAULT_MAX_LINE = 1024 * 1024


def _make_converter() -> cattrs.Converter:
    conv = make_strict_converter()
    tag = TAGS.__getitem__
    configure_tagged_union(ChildMessage, conv, tag_generator=tag, tag_name="t")
    configure_tagged_union(ParentMessage, conv, tag_generator=tag, tag_name="t")
    return conv


converter = _make_converter()


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # one, not one per line


def _loads(line: bytes) -> Any:
    try:
        return _DECODER.decode(line.decode("utf-8"))
    except ProtocolError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"not a JSON line: {exc}") from None


def _structure(line: bytes, union: Any, direction: str) -> Any:
    obj = _loads(line)
    if type(obj) is not dict:
        raise ProtocolError(f"a {direction} message must be a JSON object, got {type(obj).__name__}")
    tag = obj.get("t")
    if type(tag) is not str or tag not in _CLASS_OF[direction]:
        raise ProtocolError(f"unknown {direction} message type {tag!r}")
    del obj["t"]
    try:
        return _HOOK_OF[direction][tag](obj, None)
    except Exception as exc:  # cattrs raises several types (incl. ExceptionGroup); all mean "invalid"
        detail = "; ".join(f"{msg} at {where or 'top level'}" for where, msg in describe_error(exc))
        raise ProtocolError(f"invalid {direction} message {tag!r}: {detail}") from None


def decode_child_message(line: bytes) -> ChildMessage:
    """Parse one line a child sent; the parent's only entry point for child bytes."""
    return _structure(line, ChildMessage, "child")


def decode_parent_message(line: bytes) -> ParentMessage:
    return _structure(line, ParentMessage, "parent")


def encode(message: ChildMessage | ParentMessage, *, max_line: int = DEFAULT_MAX_LINE) -> bytes:
    """Serialise a message to one newline-terminated line, refusing oversize lines."""
    try:
        # Fields are already JSON values (plugin data is encoded by `protocol.values`
        # first), so a shallow dict is the wire form; cattrs would walk every row.
        obj = attrs.asdict(message, recurse=False)
        obj["t"] = TAGS[type(message)]
        data = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError, RecursionError, KeyError) as exc:
        raise ProtocolError(f"cannot encode {type(message).__name__}: {exc}") from None
    if len(data) + 1 > max_line:
        raise ProtocolError(
            f"{type(message).__name__} message is {len(data) + 1} bytes, over the {max_line}-byte line cap"
        )
    return data + b"\n"


def _bind(hook: Any, cls: type) -> Any:
    return lambda obj, _: hook(obj, cls)


_CLASS_OF = {
    "child": {TAGS[c]: c for c in ChildMessage.__args__},
    "parent": {TAGS[c]: c for c in ParentMessage.__args__},
}
# The generated structure function of each message, looked up once rather than dispatched per line.
_HOOK_OF = {
    direction: {tag: _bind(converter.get_structure_hook(cls), cls) for tag, cls in classes.items()}
    for direction, classes in _CLASS_OF.items()
}


class LineSplitter:
    """Splits a byte stream into lines, refusing any line longer than `max_line`."""

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        lines: list[bytes] = []
        start = 0
        while True:
            nl = self._buf.find(b"\n", start)
            if nl < 0:
                break
            if nl + 1 - start > self.max_line:
                raise ProtocolError(f"line of {nl + 1 - start} bytes exceeds the {self.max_line}-byte cap")
            lines.append(bytes(self._buf[start:nl]))
            start = nl + 1
        del self._buf[:start]
        if len(self._buf) > self.max_line:
            raise ProtocolError(f"line exceeds the {self.max_line}-byte cap (no newline after {len(self._buf)} bytes)")
        return lines

    def close(self) -> None:
        """At EOF: a partial last line means the peer died mid-message."""
        if self._buf:
            raise ProtocolError(f"stream ended inside a line ({len(self._buf)} bytes without a newline)")
