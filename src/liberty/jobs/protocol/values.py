"""Plugin values and exceptions in JSON form, for the pipe.

Connector arguments, rows and replies carry values JSON has no type for
(datetime, Decimal, bytes, UUID, NaN, tuples).  They travel as tagged objects
`{"$t": TAG, "v": ...}` so both sides get back exactly what was sent; a real
dict that has a `"$t"` key is itself wrapped, so nothing is ambiguous.

`decode_value` runs in the parent on bytes a child chose, so anything it does
not recognise is a `ProtocolError`, never a stray KeyError or ValueError.

Exceptions go one way only, parent -> child: `encode_exception` pickles the
parent's exception (cloudpickle) next to a plain description, and
`decode_exception`, which only the child calls, rebuilds the real type so
`except psycopg.errors.UniqueViolation` works in plugin code.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import decimal
import functools
import importlib
import itertools
import marshal
import math
import pickle
import re
import struct
import uuid
import zoneinfo
from collections.abc import Iterator
from typing import Any

from ..errors import ProtocolError

TAG = "$t"
MAX_PICKLE_BYTES = 256 * 1024

_ZONE_KEY = re.compile(r"^[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*$")
_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def encode_value(obj: Any) -> Any:
    """Return a JSON-able form of `obj`; TypeError names a type that cannot cross."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return {TAG: "float", "v": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    if isinstance(obj, list):
        return [encode_value(item) for item in obj]
    if isinstance(obj, tuple):
        return {TAG: "tuple", "v": [encode_value(item) for item in obj]}
    if isinstance(obj, dict):
        if TAG not in obj and all(type(k) is str for k in obj) and all(_plain(v) for v in obj.values()):
            return obj  # the common row: scalars only, nothing to tag
        return _encode_dict(obj)
    if isinstance(obj, dt.datetime):
        return _with_zone({TAG: "datetime", "v": obj.isoformat()}, obj)
    if isinstance(obj, dt.date):
        return {TAG: "date", "v": obj.isoformat()}
    if isinstance(obj, dt.time):
        return _with_zone({TAG: "time", "v": obj.isoformat()}, obj)
    if isinstance(obj, dt.timedelta):
        return {TAG: "timedelta", "v": [obj.days, obj.seconds, obj.microseconds]}
    if isinstance(obj, decimal.Decimal):
        return {TAG: "decimal", "v": str(obj)}
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {TAG: "bytes", "v": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, uuid.UUID):
        return {TAG: "uuid", "v": str(obj)}
    raise TypeError(
        f"cannot send a value of type {type(obj).__module__}.{type(obj).__qualname__} across the pipe; "
        "use None, bool, int, float, str, list, tuple, dict with str keys, datetime, date, time, "
        "timedelta, Decimal, bytes or UUID"
    )


_SCALARS = (type(None), bool, int, str)


def _plain(value: Any) -> bool:
    return type(value) in _SCALARS or (type(value) is float and math.isfinite(value))


def _encode_dict(obj: dict[Any, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise TypeError(f"cannot send a dict with a {type(key).__name__} key ({key!r:.40}); keys must be str")
        out[key] = encode_value(value)
    if TAG in out:
        return {TAG: "dict", "v": out}
    return out


def _with_zone(tagged: dict[str, Any], obj: dt.datetime | dt.time) -> dict[str, Any]:
    """Keep what isoformat() + fromisoformat() would lose: a named zone, `fold`, sub-second offsets."""
    key = getattr(obj.tzinfo, "key", None)
    if isinstance(obj.tzinfo, zoneinfo.ZoneInfo) and key:
        tagged["tz"] = key
        # The offset is implied by the zone; dropping it keeps decoding unambiguous.
        tagged["v"] = obj.replace(tzinfo=None).isoformat()
    elif (offset := obj.utcoffset()) is not None and offset.microseconds:
        tagged["off"] = offset // dt.timedelta(microseconds=1)
        tagged["v"] = obj.replace(tzinfo=None).isoformat()
    if obj.fold:
        tagged["fold"] = 1
    return tagged


def pack_rows(rows: list[tuple[Any, ...]]) -> tuple[list[Any], bool]:
    """A batch of row tuples -> (JSON-able rows, whether any value had to be tagged).

    Plain rows go as they are (a tuple dumps as a list); the flag lets the
    receiver skip decoding a batch of plain values altogether.
    """
    if set(map(type, itertools.chain.from_iterable(rows))) <= _SCALAR_SET:
        return rows, False  # the common batch: nothing to look at twice
    packed: list[Any] = []
    tagged = False
    for row in rows:
        if all(_plain(v) for v in row):
            packed.append(row)
        else:
            packed.append([encode_value(v) for v in row])
            tagged = True
    return packed, tagged


def unpack_rows(columns: list[str], rows: list[Any], *, tagged: bool) -> list[dict[str, Any]]:
    """Inverse of `pack_rows` with the batch's column names; a malformed batch raises ProtocolError."""
    width = len(columns)
    if type(rows) is not list or not set(map(type, rows)) <= {list} or not set(map(len, rows)) <= {width}:
        raise ProtocolError(f"every stream row must be a list of {width} values")
    if tagged:
        rows = [[decode_value(v) for v in row] for row in rows]
    return _maker(columns)(rows)


_SCALAR_SET = frozenset(_SCALARS)
# Exactly the types `marshal` gives back as they went in (bytes, NaN and -0.0 included).
BLOB_TYPES: frozenset[type] = frozenset({type(None), bool, int, float, str, bytes})


class BatchBuilder:
    """One stream batch, built from the chunks of row tuples the driver returns.

    When the driver's types are known to fit a blob (`value_types`), each
    chunk is marshalled as it comes, while it is in cache, and dropped: few
    tuples are alive at once, below the garbage collector's trigger (a count
    of live container objects), as when iterating a cursor in process.
    """

    def __init__(self, value_types: frozenset[type] | None = None) -> None:
        self.count = 0
        self._marshal_now = value_types is not None and value_types <= BLOB_TYPES
        self._chunks: list[bytes] = []  # when marshalled as they come
        self._rows: list[tuple[Any, ...]] = []  # otherwise

    def add(self, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        self.count += len(rows)
        if self._marshal_now:
            self._chunks.append(_blob_chunk(rows))
        else:
            self._rows.extend(rows)

    def blob(self) -> bytes | None:
        """The batch as `pack_blob` makes it, if every value is of a `BLOB_TYPES` type (else None)."""
        if self._marshal_now:
            return _base64(self._chunks) if self._chunks else None
        if self._rows and set(map(type, itertools.chain.from_iterable(self._rows))) <= BLOB_TYPES:
            return pack_blob(self._rows)
        return None

    def packed_rows(self) -> tuple[list[Any], bool]:
        """The batch as `pack_rows` makes it: what goes when `blob()` cannot."""
        return pack_rows(self._rows)


def pack_blob(rows: list[tuple[Any, ...]]) -> bytes:
    """Rows of `BLOB_TYPES` values as a `Rows.blob` (parent -> child only): base64 of chunks of `marshal`.

    Several times cheaper than JSON to write and to read, with nothing to tag.
    A chunk is a 4-byte little-endian length and the marshalled list of up to
    `BLOB_CHUNK_ROWS` row tuples.  The child unmarshals only what its
    supervisor sent, as it unpickles exceptions; nothing a child sends is ever
    unmarshalled.
    """
    return _base64([_blob_chunk(rows[i : i + BLOB_CHUNK_ROWS]) for i in range(0, len(rows), BLOB_CHUNK_ROWS)])


BLOB_CHUNK_ROWS = 256
_LENGTH = struct.Struct("<I")


def _blob_chunk(rows: list[tuple[Any, ...]]) -> bytes:
    data = marshal.dumps(rows)
    return _LENGTH.pack(len(data)) + data


def _base64(chunks: list[bytes]) -> bytes:
    return binascii.b2a_base64(b"".join(chunks), newline=False)


def unpack_blob(columns: list[str], blob: str) -> Iterator[dict[str, Any]]:
    """Inverse of `pack_blob`: the batch's rows as dicts, made a chunk at a time as they are reached.

    A malformed blob raises ProtocolError, at the chunk where it is found.
    """
    try:
        data = memoryview(binascii.a2b_base64(blob))
    except ValueError as exc:  # binascii.Error
        raise ProtocolError(f"stream rows blob is not base64: {exc}") from None
    make = _maker(columns)
    return itertools.chain.from_iterable(make(chunk) for chunk in _blob_chunks(data, len(columns)))


def _blob_chunks(data: memoryview, width: int) -> Iterator[list[tuple[Any, ...]]]:
    pos, end = 0, len(data)
    while pos < end:
        if pos + _LENGTH.size > end:
            raise ProtocolError("stream rows blob ends inside a chunk length")
        (size,) = _LENGTH.unpack_from(data, pos)
        pos += _LENGTH.size
        if pos + size > end:
            raise ProtocolError("stream rows blob ends inside a chunk")
        try:
            rows = marshal.loads(data[pos : pos + size])
        except (ValueError, EOFError, TypeError) as exc:
            raise ProtocolError(f"stream rows blob has an invalid chunk: {exc}") from None
        if type(rows) is not list or not set(map(type, rows)) <= {tuple} or not set(map(len, rows)) <= {width}:
            raise ProtocolError(f"stream rows blob chunks must be lists of tuples of {width} values")
        pos += size
        yield rows


def _maker(columns: list[str]) -> Any:
    """`make(rows)`: the rows (of the right width) as a list of dicts."""
    width = len(columns)
    if 0 < width <= _MAX_BUILT_WIDTH:
        return functools.partial(_dict_maker(width), *columns)
    return lambda rows: [dict(zip(columns, row)) for row in rows]


_MAX_BUILT_WIDTH = 64


@functools.lru_cache(maxsize=_MAX_BUILT_WIDTH)
def _dict_maker(width: int) -> Any:
    """`make(*columns, rows)`: a list of one dict display per row, 3x cheaper than `dict(zip(...))`.

    Only the width shapes the generated code; the column names are arguments.
    Rows must have exactly `width` values.
    """
    keys = [f"k{i}" for i in range(width)]
    values = [f"v{i}" for i in range(width)]
    pairs = ", ".join(f"{k}: {v}" for k, v in zip(keys, values))
    source = f"def make({', '.join(keys)}, rows):\n    return [{{{pairs}}} for ({', '.join(values)},) in rows]\n"
    namespace: dict[str, Any] = {}
    exec(source, namespace)  # noqa: S102 - the source is built from an int
    return namespace["make"]


def decode_value(data: Any) -> Any:
    """Inverse of `encode_value`; anything malformed raises ProtocolError."""
    try:
        return _decode(data)
    except ProtocolError:
        raise
    except RecursionError:
        raise ProtocolError("value is nested too deeply") from None


def _decode(data: Any) -> Any:
    kind = type(data)
    if data is None or kind in (bool, int, str, float):
        return data
    if kind is list:
        return [_decode(item) for item in data]
    if kind is dict:
        if TAG in data:
            return _decode_tagged(data)
        if all(type(k) is str for k in data) and all(type(v) in _JSON_SCALARS for v in data.values()):
            return data
        return {_key(k): _decode(v) for k, v in data.items()}
    raise ProtocolError(f"not a JSON value: {kind.__name__}")


_JSON_SCALARS = (type(None), bool, int, str, float)


def _key(key: Any) -> str:
    if type(key) is not str:
        raise ProtocolError(f"object key must be a string, got {type(key).__name__}")
    return key


def _decode_tagged(data: dict[str, Any]) -> Any:
    tag = data[TAG]
    decoder = _DECODERS.get(tag) if type(tag) is str else None
    if decoder is None:
        raise ProtocolError(f"unknown value tag {tag!r:.40}")
    extra = set(data) - {TAG, "v"} - ({"tz", "off", "fold"} if tag in ("datetime", "time") else set())
    if extra or "v" not in data:
        raise ProtocolError(f"tagged {tag} value must have exactly '$t' and 'v' keys, got {sorted(data)!r:.80}")
    try:
        return decoder(data)
    except ProtocolError:
        raise
    except (ValueError, TypeError, ArithmeticError, LookupError, OSError) as exc:
        raise ProtocolError(f"invalid {tag} value {data['v']!r:.80}: {exc}") from None


def _str(data: dict[str, Any]) -> str:
    value = data["v"]
    if type(value) is not str:
        raise ProtocolError(f"tagged {data[TAG]} value must be a string, got {type(value).__name__}")
    return value


def _zone(data: dict[str, Any]) -> dt.tzinfo | None:
    key, offset = data.get("tz"), data.get("off")
    if offset is not None:
        if key is not None or type(offset) is not int:
            raise ProtocolError("'off' must be an integer number of microseconds, without 'tz'")
        return dt.timezone(dt.timedelta(microseconds=offset))
    if key is None:
        return None
    if type(key) is not str or len(key) > 64 or not _ZONE_KEY.match(key):
        raise ProtocolError(f"invalid time zone key {key!r:.80}")
    return zoneinfo.ZoneInfo(key)


def _fold(data: dict[str, Any]) -> int:
    fold = data.get("fold", 0)
    if fold not in (0, 1) or type(fold) is not int:
        raise ProtocolError(f"fold must be 0 or 1, got {fold!r:.20}")
    return fold


def _decode_datetime(data: dict[str, Any]) -> dt.datetime:
    return _zoned(dt.datetime.fromisoformat(_str(data)), data)


def _decode_time(data: dict[str, Any]) -> dt.time:
    return _zoned(dt.time.fromisoformat(_str(data)), data)


def _zoned(value: Any, data: dict[str, Any]) -> Any:
    zone = _zone(data)
    if zone is not None:
        if value.tzinfo is not None:
            raise ProtocolError(f"a {data[TAG]} with 'tz' or 'off' must not also carry an offset in 'v'")
        value = value.replace(tzinfo=zone)
    return value.replace(fold=_fold(data))


def _decode_float(data: dict[str, Any]) -> float:
    text = _str(data)
    if text not in _FLOATS:
        raise ProtocolError(f"tagged float must be 'nan', 'inf' or '-inf', got {text!r:.20}")
    return _FLOATS[text]


def _decode_timedelta(data: dict[str, Any]) -> dt.timedelta:
    parts = data["v"]
    if type(parts) is not list or len(parts) != 3 or any(type(p) is not int for p in parts):
        raise ProtocolError("tagged timedelta must be [days, seconds, microseconds] integers")
    days, seconds, micros = parts
    return dt.timedelta(days=days, seconds=seconds, microseconds=micros)


def _decode_decimal(data: dict[str, Any]) -> decimal.Decimal:
    return decimal.Decimal(_str(data))


def _decode_list(data: dict[str, Any]) -> list[Any]:
    items = data["v"]
    if type(items) is not list:
        raise ProtocolError(f"tagged {data[TAG]} value must be a list")
    return [_decode(item) for item in items]


def _decode_dict(data: dict[str, Any]) -> dict[str, Any]:
    items = data["v"]
    if type(items) is not dict:
        raise ProtocolError("tagged dict value must be an object")
    return {_key(k): _decode(v) for k, v in items.items()}


_DECODERS: dict[str, Any] = {
    "float": _decode_float,
    "tuple": lambda d: tuple(_decode_list(d)),
    "dict": _decode_dict,
    "datetime": _decode_datetime,
    "date": lambda d: dt.date.fromisoformat(_str(d)),
    "time": _decode_time,
    "timedelta": _decode_timedelta,
    "decimal": _decode_decimal,
    "bytes": lambda d: base64.b64decode(_str(d), validate=True),
    "uuid": lambda d: uuid.UUID(_str(d)),
}


# --- exceptions (parent -> child only) --------------------------------------


def encode_exception(exc: BaseException) -> dict[str, Any]:
    """Describe `exc` for the child: always a plain form, plus a pickle when one can be made."""
    kind = type(exc)
    return {
        "module": kind.__module__,
        "qualname": kind.__qualname__,
        "message": _message(exc),
        "args": [_best_effort(arg) for arg in exc.args],
        "pickle": _pickle(exc),
    }


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return repr(exc.args)


def _best_effort(value: Any) -> Any:
    try:
        return encode_value(value)
    except TypeError:
        return repr(value)


def _pickle(exc: BaseException) -> str | None:
    import cloudpickle

    try:
        data = cloudpickle.dumps(exc)
    except Exception:
        return None
    if len(data) > MAX_PICKLE_BYTES:
        return None
    return base64.b64encode(data).decode("ascii")


def decode_exception(data: dict[str, Any]) -> Exception:
    """Child side: rebuild the parent's exception, the real type whenever possible.

    Order: unpickle (exact object); else import the class and call it with the
    message; else a RuntimeError naming the original type.  Never call this in
    the parent on anything a child sent.
    """
    if type(data) is not dict:
        raise ProtocolError(f"an encoded exception must be an object, got {type(data).__name__}")
    module = str(data.get("module") or "builtins")
    qualname = str(data.get("qualname") or "RuntimeError")
    message = str(data.get("message") or "")
    restored = _unpickle(data.get("pickle"))
    if restored is not None:
        return restored
    cls = _import_class(module, qualname)
    if cls is not None:
        try:
            return cls(message)
        except Exception:
            pass
    return RuntimeError(f"{module}.{qualname}: {message}")


def _unpickle(blob: Any) -> Exception | None:
    if not isinstance(blob, str):
        return None
    try:
        obj = pickle.loads(base64.b64decode(blob, validate=True))  # noqa: S301 - parent->child only
    except Exception:
        return None
    return obj if isinstance(obj, Exception) else None


def _import_class(module: str, qualname: str) -> type[Exception] | None:
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception:
        return None
    if isinstance(obj, type) and issubclass(obj, Exception):
        return obj
    return None


__all__ = [
    "BLOB_TYPES",
    "MAX_PICKLE_BYTES",
    "TAG",
    "BatchBuilder",
    "decode_exception",
    "decode_value",
    "encode_exception",
    "encode_value",
    "pack_blob",
    "pack_rows",
    "unpack_blob",
    "unpack_rows",
]
