"""Small control-file reads and writes with bare syscalls."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from liberty.jobs._sysfiles import read_small, write_small


def test_read_small_returns_a_file_longer_than_one_read(tmp_path: Path) -> None:
    data = os.urandom(200_000)
    (tmp_path / "f").write_bytes(data)
    assert read_small(tmp_path / "f") == data


def test_read_small_stops_at_its_limit(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 1000)
    assert read_small(tmp_path / "f", limit=10) == b"x" * 10


def test_read_small_reads_proc_files_whose_size_is_zero() -> None:
    assert os.stat("/proc/self/stat").st_size == 0
    assert read_small("/proc/self/stat").startswith(f"{os.getpid()} (".encode())


def test_write_small_replaces_the_whole_content(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"a much longer old content")
    write_small(tmp_path / "f", b"new")
    assert (tmp_path / "f").read_bytes() == b"new"


def test_write_small_does_not_create_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_small(tmp_path / "missing", b"1")
    assert not (tmp_path / "missing").exists()


def test_write_small_reaches_a_kernel_control_file() -> None:
    with open("/proc/self/comm") as f:
        before = f.read().strip()
    try:
        write_small("/proc/self/comm", b"sysfiles-test")
        assert read_small("/proc/self/comm") == b"sysfiles-test\n"
    finally:
        write_small("/proc/self/comm", before.encode())
