"""Reading and writing the kernel's small control files (/proc, cgroupfs) with bare syscalls.

`open()` builds a buffered, decoded file object per call.  For a one-shot
read or write of a few bytes that machinery costs more than the syscalls,
and in a freshly forked attempt every Python object it touches is a page
copied from the zygote.
"""

from __future__ import annotations

import os

_MAX_READ = 1 << 20


def read_small(path: str | os.PathLike[str], limit: int = _MAX_READ) -> bytes:
    """The whole file (at most `limit` bytes), in as few reads as it takes."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks: list[bytes] = []
        size = 0
        while size < limit:
            chunk = os.read(fd, min(65536, limit - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_small(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace an existing file's content with one write; a short write is an error (control files take all or nothing)."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        written = os.write(fd, data)
    finally:
        os.close(fd)
    if written != len(data):
        raise OSError(f"short write to {os.fspath(path)}: {written} of {len(data)} bytes")
