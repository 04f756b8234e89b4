"""Tagged JSON values and exception transport (`liberty.jobs.protocol.values`)."""

from __future__ import annotations

import datetime as dt
import decimal
import json
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
