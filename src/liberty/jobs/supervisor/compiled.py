"""Plugin code compiled once per source, not once per attempt.

A spare compiles the module of the step it expects while it waits (before any
of the plugin runs) and reports the code it compiled; later spares get that
code back in `prepare` and use it only for source of the same digest at the
same path, which each reads and hashes itself, so an edit is compiled afresh.
The supervisor never unmarshals the code, and keeps it only once it has read
the file itself and found the digest the child claimed: a child can then only
ever hand over code for the source that is really there.
"""

from __future__ import annotations

import os
import re
import stat

from ..protocol import CompiledSource, source_digest

MAX_SOURCE_BYTES = 4 * 1024 * 1024  # a plugin file past this is not read back to be checked: its spares compile it
MAX_KEPT_BYTES = 32 * 1024 * 1024  # all the code kept, base64; the oldest go first
_DIGEST = re.compile(r"[0-9a-f]{64}")


class CompiledSources:
    """The code of the modules steps were last started with, keyed by step reference."""

    def __init__(self, plugins: str) -> None:
        self._root = os.path.realpath(plugins)
        self._kept: dict[str, CompiledSource] = {}
        self._bytes = 0

    def get(self, ref: str | None) -> CompiledSource | None:
        return self._kept.get(ref) if ref is not None else None

    def offer(self, ref: str, compiled: CompiledSource) -> bool:
        """Keep `compiled` for `ref` if the plugin file holds, now, source of the digest it claims.

        Reads the file on the caller's thread: a plugin module, once per edit (a spare reports
        only what it compiled, and it compiles only what the supervisor had no code for)."""
        if not _DIGEST.fullmatch(compiled.digest) or not compiled.code:
            return False
        if _digest(compiled.path, self._root) != compiled.digest:
            return False  # edited since, or not a plugin file: nothing kept, the next spare compiles
        self._forget(ref)
        self._kept[ref] = compiled
        self._bytes += len(compiled.code)
        while self._bytes > MAX_KEPT_BYTES and self._kept:
            self._forget(next(iter(self._kept)))
        return True

    def _forget(self, ref: str) -> None:
        old = self._kept.pop(ref, None)
        if old is not None:
            self._bytes -= len(old.code)


def _digest(path: str, root: str) -> str | None:
    """`source_digest` of the regular file `path` beneath the plugins directory `root`, or None."""
    if not os.path.isabs(path) or not os.path.realpath(path).startswith(root + os.sep):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SOURCE_BYTES:
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_SOURCE_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return source_digest(data) if len(data) <= MAX_SOURCE_BYTES else None
