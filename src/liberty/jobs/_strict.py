"""A cattrs converter that refuses coercion: `"5"` is not an int, `1` is not a bool.

Shared by the protocol codec (untrusted child bytes) and the config loader
(operator-written TOML); both want "wrong type" to be an error, never a guess.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import cattrs
from cattrs.errors import ForbiddenExtraKeysError
from cattrs.v import format_exception


def _exact(kind: type) -> Callable[[Any, Any], Any]:
    def check(value: Any, _: Any) -> Any:
        if type(value) is kind or (kind is float and type(value) is int):
            return value
        raise TypeError(f"expected {_NAMES.get(kind, kind.__name__)}, got {type(value).__name__} {value!r:.40}")

    return check


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _json_list(value: Any, _: Any) -> list[Any]:
    if type(value) is not list:
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


def _json_object(value: Any, _: Any) -> dict[str, Any]:
    if type(value) is not dict or not all(type(k) is str for k in value):
        raise TypeError(f"expected a table/object with string keys, got {type(value).__name__}")
    return value


def _object_of_objects(value: Any, t: Any) -> dict[str, dict[str, Any]]:
    for item in _json_object(value, t).values():
        _json_object(item, t)
    return value


def _list_of_str(value: Any, t: Any) -> list[str]:
    if not all(type(v) is str for v in _json_list(value, t)):
        raise TypeError("expected a list of strings")
    return value


def make_strict_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    for kind in (int, float, str, bool):
        conv.register_structure_hook(kind, _exact(kind))
    for generic, hook in (
        (list[Any], _json_list),
        (list[str], _list_of_str),
        (dict[str, Any], _json_object),
        (dict[str, dict[str, Any]], _object_of_objects),
        (dict[str, Any] | None, lambda v, t: None if v is None else _json_object(v, t)),
    ):
        conv.register_structure_hook_func(lambda t, g=generic: t == g, hook)
    return conv


def _format(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, ForbiddenExtraKeysError):
        expected = ", ".join(a.name for a in attrs.fields(exc.cl)) if attrs.has(exc.cl) else "?"
        return f"unknown key(s) {', '.join(sorted(exc.extra_fields))}; expected one of {expected}"
    if isinstance(exc, KeyError):
        return "required key is missing"
    if type(exc) in (TypeError, ValueError):
        return str(exc)
    return format_exception(exc, type_)


def describe_error(exc: BaseException) -> list[tuple[str, str]]:
    """Flatten a cattrs validation error to (path, message) pairs; path like 'steps[0].name'."""
    if not isinstance(exc, cattrs.BaseValidationError):
        return [("", str(exc))]
    out = []
    for line in cattrs.transform_error(exc, format_exception=_format):
        msg, _, where = line.rpartition(" @ $")
        out.append((where.lstrip("."), msg))
    return out
