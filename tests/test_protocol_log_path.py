"""The codec's fast path for log lines agrees with the general path on every input.

The child encodes `ctx.log` lines with `encode_log` and the supervisor reads
them with `split_log`; both skip the converter, so each is checked here
against the strict general path (`encode`, `decode_child_message` through
cattrs) it must match byte for byte and verdict for verdict.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from liberty.jobs.errors import ProtocolError
from liberty.jobs.protocol import Call, Done, LineSplitter, Log, decode_child_message, encode
from liberty.jobs.protocol.codec import _structure, encode_log, split_log, split_logs

LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
json_values = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2))
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)))


def general_encode(message: Log, max_line: int) -> bytes | str:
    """What `encode` does for any message, or "refused"."""
    obj = attrs.asdict(message, recurse=False)
    obj["t"] = "log"
    try:
        data = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError):
        return "refused"
    return "refused" if len(data) + 1 > max_line else data + b"\n"


def verdict(decode: Any, line: bytes) -> Any:
    try:
        return decode(line)
    except ProtocolError:
        return "refused"


def converter_verdict(line: bytes) -> Any:
    return verdict(lambda raw: _structure(raw, None, "child"), line)


@settings(max_examples=500)
@given(level=st.one_of(st.sampled_from(LEVELS), json_values), message=st.one_of(texts, json_values), max_line=st.sampled_from([40, 200, 1 << 20]))
def test_encode_log_writes_the_general_encoding_or_refuses_alike(level: Any, message: Any, max_line: int) -> None:
    expected = general_encode(Log(level=level, message=message), max_line)
    assert verdict(lambda _: encode_log(level, message, max_line=max_line), b"") == expected
    assert verdict(lambda _: encode(Log(level=level, message=message), max_line=max_line), b"") == expected


def test_encode_log_refuses_a_lone_surrogate() -> None:
    with pytest.raises(ProtocolError, match="cannot encode Log"):
        encode_log("INFO", "bad \udcff byte")


@settings(max_examples=500)
@given(level=st.sampled_from(LEVELS), message=st.text())
def test_split_log_reads_back_what_encode_log_wrote(level: str, message: str) -> None:
    try:
        line = encode_log(level, message)
    except ProtocolError:
        return  # lone surrogates: refused by both paths (above)
    assert split_log(line[:-1]) == (level, message)
    assert decode_child_message(line[:-1]) == Log(level=level, message=message)  # type: ignore[arg-type]


@settings(max_examples=1000)
@given(level=st.sampled_from([*LEVELS, "info", "FATAL", "INFO "]), body=texts, verbatim=st.booleans())
def test_split_log_accepts_exactly_what_the_converter_accepts(level: str, body: str, verbatim: bool) -> None:
    """Hand-made lines, the message written verbatim (maybe invalid JSON) or as a JSON string."""
    message = f'"{body}"' if verbatim else json.dumps(body, ensure_ascii=False)
    line = f'{{"level":"{level}","message":{message},"t":"log"}}'.encode()
    expected = converter_verdict(line)
    assert verdict(decode_child_message, line) == expected
    if expected == "refused":
        assert split_log(line) is None
    else:
        assert split_log(line) == (expected.level, expected.message)


@settings(max_examples=1000)
@given(obj=st.dictionaries(st.sampled_from(["level", "message", "t", "x"]), st.one_of(st.sampled_from(["log", "INFO"]), json_values), max_size=4))
def test_decoding_any_object_agrees_with_the_converter(obj: dict[str, Any]) -> None:
    for line in (json.dumps(obj, separators=(",", ":")).encode(), b" " + json.dumps(obj).encode()):
        expected = converter_verdict(line)
        assert verdict(decode_child_message, line) == expected
        entry = split_log(line)
        assert entry is None or Log(level=entry[0], message=entry[1]) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "line",
    [
        b'{"level":"INFO","message":"a\x01b","t":"log"}',  # a raw control character
        b'{"level":"INFO","message":"a\xffb","t":"log"}',  # not UTF-8
        b'{"level":"INFO","message":"a","t":"log","x":1}',  # an extra key
        b'{"level":"INFO","message":5,"t":"log"}',  # a number for the text
        b'{"level":"NOTICE","message":"a","t":"log"}',  # an unknown level
        b'{"level":"INFO","message":"a","t":"log"}trailing',
        b'{"level":"INFO","message":"a","t":"done"}',
    ],
)
def test_invalid_log_lines_are_not_split_and_are_refused(line: bytes) -> None:
    assert split_log(line) is None
    with pytest.raises(ProtocolError):
        decode_child_message(line)


@pytest.mark.parametrize("message", [Done(output={"level": "INFO"}), Call(id=1, connector="db", method="query")])
def test_other_messages_are_not_taken_for_log_lines(message: Any) -> None:
    line = encode(message)[:-1]
    assert split_log(line) is None
    assert decode_child_message(line) == message


@settings(max_examples=300)
@given(lines=st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=20), cuts=st.lists(st.integers(0, 700), max_size=8))
def test_splitter_yields_the_same_lines_however_the_stream_is_cut(lines: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    splitter = LineSplitter(max_line=64)
    got: list[bytes] = []
    start = 0
    for cut in sorted(min(c, len(stream)) for c in cuts) + [len(stream)]:
        got.extend(splitter.feed(stream[start:cut]))
        start = cut
    splitter.close()
    assert got == lines


def test_splitter_refuses_an_oversize_line_among_short_ones() -> None:
    with pytest.raises(ProtocolError, match="line of 11 bytes exceeds the 10-byte cap"):
        LineSplitter(max_line=10).feed(b"ok\n" + b"x" * 10 + b"\nok\n")


def _plain(level: str, body: str) -> bytes:
    return f'{{"level":"{level}","message":"{body}","t":"log"}}'.encode("utf-8", "surrogatepass")


_line = st.one_of(
    st.builds(_plain, st.sampled_from(LEVELS), st.text(alphabet=st.characters(blacklist_characters='"\\\n', blacklist_categories=("Cs", "Cc")))),
    st.builds(_plain, st.sampled_from([*LEVELS, "NOTICE", "info"]), texts),  # maybe a quote, a control character, a surrogate
    st.builds(lambda level, message: encode_log(level, message)[:-1], st.sampled_from(LEVELS), st.text(alphabet="ab\"\\\t\u00e9", max_size=6)),
    st.builds(lambda prefix, line: prefix + line, st.binary(min_size=1, max_size=3).filter(lambda b: b"\n" not in b), st.builds(_plain, st.sampled_from(LEVELS), st.text(alphabet="ab", max_size=3))),
    st.binary(max_size=12).filter(lambda b: b"\n" not in b),
    st.just(encode(Done(output=None))[:-1]),
)


@settings(max_examples=1000)
@given(lines=st.lists(_line, max_size=6))
def test_split_logs_is_split_log_of_every_line_or_nothing(lines: list[bytes]) -> None:
    # Lines as `LineSplitter` yields them: none holds a newline.
    one_by_one = [split_log(line) for line in lines]
    together = split_logs(lines)
    if together is None:
        assert not lines or None in one_by_one or any(b"\\" in line for line in lines)  # escapes take the slow path
    else:
        assert together == one_by_one


@settings(max_examples=300)
@given(entries=st.lists(st.tuples(st.sampled_from(LEVELS), st.text(alphabet=st.characters(blacklist_characters='"\\', blacklist_categories=("Cs", "Cc")))), min_size=1, max_size=50))
def test_split_logs_takes_a_run_of_plain_log_lines_whole(entries: list[tuple[str, str]]) -> None:
    lines = [encode_log(level, message)[:-1] for level, message in entries]
    assert split_logs(lines) == entries


@pytest.mark.parametrize(
    "lines",
    [
        [b'{"level":"INFO","message":"a","t":"log"}', b'x{"level":"INFO","message":"b","t":"log"}'],  # a valid tail only
        [b'{"level":"INFO","message":"a","t":"log"}', b""],
        [b'{"level":"INFO","message":"a","t":"log"}\r'],
        [b'{"level":"INFO","message":"a\xc3', b'\xa9","t":"log"}'],  # a character cut by the split
    ],
)
def test_split_logs_refuses_a_run_with_any_line_that_is_not_a_whole_plain_log_line(lines: list[bytes]) -> None:
    assert split_logs(lines) is None
