"""The zygote's in-process helpers (its forking is tested end to end in tests/supervisor/test_zygote.py)."""

from __future__ import annotations

import ctypes
import os

from liberty.jobs.child.zygote import _replace_environ

_libc = ctypes.CDLL(None)
_libc.getenv.restype = ctypes.c_char_p


def test_replace_environ_leaves_exactly_the_new_environment_in_python_and_in_libc() -> None:
    saved = dict(os.environ)
    os.environ["NOMAFLOW_TEST_DROPPED"] = "old"
    os.environ["NOMAFLOW_TEST_CHANGED"] = "old"
    wanted = {"NOMAFLOW_TEST_CHANGED": "new", "NOMAFLOW_TEST_ADDED": "added", "PATH": saved.get("PATH", "/usr/bin")}
    try:
        _replace_environ(wanted)
        assert dict(os.environ) == wanted
        assert {k: _libc.getenv(k.encode()).decode() for k in wanted} == wanted
        assert _libc.getenv(b"NOMAFLOW_TEST_DROPPED") is None
    finally:
        _replace_environ(saved)
    assert dict(os.environ) == saved
