"""Importing plugins: fresh from source on every attempt, resolved as the spec's table says."""

from __future__ import annotations

import importlib
import importlib.machinery as machinery
import os
import sys
from collections.abc import Callable
from typing import Any


class _FreshSourceLoader(machinery.SourceFileLoader):
    """Compiles plugin source every time.

    A `__pycache__` entry is keyed on mtime and size, so an edit that keeps
    both (same second, same length) would run stale code; plugins are small,
    compiling them is cheap, and "edited means picked up" must always hold.
    The one exception is code this very process compiled from the very same
    bytes (`compile_ahead`): reading the file again and comparing is what
    decides, so an edit made in between is still compiled afresh.
    """

    def get_code(self, fullname: str) -> Any:
        source = self.get_data(self.path)
        ahead = _compiled_ahead.pop(self.path, None)
        if ahead is not None and ahead[0] == source:
            return ahead[1]
        return compile(source, self.path, "exec", dont_inherit=True)


_compiled_ahead: dict[str, tuple[bytes, Any]] = {}


def compile_ahead(plugins_dir: str, ref: str) -> str | None:
    """Compile, without running it, the source of the module `ref` ("module.path:function")
    names, for `_FreshSourceLoader` to use if the step imports the same bytes later.

    What a waiting attempt can do for its step's start before knowing it for sure:
    compiling is a third of a step's import.  Returns the file compiled, or None
    when there is nothing to compile (a package, an extension, no such module,
    a syntax error: the import at `start` reports whatever is wrong).
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
        _compiled_ahead[path] = (source, compile(source, path, "exec", dont_inherit=True))
    except (OSError, SyntaxError, ValueError, RecursionError):
        return None
    return path


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
