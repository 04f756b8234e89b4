"""Importing plugins: fresh from source on every attempt, resolved as the spec's table says."""

from __future__ import annotations

import base64
import binascii
import importlib
import importlib.machinery as machinery
import marshal
import os
import sys
import types
from collections.abc import Callable
from typing import Any

import attrs

from ..protocol import CompiledSource, source_digest

# A module's code past this (marshalled, base64) is not reported for keeping: it would crowd
# the protocol's line cap in every later `prepare`.
MAX_COMPILED_CODE = 512 * 1024


class _FreshSourceLoader(machinery.SourceFileLoader):
    """Compiles plugin source every time.

    A `__pycache__` entry is keyed on mtime and size, so an edit that keeps
    both (same second, same length) would run stale code, and "edited means
    picked up" must always hold.  The exceptions are code this very process
    compiled from the very same bytes (`compile_ahead`, possibly from code an
    earlier attempt compiled from bytes of the same digest) and the shipped
    rehearsal stand-in (`keep_compiled`): reading the file again and comparing
    is what decides, so an edit made in between is still compiled afresh.
    """

    def get_code(self, fullname: str) -> Any:
        source = self.get_data(self.path)
        ahead = _compiled_ahead.pop(self.path, None) or _kept.get(self.path)
        if ahead is not None and ahead[0] == source:
            return ahead[1]
        return compile(source, self.path, "exec", dont_inherit=True)


_compiled_ahead: dict[str, tuple[bytes, Any]] = {}
_kept: dict[str, tuple[bytes, Any]] = {}


@attrs.frozen
class Ahead:
    """What `compile_ahead` kept: the file, and the code compiled here for the supervisor to
    keep (None when the code it was given served)."""

    path: str
    fresh: CompiledSource | None


def compile_ahead(plugins_dir: str, ref: str, known: CompiledSource | None = None) -> Ahead | None:
    """Compile, without running it, the source of the module `ref` ("module.path:function")
    names, for `_FreshSourceLoader` to use if the step imports the same bytes later.

    What a waiting attempt can do for its step's start before knowing it for sure:
    compiling is a third of a step's import.  `known` is that module as an earlier
    attempt compiled it: used, instead of compiling, for source of the same digest at
    the same path.  Returns None when there is nothing to compile (a package, an
    extension, no such module, a syntax error: the import at `start` reports whatever
    is wrong).
    """
    *parents, name = ref.partition(":")[0].split(".")
    if not all(part.isidentifier() for part in (*parents, name)):
        return None
    try:
        spec = machinery.PathFinder.find_spec(name, [os.path.join(plugins_dir, *parents)])
        path = spec.origin if spec is not None else None
        if path is None or spec.submodule_search_locations is not None or not path.endswith(".py"):
            return None
        with open(path, "rb") as f:
            source = f.read()
        digest = source_digest(source)
        code = _unmarshal(known) if known is not None and known.path == path and known.digest == digest else None
        fresh = None
        if code is None:
            code = compile(source, path, "exec", dont_inherit=True)
            fresh = _marshal(path, digest, code)
        _compiled_ahead[path] = (source, code)
    except (OSError, SyntaxError, ValueError, RecursionError):
        return None
    return Ahead(path=path, fresh=fresh)


def _unmarshal(known: CompiledSource) -> types.CodeType | None:
    """`known`'s code object, or None (then the source is compiled) if it does not read as one."""
    try:
        code = marshal.loads(base64.b64decode(known.code, validate=True))
    except (binascii.Error, ValueError, EOFError, TypeError):
        return None
    return code if isinstance(code, types.CodeType) else None


def _marshal(path: str, digest: str, code: types.CodeType) -> CompiledSource | None:
    data = base64.b64encode(marshal.dumps(code)).decode("ascii")
    return CompiledSource(path=path, digest=digest, code=data) if len(data) <= MAX_COMPILED_CODE else None


def keep_compiled(path: str) -> None:
    """Compile our own module at `path` once, for every import of its unchanged source in this
    process and the processes forked from it (the zygote keeps the rehearsal stand-in)."""
    with open(path, "rb") as f:
        source = f.read()
    _kept[path] = (source, compile(source, path, "exec", dont_inherit=True))


def forget_compiled() -> None:
    """Drop what `compile_ahead` kept and no import used."""
    _compiled_ahead.clear()


def install_plugins_path(plugins_dir: str) -> None:
    """Put the plugins directory first on sys.path, imported through the fresh loader."""
    root = os.path.realpath(plugins_dir)

    def hook(path: str) -> machinery.FileFinder:
        real = os.path.realpath(path or ".")
        if real != root and not real.startswith(root + os.sep):
            raise ImportError("not a plugins path")
        return machinery.FileFinder(
            path,
            (_FreshSourceLoader, machinery.SOURCE_SUFFIXES),
            (machinery.ExtensionFileLoader, machinery.EXTENSION_SUFFIXES),
        )

    sys.path_hooks.insert(0, hook)
    sys.path.insert(0, plugins_dir)
    # A fresh attempt has imported no plugin, so no finder for these paths is cached;
    # drop any anyway, leaving the other paths' finders warm.
    for cached in [p for p in sys.path_importer_cache if p and p.startswith(plugins_dir)]:
        del sys.path_importer_cache[cached]


REHEARSAL_MODULE = "_nomaflow_rehearsal"
REHEARSAL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_rehearsal")  # a stand-in plugins directory


def rehearse_import(plugins_dir: str) -> None:
    """Warm, before the step is known, what importing it will take: the plugins directory's
    finder, and one whole import through the fresh loader, of a stand-in module shipped
    in its own directory (so nothing is written to the attempt's work dir), forgotten
    again before the step runs.  `resolve_function` lists the plugins directory again."""
    machinery.PathFinder.find_spec("_nomaflow_no_such_module_", [plugins_dir])
    sys.path_importer_cache[REHEARSAL_DIR] = machinery.FileFinder(REHEARSAL_DIR, (_FreshSourceLoader, machinery.SOURCE_SUFFIXES))
    sys.path.insert(0, REHEARSAL_DIR)
    try:
        importlib.import_module(REHEARSAL_MODULE)
    finally:
        sys.path.remove(REHEARSAL_DIR)
        sys.path_importer_cache.pop(REHEARSAL_DIR, None)
        sys.modules.pop(REHEARSAL_MODULE, None)


def _forget_listings(plugins_dir: str) -> None:
    """A plugins finder caches its directory listing: list it again, new files included."""
    for path, finder in list(sys.path_importer_cache.items()):
        if path and path.startswith(plugins_dir) and finder is not None:
            finder.invalidate_caches()


def resolve_function(ref: str, plugins_dir: str) -> Callable[..., Any]:
    """`module.path:function` -> the function; any failure is an ImportError."""
    _forget_listings(plugins_dir)
    module_name, sep, func_name = ref.partition(":")
    if not sep or not module_name or not func_name:
        raise ImportError(f"step reference {ref!r} is not of the form 'module.path:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ModuleNotFoundError(
                f"No module named {exc.name!r} in the plugins directory {plugins_dir} "
                f"(step reference {ref!r})",
                name=exc.name,
            ) from exc
        raise
    try:
        func = getattr(module, func_name)
    except AttributeError:
        raise ImportError(
            f"cannot find function {func_name!r} in module {module_name!r} "
            f"({getattr(module, '__file__', '?')}); check the step's python = {ref!r}",
            name=module_name,
        ) from None
    if not callable(func):
        raise ImportError(f"{ref!r} is a {type(func).__name__}, not a function")
    return func
