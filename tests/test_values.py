"""Tagged JSON values and exception transport (`liberty.jobs.protocol.values`)."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import marshal
import math
import pickle
import sqlite3
import subprocess
import sys
import zoneinfo
from pathlib import Path
from typing import Any

import psycopg.errors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from liberty.jobs.errors import ProtocolError
from liberty.jobs.protocol.values import decode_exception, decode_value, encode_exception, encode_value

SRC = Path(__file__).resolve().parents[1] / "src"


def wire(obj: Any) -> Any:
    """Encode, cross a real JSON boundary exactly as the codec does, decode."""
    text = json.dumps(encode_value(obj), allow_nan=False, ensure_ascii=False)
    return decode_value(json.loads(text))


def same(a: Any, b: Any) -> bool:
    """Equality that also compares types, tz objects, fold and NaN/Decimal identity."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, decimal.Decimal):
        return a.as_tuple() == b.as_tuple() and str(a) == str(b)
    if isinstance(a, (dt.datetime, dt.time)):
        return a == b and a.tzinfo == b.tzinfo and a.fold == b.fold and str(a) == str(b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


fixed_offsets = st.timedeltas(min_value=dt.timedelta(hours=-23), max_value=dt.timedelta(hours=23)).map(dt.timezone)
zones = st.one_of(st.none(), st.timezones(), fixed_offsets)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.binary(),
    st.uuids(),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.dates(),
    st.datetimes(timezones=zones, allow_imaginary=False),
    st.times(timezones=st.one_of(st.none(), st.timezones(), fixed_offsets)),
    st.timedeltas(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=5), st.just("$t"), st.just("v")), inner, max_size=4),
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(values)
def test_every_supported_value_round_trips_exactly_through_json(value: Any) -> None:
    assert same(wire(value), value)


@given(st.datetimes(timezones=st.timezones(), allow_imaginary=False))
def test_named_zone_and_fold_survive(value: dt.datetime) -> None:
    back = wire(value)
    assert back.tzinfo is value.tzinfo and back.fold == value.fold and back == value


def test_ambiguous_local_time_keeps_its_fold() -> None:
    paris = zoneinfo.ZoneInfo("Europe/Paris")
    second = dt.datetime(2025, 10, 26, 2, 30, fold=1, tzinfo=paris)
    back = wire(second)
    assert back.fold == 1 and back.utcoffset() == dt.timedelta(hours=1)


@pytest.mark.parametrize("kind", [dt.datetime, dt.time])
def test_a_sub_second_utc_offset_is_kept(kind: Any) -> None:
    zone = dt.timezone(dt.timedelta(seconds=-5, microseconds=7))
    value = kind(2026, 1, 1, tzinfo=zone) if kind is dt.datetime else kind(1, 2, tzinfo=zone)
    assert wire(value).utcoffset() == zone.utcoffset(None)


def test_microseconds_are_kept() -> None:
    value = dt.datetime(2026, 4, 1, 12, 0, 0, 123456)
    assert wire(value).microsecond == 123456


def test_a_real_dict_with_a_tag_key_is_not_mistaken_for_a_tagged_value() -> None:
    value = {"$t": "datetime", "v": "2026-01-01T00:00:00"}
    assert wire(value) == value and type(wire(value)["v"]) is str


def test_encoded_form_is_plain_json() -> None:
    encoded = encode_value([float("nan"), b"\x00", dt.date(2026, 1, 2), (1, 2)])
    json.dumps(encoded, allow_nan=False)


def test_unsupported_type_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="set"):
        encode_value({1, 2})


def test_non_string_dict_key_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="int key"):
        encode_value({1: "a"})


@pytest.mark.parametrize(
    "bad",
    [
        {"$t": "nope", "v": 1},
        {"$t": 5, "v": 1},
        {"$t": "datetime"},
        {"$t": "datetime", "v": 3},
        {"$t": "datetime", "v": "not a date"},
        {"$t": "datetime", "v": "2026-01-01T00:00:00", "extra": 1},
        {"$t": "datetime", "v": "2026-01-01T00:00:00", "tz": "../../etc/passwd"},
        {"$t": "datetime", "v": "2026-01-01T00:00:00", "tz": "No/Such_Zone"},
        {"$t": "datetime", "v": "2026-01-01T00:00:00+01:00", "tz": "Europe/Paris"},
        {"$t": "datetime", "v": "2026-01-01T00:00:00", "fold": 2},
        {"$t": "datetime", "v": "2026-01-01T00:00:00", "off": 10**12},
        {"$t": "datetime", "v": "2026-01-01T00:00:00", "off": 1, "tz": "UTC"},
        {"$t": "time", "v": "10:00+01:00", "off": 1},
        {"$t": "date", "v": "2026-13-01"},
        {"$t": "time", "v": "25:00"},
        {"$t": "timedelta", "v": [1, 2]},
        {"$t": "timedelta", "v": [10**12, 0, 0]},
        {"$t": "timedelta", "v": ["1", 0, 0]},
        {"$t": "decimal", "v": "abc"},
        {"$t": "bytes", "v": "!!!not base64"},
        {"$t": "uuid", "v": "123"},
        {"$t": "float", "v": "1.5"},
        {"$t": "tuple", "v": "abc"},
        {"$t": "dict", "v": [1]},
        (1, 2),
        {1: "a"},
        object(),
        [[[{"$t": "bytes", "v": 1}]]],
    ],
)
def test_malformed_input_raises_protocol_error_only(bad: Any) -> None:
    with pytest.raises(ProtocolError):
        decode_value(bad)


def test_absurdly_deep_nesting_is_a_protocol_error() -> None:
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ProtocolError, match="deeply"):
        decode_value(deep)


# --- exceptions ---------------------------------------------------------------


def _sqlite_integrity_error() -> sqlite3.IntegrityError:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    conn.execute("INSERT INTO t VALUES (1)")
    try:
        conn.execute("INSERT INTO t VALUES (1)")
    except sqlite3.IntegrityError as exc:
        return exc
    raise AssertionError("no IntegrityError")


class _NeedsTwoArgs(Exception):
    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def test_encoded_exception_is_json_with_a_plain_description() -> None:
    encoded = encode_exception(PermissionError("no access to x"))
    json.dumps(encoded)
    assert encoded["module"] == "builtins" and encoded["qualname"] == "PermissionError"
    assert encoded["message"] == "no access to x" and encoded["args"] == ["no access to x"]
    assert encoded["pickle"]


def test_unpicklable_exception_still_encodes_without_pickle() -> None:
    exc = RuntimeError("boom")
    exc.handle = __import__("threading").Lock()  # type: ignore[attr-defined]
    encoded = encode_exception(exc)
    assert encoded["pickle"] is None
    assert isinstance(decode_exception(encoded), RuntimeError) and str(decode_exception(encoded)) == "boom"


@pytest.mark.parametrize(
    "exc",
    [
        _sqlite_integrity_error(),
        psycopg.errors.UniqueViolation('duplicate key value violates unique constraint "t_pkey"'),
        PermissionError("step 'a' may not use connector 'b'"),
        LookupError("connector 'x' is not configured; known: a, b"),
    ],
    ids=["sqlite3.IntegrityError", "psycopg.UniqueViolation", "PermissionError", "LookupError"],
)
def test_exception_comes_back_as_its_own_type_with_the_same_message(exc: Exception) -> None:
    back = decode_exception(json.loads(json.dumps(encode_exception(exc))))
    assert type(back) is type(exc) and str(back) == str(exc)


def test_without_pickle_the_class_is_imported_and_built_from_the_message() -> None:
    encoded = encode_exception(psycopg.errors.UniqueViolation("dup"))
    encoded["pickle"] = None
    back = decode_exception(encoded)
    assert type(back) is psycopg.errors.UniqueViolation and str(back) == "dup"


def test_a_class_that_cannot_be_rebuilt_becomes_a_runtime_error_naming_it() -> None:
    encoded = encode_exception(_NeedsTwoArgs("a", "b"))
    encoded["pickle"] = None
    back = decode_exception(encoded)
    assert type(back) is RuntimeError and str(back) == f"{__name__}._NeedsTwoArgs: a/b"


def test_a_pickle_that_fails_to_load_falls_back_to_the_description() -> None:
    encoded = encode_exception(_NeedsTwoArgs("a", "b"))  # pickles, but unpickling calls __init__(msg)
    assert encoded["pickle"]
    assert type(decode_exception(encoded)) is RuntimeError


def test_an_unknown_module_becomes_a_runtime_error() -> None:
    back = decode_exception({"module": "no_such_mod", "qualname": "Boom", "message": "m", "args": [], "pickle": None})
    assert type(back) is RuntimeError and str(back) == "no_such_mod.Boom: m"


def test_a_non_exception_class_is_not_instantiated() -> None:
    back = decode_exception({"module": "os", "qualname": "system", "message": "echo hi", "args": [], "pickle": None})
    assert type(back) is RuntimeError


def test_a_pickled_non_exception_is_ignored() -> None:
    import base64

    blob = base64.b64encode(pickle.dumps({"not": "an exception"})).decode()
    back = decode_exception({"module": "builtins", "qualname": "ValueError", "message": "m", "args": [], "pickle": blob})
    assert type(back) is ValueError and str(back) == "m"


_CHILD = """
import json, sys
from liberty.jobs.protocol.values import decode_exception
results = []
for encoded in json.load(sys.stdin):
    exc = decode_exception(encoded)
    try:
        raise exc
    except sqlite3.IntegrityError as e:
        results.append(["sqlite3.IntegrityError", str(e)])
    except psycopg.errors.UniqueViolation as e:
        results.append(["psycopg.errors.UniqueViolation", str(e), e.sqlstate])
    except PermissionError as e:
        results.append(["PermissionError", str(e)])
    except LookupError as e:
        results.append(["LookupError", str(e)])
json.dump(results, sys.stdout)
"""


def test_a_separate_interpreter_catches_each_exception_by_its_driver_type() -> None:
    excs = [
        _sqlite_integrity_error(),
        psycopg.errors.UniqueViolation("duplicate key"),
        PermissionError("nope"),
        KeyError("k"),
    ]
    payload = json.dumps([encode_exception(e) for e in excs])
    proc = subprocess.run(
        [sys.executable, "-c", "import sqlite3, psycopg.errors\n" + _CHILD],
        input=payload,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert json.loads(proc.stdout) == [
        ["sqlite3.IntegrityError", "UNIQUE constraint failed: t.id"],
        ["psycopg.errors.UniqueViolation", "duplicate key", "23505"],
        ["PermissionError", "nope"],
        ["LookupError", "'k'"],
    ]


def test_stream_rows_pack_and_unpack_to_the_same_dicts_with_tagged_values() -> None:
    import datetime as dt
    import decimal

    from liberty.jobs.protocol.values import pack_rows, unpack_rows

    rows = [(1, "a", dt.date(2026, 4, 1), decimal.Decimal("1.10")), (2, None, dt.date(2026, 4, 2), decimal.Decimal("2"))]
    packed, tagged = pack_rows(rows)
    wire = json.loads(json.dumps(packed))
    assert tagged
    assert unpack_rows(["id", "name", "day", "amount"], wire, tagged=True) == [
        {"id": 1, "name": "a", "day": dt.date(2026, 4, 1), "amount": decimal.Decimal("1.10")},
        {"id": 2, "name": None, "day": dt.date(2026, 4, 2), "amount": decimal.Decimal("2")},
    ]


def test_a_batch_of_plain_rows_goes_as_it_is_and_untagged() -> None:
    from liberty.jobs.protocol.values import pack_rows

    rows = [(1, "a"), (2, "b")]
    packed, tagged = pack_rows(rows)
    assert packed is rows and not tagged


def test_a_stream_row_of_the_wrong_width_is_a_protocol_error() -> None:
    from liberty.jobs.protocol.values import unpack_rows

    with pytest.raises(ProtocolError, match="list of 2 values"):
        unpack_rows(["a", "b"], [[1, 2], [3]], tagged=False)


# --- stream batches as blobs ---------------------------------------------------------------

_BLOB_ROWS = [
    (1, "plain", b"\x00\xffbytes", 1.5, None, True),
    (-(2**80), "naïve ☃ \ud800", b"", math.nan, None, False),
    (0, "", b"x" * 300, -0.0, None, True),
    (2**63, "\n\"quoted\"", b"\n", math.inf, None, False),
]
_BLOB_COLUMNS = ["id", "text", "data", "real", "nothing", "flag"]


def _through_the_pipe(columns: list[str], batch: Any) -> list[dict[str, Any]]:
    """A batch as the supervisor sends it (a `BatchBuilder`), decoded and unpacked as the child does."""
    from liberty.jobs.protocol import Rows, decode_parent_message, encode
    from liberty.jobs.protocol.codec import encode_rows_blob
    from liberty.jobs.protocol.values import unpack_blob, unpack_rows

    blob = batch.blob()
    if blob is not None:
        line = encode_rows_blob(Rows(id=1, columns=columns), blob)
    else:
        packed, tagged = batch.packed_rows()
        line = encode(Rows(id=1, columns=columns, rows=packed, tagged=tagged))
    msg = decode_parent_message(line[:-1])
    assert isinstance(msg, Rows)
    if msg.blob:
        return list(unpack_blob(msg.columns, msg.blob))
    return unpack_rows(msg.columns, msg.rows, tagged=msg.tagged)


def test_a_batch_of_driver_scalars_travels_as_a_blob_and_comes_back_exactly() -> None:
    from liberty.jobs.protocol.values import BatchBuilder

    batch = BatchBuilder()
    batch.add(_BLOB_ROWS)
    assert batch.blob() is not None
    got = _through_the_pipe(_BLOB_COLUMNS, batch)
    assert len(got) == len(_BLOB_ROWS)
    for row, sent in zip(got, _BLOB_ROWS):
        assert list(row) == _BLOB_COLUMNS
        assert all(same(value, original) for value, original in zip(row.values(), sent)), (row, sent)


def test_a_batch_marshalled_chunk_by_chunk_is_the_batch_marshalled_at_once() -> None:
    from liberty.jobs.protocol.values import BLOB_CHUNK_ROWS, BatchBuilder

    rows = [(i, f"r{i}", i / 3) for i in range(1000)]
    whole, chunked = BatchBuilder(), BatchBuilder(frozenset({int, str, float}))  # types known: marshalled as added
    whole.add(rows)
    for start in range(0, len(rows), BLOB_CHUNK_ROWS):
        chunked.add(rows[start : start + BLOB_CHUNK_ROWS])
    chunked.add([])
    assert chunked.blob() == whole.blob() and chunked.count == 1000
    assert [tuple(r.values()) for r in _through_the_pipe(["a", "b", "c"], chunked)] == rows


def test_a_batch_with_a_value_marshal_would_not_keep_goes_as_tagged_rows() -> None:
    from liberty.jobs.protocol.values import BatchBuilder

    batch = BatchBuilder()
    batch.add([(1, "a")])
    batch.add([(2, decimal.Decimal("2.50")), (3, dt.date(2026, 4, 1))])
    assert batch.blob() is None and batch.packed_rows()[1]
    got = _through_the_pipe(["id", "v"], batch)
    assert got == [{"id": 1, "v": "a"}, {"id": 2, "v": decimal.Decimal("2.50")}, {"id": 3, "v": dt.date(2026, 4, 1)}]
    assert type(got[1]["v"]) is decimal.Decimal


def test_a_bytearray_is_not_sent_as_a_blob_it_would_come_back_as_bytes() -> None:
    from liberty.jobs.protocol.values import BatchBuilder

    batch = BatchBuilder()
    batch.add([(1, bytearray(b"ab"))])
    assert batch.blob() is None


def test_rows_without_columns_keep_their_count() -> None:
    from liberty.jobs.protocol.values import BatchBuilder

    batch = BatchBuilder()
    batch.add([(), (), ()])
    assert _through_the_pipe([], batch) == [{}, {}, {}]


def test_a_wide_batch_builds_its_dicts_without_the_generated_maker() -> None:
    from liberty.jobs.protocol.values import BatchBuilder

    columns = [f"c{i}" for i in range(100)]
    batch = BatchBuilder()
    batch.add([tuple(range(100)), tuple(range(100, 200))])
    got = _through_the_pipe(columns, batch)
    assert got == [dict(zip(columns, range(100))), dict(zip(columns, range(100, 200)))]


def test_duplicate_column_names_keep_the_last_value_as_dict_zip_does() -> None:
    from liberty.jobs.protocol.values import BatchBuilder

    batch = BatchBuilder()
    batch.add([(1, 2)])
    assert _through_the_pipe(["a", "a"], batch) == [dict(zip(["a", "a"], (1, 2)))] == [{"a": 2}]


def _blob(*chunks: bytes) -> str:
    return base64.b64encode(b"".join(len(c).to_bytes(4, "little") + c for c in chunks)).decode()


_GOOD = marshal.dumps([(1, 2), (3, 4)])


@pytest.mark.parametrize(
    "blob",
    [
        "not base64 at all!",
        _blob(_GOOD)[:-8],
        _blob(_GOOD) + base64.b64encode(b"\x01\x00").decode(),
        _blob(b"\xff\xfe not marshal"),
        _blob(marshal.dumps({"a": 1})),
        _blob(marshal.dumps([(1,), (2,)])),
        _blob(marshal.dumps([[1, 2], [3, 4]])),
    ],
    ids=["not-base64", "truncated", "partial-length", "not-marshal", "not-a-list", "wrong-width", "list-rows"],
)
def test_a_malformed_blob_is_a_protocol_error(blob: str) -> None:
    from liberty.jobs.protocol.values import unpack_blob

    with pytest.raises(ProtocolError):
        list(unpack_blob(["a", "b"], blob))


def test_the_malformed_blob_cases_differ_from_a_good_one_only_in_their_flaw() -> None:
    from liberty.jobs.protocol.values import unpack_blob

    assert list(unpack_blob(["a", "b"], _blob(_GOOD, _GOOD))) == [{"a": 1, "b": 2}, {"a": 3, "b": 4}] * 2


def test_a_rows_line_with_a_blob_is_the_line_encode_would_write() -> None:
    from liberty.jobs.protocol import Rows, encode
    from liberty.jobs.protocol.codec import encode_rows_blob
    from liberty.jobs.protocol.values import pack_blob

    blob = pack_blob([[1, 2], ["a", 'b"\\']])
    rows = Rows(id=7, columns=["n", 'quote"d'])
    assert encode_rows_blob(rows, blob) == encode(Rows(id=7, columns=["n", 'quote"d'], blob=blob.decode()))
    with pytest.raises(ProtocolError, match="base64"):
        encode_rows_blob(rows, b'AAAA"')
    with pytest.raises(ProtocolError, match="line cap"):
        encode_rows_blob(rows, blob, max_line=len(blob) + 20)
