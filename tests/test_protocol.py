"""The pipe protocol, sans IO: round-trips, direction, and garbage that must only ever be a ProtocolError."""

from __future__ import annotations

import json
import types
import typing
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liberty.jobs.errors import ProtocolError
from liberty.jobs.protocol import (
    CHILD_MESSAGES,
    PARENT_MESSAGES,
    TAGS,
    Call,
    Cancel,
    Done,
    Failed,
    LineSplitter,
    Log,
    Prepare,
    Prepared,
    Ready,
    Reply,
    Rows,
    Start,
    StreamClose,
    StreamMore,
    StreamOpen,
    decode_child_message,
    decode_parent_message,
    encode,
)

# Listed by hand on purpose: the meta-test below compares these lists with the
# protocol's own tuples, so a message added without a round-trip test fails.
ROUND_TRIP_CHILD = [Ready, Prepared, Log, Call, StreamOpen, StreamMore, StreamClose, Done, Failed]
ROUND_TRIP_PARENT = [Prepare, Start, Reply, Rows, Cancel]

DECODERS = {"child": decode_child_message, "parent": decode_parent_message}

# --- strategies -------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=5)


def strategy_for(tp: Any) -> st.SearchStrategy[Any]:
    """A strategy for a message field's declared type; an unsupported type fails loudly."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return json_values
    if tp is int:
        return st.integers(min_value=-(2**63), max_value=2**63)
    if tp is str:
        return st.text()
    if tp is bool:
        return st.booleans()
    if tp is type(None):
        return st.none()
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(strategy_for(a) for a in args))
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=5)
    if origin is dict:
        assert args[0] is str, tp
        return st.dictionaries(st.text(max_size=10), strategy_for(args[1]), max_size=5)
    if attrs.has(tp):
        return message_strategy(tp)
    raise AssertionError(f"no strategy for field type {tp!r}; extend strategy_for")


def message_strategy(cls: type) -> st.SearchStrategy[Any]:
    """Every field drawn explicitly, so a new field is exercised without touching this file."""
    hints = typing.get_type_hints(cls)
    return st.builds(cls, **{f.name: strategy_for(hints[f.name]) for f in attrs.fields(cls)})


def _valid_example(cls: type) -> dict[str, Any]:
    """The wire form of a minimal valid message of `cls` (all required fields filled)."""
    samples: dict[Any, Any] = {int: 1, str: "x", bool: True, dict[str, dict[str, Any]]: {"m": {"applied": True}}}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in attrs.fields(cls):
        if f.default is attrs.NOTHING:
            tp = hints[f.name]
            kwargs[f.name] = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Literal else samples[tp]
    return json.loads(encode(cls(**kwargs)))


def _direction(cls: type) -> str:
    return "child" if cls in CHILD_MESSAGES else "parent"


def _decode_only_protocol_error(decoder: Any, line: bytes) -> None:
    """Decoding may succeed or raise ProtocolError; anything else escapes and fails the test."""
    try:
        decoder(line)
    except ProtocolError:
        pass


# --- meta ---------------------------------------------------------------------


def test_every_protocol_message_type_has_a_round_trip_test() -> None:
    assert set(ROUND_TRIP_CHILD) == set(CHILD_MESSAGES)
    assert set(ROUND_TRIP_PARENT) == set(PARENT_MESSAGES)
    assert set(TAGS) == set(CHILD_MESSAGES) | set(PARENT_MESSAGES)


def test_tags_are_unique() -> None:
    assert len(set(TAGS.values())) == len(TAGS)


@pytest.mark.parametrize("cls", ROUND_TRIP_CHILD + ROUND_TRIP_PARENT, ids=lambda c: c.__name__)
def test_every_field_type_has_a_strategy(cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for field in attrs.fields(cls):
        strategy_for(hints[field.name])


# --- round trips ----------------------------------------------------------------


@pytest.mark.parametrize("cls", ROUND_TRIP_CHILD, ids=lambda c: c.__name__)
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_child_message_round_trips(cls: type, data: st.DataObject) -> None:
    message = data.draw(message_strategy(cls))
    line = encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_child_message(line[:-1]) == message


@pytest.mark.parametrize("cls", ROUND_TRIP_PARENT, ids=lambda c: c.__name__)
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_parent_message_round_trips(cls: type, data: st.DataObject) -> None:
    message = data.draw(message_strategy(cls))
    line = encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_parent_message(line[:-1]) == message


@pytest.mark.parametrize("cls", ROUND_TRIP_CHILD + ROUND_TRIP_PARENT, ids=lambda c: c.__name__)
def test_wire_form_carries_the_tag(cls: type) -> None:
    assert _valid_example(cls)["t"] == TAGS[cls]


@given(message=message_strategy(Log))
def test_round_trip_survives_any_chunking_through_the_splitter(message: Log) -> None:
    data = encode(message) * 3
    for size in (1, 2, 7, len(data)):
        splitter = LineSplitter()
        lines = []
        for i in range(0, len(data), size):
            lines.extend(splitter.feed(data[i : i + size]))
        splitter.close()
        assert [decode_child_message(line) for line in lines] == [message] * 3


# --- direction ------------------------------------------------------------------


@pytest.mark.parametrize("cls", ROUND_TRIP_PARENT, ids=lambda c: c.__name__)
def test_child_cannot_send_a_parent_message(cls: type) -> None:
    line = json.dumps(_valid_example(cls)).encode()
    decode_parent_message(line)
    with pytest.raises(ProtocolError):
        decode_child_message(line)


@pytest.mark.parametrize("cls", ROUND_TRIP_CHILD, ids=lambda c: c.__name__)
def test_parent_cannot_send_a_child_message(cls: type) -> None:
    line = json.dumps(_valid_example(cls)).encode()
    decode_child_message(line)
    with pytest.raises(ProtocolError):
        decode_parent_message(line)


def test_child_sending_start_is_a_protocol_error() -> None:
    start = Start(version=1, run_id="r", job_id="j", step="s", attempt=1, function="m:f")
    with pytest.raises(ProtocolError, match="start"):
        decode_child_message(encode(start))


# --- malformed input: explicit cases ---------------------------------------------

WRONG_VALUES: dict[Any, list[Any]] = {
    int: ["5", 5.0, True, None, [], {}],
    str: [5, 1.5, False, None, ["x"], {"x": 1}],
    bool: [1, 0, "true", None, []],
}


def _wrong_values_for(tp: Any) -> list[Any]:
    origin = typing.get_origin(tp)
    if tp in WRONG_VALUES:
        return WRONG_VALUES[tp]
    if origin is typing.Literal:
        return ["NOT-A-MEMBER", 1, None, [], {}]
    if origin in (typing.Union, types.UnionType):
        wrong = [v for a in typing.get_args(tp) if a is not type(None) for v in _wrong_values_for(a)]
        return [v for v in wrong if v is not None]
    if origin is list:
        return [{}, "[]", 1] + ([[1]] if typing.get_args(tp)[0] is str else [])
    if origin is dict:
        wrong = [[], "{}", 1]
        if typing.get_args(tp)[1] is not Any:
            wrong.append({"k": 1})
        return wrong
    return []  # Any: every JSON value is valid


def _wrong_type_cases() -> list[Any]:
    cases = []
    for cls in ROUND_TRIP_CHILD + ROUND_TRIP_PARENT:
        hints = typing.get_type_hints(cls)
        for field in attrs.fields(cls):
            for value in _wrong_values_for(hints[field.name]):
                cases.append(pytest.param(cls, field.name, value, id=f"{cls.__name__}.{field.name}={value!r}"))
    return cases


@pytest.mark.parametrize(("cls", "field", "value"), _wrong_type_cases())
def test_wrong_type_in_a_field_is_a_protocol_error(cls: type, field: str, value: Any) -> None:
    obj = _valid_example(cls)
    obj[field] = value
    with pytest.raises(ProtocolError):
        DECODERS[_direction(cls)](json.dumps(obj).encode())


@pytest.mark.parametrize("cls", ROUND_TRIP_CHILD + ROUND_TRIP_PARENT, ids=lambda c: c.__name__)
def test_extra_key_is_a_protocol_error(cls: type) -> None:
    obj = {**_valid_example(cls), "surprise": 1}
    with pytest.raises(ProtocolError):
        DECODERS[_direction(cls)](json.dumps(obj).encode())


@pytest.mark.parametrize(
    "cls", [c for c in ROUND_TRIP_CHILD + ROUND_TRIP_PARENT if any(f.default is attrs.NOTHING for f in attrs.fields(c))],
    ids=lambda c: c.__name__,
)
def test_missing_required_key_is_a_protocol_error(cls: type) -> None:
    obj = _valid_example(cls)
    required = next(f.name for f in attrs.fields(cls) if f.default is attrs.NOTHING)
    del obj[required]
    with pytest.raises(ProtocolError):
        DECODERS[_direction(cls)](json.dumps(obj).encode())


@pytest.mark.parametrize("direction", ["child", "parent"])
@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"   ",
        b"{",
        b'{"t": "log", "level": "INFO", "message": "tru',
        b"null",
        b"[]",
        b'"ready"',
        b"42",
        b"{}",
        b'{"t": "no_such_message"}',
        b'{"t": null}',
        b'{"t": 7}',
        b'{"t": []}',
        b'{"t": {}}',
        b'{"t": ["log"], "level": "INFO", "message": "x"}',
        b'{"t": "log", "level": "INFO", "message": NaN}',
        b'{"t": "done", "output": NaN}',
        b'{"t": "done", "output": Infinity}',
        b'{"t": "done", "output": -Infinity}',
        b'{"t": "reply", "id": 1, "ok": true, "value": [NaN]}',
        b'{"t": "log", "level": "INFO", "message": "\xff\xfe"}',
        b"\xff\xfe\xfd",
        b'\xef\xbb\xbf{"t": "cancel"}',
        b'{"t": "log", "level": "INFO", "message": "\\ud800"}x',
        b'{"t": "done", "output": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"t": "done", "output": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}",
        b"[" * 1_000_000,
        b'{"t": "cancel", "stage": "flag"}{"t": "cancel"}',
        b'{"t": "ready", "version": 1, "pid": 1, "t": "start"}',
    ],
    ids=lambda v: repr(v[:40]) if isinstance(v, bytes) else v,
)
def test_malformed_line_is_a_protocol_error(direction: str, line: bytes) -> None:
    with pytest.raises(ProtocolError):
        DECODERS[direction](line)


@pytest.mark.parametrize("direction", ["child", "parent"])
def test_unhashable_tag_is_a_protocol_error(direction: str) -> None:
    for line in (b'{"t": []}', b'{"t": {}}', b'{"t": [1, 2]}'):
        with pytest.raises(ProtocolError):
            DECODERS[direction](line)


def test_bool_is_not_accepted_as_an_integer() -> None:
    with pytest.raises(ProtocolError):
        decode_child_message(b'{"t": "ready", "version": true, "pid": 1}')


def test_numeric_string_is_not_coerced_to_an_integer() -> None:
    with pytest.raises(ProtocolError):
        decode_child_message(b'{"t": "stream_more", "id": "3"}')


def test_encode_refuses_nan_in_output() -> None:
    with pytest.raises(ProtocolError):
        encode(Done(output=float("nan")))


def test_encode_refuses_a_line_over_the_cap() -> None:
    with pytest.raises(ProtocolError, match="cap"):
        encode(Log(level="INFO", message="x" * 2000), max_line=1000)


def test_encode_refuses_a_non_json_output() -> None:
    with pytest.raises(ProtocolError):
        encode(Done(output={"when": object()}))


# --- malformed input: fuzz ----------------------------------------------------------


@settings(max_examples=300)
@given(line=st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_error(line: bytes) -> None:
    for decoder in DECODERS.values():
        _decode_only_protocol_error(decoder, line)


@settings(max_examples=300)
@given(value=json_values)
def test_random_json_only_raises_protocol_error(value: Any) -> None:
    line = json.dumps(value).encode()
    for decoder in DECODERS.values():
        _decode_only_protocol_error(decoder, line)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    cls=st.sampled_from(ROUND_TRIP_CHILD + ROUND_TRIP_PARENT),
    field=st.sampled_from(["t", "id", "version", "pid", "level", "message", "stage", "output", "rows", "params", "x"]),
    value=json_values | st.lists(json_values, max_size=2) | st.dictionaries(st.text(max_size=3), json_values, max_size=2),
)
def test_valid_message_with_a_random_field_value_only_raises_protocol_error(cls: type, field: str, value: Any) -> None:
    obj = _valid_example(cls)
    obj[field] = value
    line = json.dumps(obj).encode()
    for decoder in DECODERS.values():
        _decode_only_protocol_error(decoder, line)


@settings(max_examples=200)
@given(cls=st.sampled_from(ROUND_TRIP_CHILD + ROUND_TRIP_PARENT), data=st.data())
def test_truncated_valid_line_only_raises_protocol_error(cls: type, data: st.DataObject) -> None:
    line = encode(data.draw(message_strategy(cls)))[:-1]
    cut = data.draw(st.integers(min_value=0, max_value=len(line) - 1))
    for decoder in DECODERS.values():
        with pytest.raises(ProtocolError):
            decoder(line[:cut])


# --- line splitter ------------------------------------------------------------------


def test_splitter_yields_complete_lines_and_keeps_the_rest() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b'a\nbc\n"d') == [b"a", b"bc"]
    assert splitter.feed(b'"\n') == [b'"d"']
    splitter.close()


def test_splitter_refuses_a_long_line_without_newline() -> None:
    splitter = LineSplitter(max_line=100)
    splitter.feed(b"x" * 100)
    with pytest.raises(ProtocolError, match="100-byte cap"):
        splitter.feed(b"x")


def test_splitter_refuses_a_long_line_with_newline() -> None:
    splitter = LineSplitter(max_line=100)
    with pytest.raises(ProtocolError, match="cap"):
        splitter.feed(b"x" * 150 + b"\nshort\n")


def test_splitter_accepts_a_line_exactly_at_the_cap() -> None:
    splitter = LineSplitter(max_line=100)
    assert splitter.feed(b"x" * 99 + b"\n") == [b"x" * 99]


def test_splitter_close_inside_a_line_is_a_protocol_error() -> None:
    splitter = LineSplitter()
    splitter.feed(b'{"t": "done"')
    with pytest.raises(ProtocolError, match="ended inside a line"):
        splitter.close()


def test_default_cap_refuses_an_oversize_message_line() -> None:
    splitter = LineSplitter()
    line = json.dumps({"t": "log", "level": "INFO", "message": "x" * (1024 * 1024)}).encode() + b"\n"
    with pytest.raises(ProtocolError):
        splitter.feed(line)


@settings(max_examples=300)
@given(chunks=st.lists(st.binary(max_size=80), max_size=20), max_line=st.integers(min_value=1, max_value=64))
def test_splitter_on_random_chunks_only_raises_protocol_error(chunks: list[bytes], max_line: int) -> None:
    splitter = LineSplitter(max_line=max_line)
    try:
        for chunk in chunks:
            for line in splitter.feed(chunk):
                assert b"\n" not in line and len(line) < max_line
                for decoder in DECODERS.values():
                    _decode_only_protocol_error(decoder, line)
        splitter.close()
    except ProtocolError:
        pass


@pytest.mark.parametrize(
    "compiled",
    [
        "code",
        {"path": "/p/steps.py", "digest": "0" * 64},
        {"path": "/p/steps.py", "digest": "0" * 64, "code": "eA==", "run": True},
        {"path": "/p/steps.py", "digest": "0" * 64, "code": 1},
    ],
)
def test_prepared_with_malformed_compiled_code_is_a_protocol_error(compiled: Any) -> None:
    line = json.dumps({"t": "prepared", "report": None, "compiled": compiled}).encode()
    with pytest.raises(ProtocolError, match="compiled"):
        decode_child_message(line)


def test_prepared_compiled_code_round_trips() -> None:
    from liberty.jobs.protocol import CompiledSource

    msg = Prepared(report=None, compiled=CompiledSource(path="/p/steps.py", digest="0" * 64, code="eA=="))
    assert decode_child_message(encode(msg)) == msg
