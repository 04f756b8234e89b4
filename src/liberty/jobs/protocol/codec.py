"""Sans-IO codec: message objects <-> JSON lines.

One cattrs converter, strict: every field must already have its declared JSON
type (no coercion of `"5"` to `5`), extra keys are refused, and each direction
accepts only its own messages, so a child cannot send a `start`.  Anything that
is not a valid message raises `ProtocolError` and nothing else.
"""

from __future__ import annotations

import json
import json.scanner
import re
from typing import Any, get_args

import attrs
import cattrs
from cattrs.strategies import configure_tagged_union

from .._strict import describe_error, make_strict_converter
from ..errors import ProtocolError
from .messages import TAGS, ChildMessage, Log, LogLevel, ParentMessage, Prepare, Prepared, Reply, Rows

DEFAULT_MAX_LINE = 1024 * 1024
_LOG_LEVELS = frozenset(get_args(LogLevel))
_LOG_PREFIX = b'{"level":"'  # how `encode` starts a Log line
# A Log line whose message needs no JSON escape: a JSON string without a quote, a backslash
# or a control character is exactly its text, so the match is the decoded value.
_PLAIN_LOG = re.compile(
    r'\{"level":"(' + "|".join(get_args(LogLevel)) + r')","message":"([^"\\\x00-\x1f]*)","t":"log"\}'
)
# The same, for many lines joined by "\n": anchored to whole lines, and no line can hold two.
_PLAIN_LOG_LINES = re.compile(r"^" + _PLAIN_LOG.pattern + r"$", re.MULTILINE)
_json_string = json.encoder.encode_basestring  # what json.dumps(ensure_ascii=False) writes for a str


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
_SCAN = json.scanner.make_scanner(_DECODER)  # its C scanner, without the wrapper's whitespace handling


def loads(line: bytes) -> Any:
    """One JSON value, read as every protocol line is (same scanner; `ProtocolError` if it is not
    JSON).  The zygote's request body uses it too: a forked attempt then touches one JSON reader."""
    try:
        text = line.decode("utf-8")
        try:
            # The C scanner alone: a line the encoder wrote parses in one call.
            obj, end = _SCAN(text, 0)
            if end == len(text):
                return obj
        except StopIteration:
            pass
        return _DECODER.decode(text)  # whitespace around the value, or the precise error
    except ProtocolError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"not a JSON line: {exc}") from None


def _structure(line: bytes, union: Any, direction: str) -> Any:
    return _structure_obj(loads(line), direction)


def _structure_obj(obj: Any, direction: str) -> Any:
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
    obj = loads(line)
    log = _as_log(obj)
    if log is not None:
        return Log(level=log[0], message=log[1])  # type: ignore[arg-type]
    return _structure_obj(obj, "child")


def split_logs(lines: list[bytes]) -> list[tuple[str, str]] | None:
    """`[split_log(line) for line in lines]` when every line is a plain log line (no JSON escape
    in its text), else None; a chatty step's pipe read in a few C calls instead of one per line.
    `lines` are as `LineSplitter.feed` returns them: none holds a newline.

    The pattern is anchored to whole lines, and its text cannot hold a newline,
    so its matches are distinct whole lines: as many matches as lines means
    every line matched.
    """
    joined = b"\n".join(lines)
    if b"\\" in joined:
        return None  # a JSON escape, so not all plain: spare the decode and the scan (one memchr)
    try:
        text = joined.decode("utf-8")
    except UnicodeDecodeError:
        return None
    entries = _PLAIN_LOG_LINES.findall(text)
    return entries if len(entries) == len(lines) else None


def split_log(line: bytes) -> tuple[str, str] | None:
    """(level, message) of a well-formed `log` line as `encode` writes it; None for any other line.

    The hot path of a chatty step (100,000s of lines): no message object, no
    converter, and for the usual text without escapes not even the JSON
    scanner.  None says nothing about validity: such a line goes through
    `decode_child_message`, which accepts or refuses it with the usual errors.
    """
    if not line.startswith(_LOG_PREFIX):
        return None
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None
    plain = _PLAIN_LOG.fullmatch(text)
    if plain is not None:
        return plain.group(1, 2)  # type: ignore[return-value]
    try:
        obj, end = _SCAN(text, 0)
    except (StopIteration, ValueError, RecursionError, ProtocolError):
        return None
    return _as_log(obj) if end == len(text) else None


def _as_log(obj: Any) -> tuple[str, str] | None:
    """Exactly the three keys of a Log, each of its declared type: what the converter would accept."""
    if type(obj) is not dict or len(obj) != 3 or obj.get("t") != "log":
        return None
    level = obj.get("level")
    message = obj.get("message")
    if type(level) is str and level in _LOG_LEVELS and type(message) is str:
        return level, message
    return None


def decode_parent_message(line: bytes) -> ParentMessage:
    return _structure(line, ParentMessage, "parent")


_NESTED: dict[type, tuple[str, ...]] = {Prepare: ("code",), Prepared: ("compiled",)}  # fields holding an attrs class


def encode(message: ChildMessage | ParentMessage, *, max_line: int = DEFAULT_MAX_LINE) -> bytes:
    """Serialise a message to one newline-terminated line, refusing oversize lines."""
    if type(message) is Log:
        line = _log_line(message.level, message.message, max_line)
        if line is not None:
            return line
    try:
        # Fields are already JSON values (plugin data is encoded by `protocol.values`
        # first), so a shallow dict is the wire form; cattrs would walk every row.
        obj = attrs.asdict(message, recurse=False)
        for name in _NESTED.get(type(message), ()):
            if obj[name] is not None:
                obj[name] = attrs.asdict(obj[name])
        obj["t"] = TAGS[type(message)]
        data = "".join(_ENCODE_VALUE(obj, 0)).encode("utf-8")
    except (TypeError, ValueError, RecursionError, KeyError) as exc:
        raise ProtocolError(f"cannot encode {type(message).__name__}: {exc}") from None
    _check_cap(len(data) + 1, type(message).__name__, max_line)
    return data + b"\n"


def _check_cap(size: int, what: str, max_line: int) -> None:
    if size > max_line:
        raise ProtocolError(f"{what} message is {size} bytes, over the {max_line}-byte line cap")


def encode_log(level: str, message: str, *, max_line: int = DEFAULT_MAX_LINE) -> bytes:
    """`encode(Log(level=level, message=message))` without building the message (the child's hot path)."""
    line = _log_line(level, message, max_line)
    return line if line is not None else encode(Log(level=level, message=message), max_line=max_line)  # type: ignore[arg-type]


def _log_line(level: Any, message: Any, max_line: int) -> bytes | None:
    """The general path's bytes for a well-formed Log, built directly; None for any other (it goes that way)."""
    if type(level) is not str or level not in _LOG_LEVELS or type(message) is not str:
        return None
    try:
        data = f'{{"level":"{level}","message":{_json_string(message)},"t":"log"}}\n'.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate
        raise ProtocolError(f"cannot encode Log: {exc}") from None
    _check_cap(len(data), "Log", max_line)
    return data


def encode_reply(call_id: int, value: Any, *, max_line: int = DEFAULT_MAX_LINE) -> bytes:
    """`encode(Reply(id=call_id, ok=True, value=value))`, written directly: every connector call's answer."""
    if type(call_id) is not int:
        return encode(Reply(id=call_id, ok=True, value=value), max_line=max_line)
    try:
        data = f'{{"id":{call_id},"ok":true,"value":{"".join(_ENCODE_VALUE(value, 0))},"error":null,"t":"reply"}}\n'
        line = data.encode("utf-8")
    except (TypeError, ValueError, RecursionError, UnicodeEncodeError) as exc:
        raise ProtocolError(f"cannot encode Reply: {exc}") from None
    _check_cap(len(line), "Reply", max_line)
    return line


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# What `json.dumps(..., ensure_ascii=False, allow_nan=False, separators=(",", ":"))` runs, made once.
_ENCODE_VALUE = json.encoder.c_make_encoder(  # type: ignore[attr-defined]
    None, _not_json, json.encoder.encode_basestring, None, ":", ",", False, False, False
)


def encode_rows_blob(message: Rows, blob: bytes, *, max_line: int = DEFAULT_MAX_LINE) -> bytes:
    """`encode(message)` with `blob` (base64, as `values.pack_blob` makes it) in the `blob` field.

    A stream batch's blob is nearly all of its line; as base64 needs no JSON
    escaping, it is put in as it is rather than decoded, escaped and encoded
    again, which cost more than making it.
    """
    if message.blob or blob.translate(None, _BASE64):
        raise ProtocolError("a rows blob goes in as base64 bytes, into a message without one")
    head = encode(message, max_line=max_line)
    cut = head.index(b'"blob":""') + len(b'"blob":"')  # once: other fields' quotes are escaped
    _check_cap(len(head) + len(blob), "Rows", max_line)
    return b"".join((head[:cut], blob, head[cut:]))


_BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


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
        if b"\n" not in data:
            self._buf += data
            self._check_rest()
            return []
        if self._buf:
            data = bytes(self._buf) + data
            self._buf.clear()
        lines = data.split(b"\n")  # one C call for a whole pipe read, not a find and a copy per line
        self._buf += lines.pop()
        if max(map(len, lines)) >= self.max_line:
            size = next(len(line) + 1 for line in lines if len(line) >= self.max_line)
            raise ProtocolError(f"line of {size} bytes exceeds the {self.max_line}-byte cap")
        self._check_rest()
        return lines

    def _check_rest(self) -> None:
        if len(self._buf) > self.max_line:
            raise ProtocolError(f"line exceeds the {self.max_line}-byte cap (no newline after {len(self._buf)} bytes)")

    def close(self) -> None:
        """At EOF: a partial last line means the peer died mid-message."""
        if self._buf:
            raise ProtocolError(f"stream ended inside a line ({len(self._buf)} bytes without a newline)")
