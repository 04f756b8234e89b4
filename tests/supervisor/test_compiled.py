"""The supervisor keeps a spare's compiled plugin code only for the source really in the file."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from liberty.jobs.protocol import CompiledSource, source_digest
from liberty.jobs.supervisor import compiled
from liberty.jobs.supervisor.compiled import CompiledSources

REF = "steps:run"


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    root = tmp_path / "plugins"
    root.mkdir()
    (root / "steps.py").write_text("def run():\n    return 1\n")
    return root


def claim(path: Path, source: bytes | None = None, code: str = "Y29kZQ==") -> CompiledSource:
    """What a spare reports for `path`: the digest of `source` (of the file, by default)."""
    return CompiledSource(path=str(path), digest=source_digest(path.read_bytes() if source is None else source), code=code)


def test_code_for_the_source_in_the_file_is_kept_and_handed_out(plugins: Path) -> None:
    sources = CompiledSources(str(plugins))
    report = claim(plugins / "steps.py")
    assert sources.offer(REF, report)
    assert sources.get(REF) == report


def test_code_for_source_the_file_no_longer_holds_is_not_kept(plugins: Path) -> None:
    sources = CompiledSources(str(plugins))
    assert not sources.offer(REF, claim(plugins / "steps.py", source=b"def run():\n    return 2\n"))
    assert sources.get(REF) is None


def test_a_newer_report_replaces_the_code_kept_for_a_step(plugins: Path) -> None:
    sources = CompiledSources(str(plugins))
    path = plugins / "steps.py"
    sources.offer(REF, claim(path))
    path.write_text("def run():\n    return 2\n")
    newer = claim(path, code="bmV3ZXI=")
    assert sources.offer(REF, newer)
    assert sources.get(REF) == newer


@pytest.mark.parametrize("where", ["outside", "symlink out", "relative", "missing", "directory"])
def test_code_for_anything_but_a_file_in_the_plugins_directory_is_not_kept(plugins: Path, tmp_path: Path, where: str) -> None:
    outside = tmp_path / "outside.py"
    outside.write_text("def run():\n    return 1\n")
    if where == "outside":
        report = claim(outside)
    elif where == "symlink out":
        (plugins / "link.py").symlink_to(outside)
        report = CompiledSource(path=str(plugins / "link.py"), digest=source_digest(outside.read_bytes()), code="eA==")
    elif where == "relative":
        report = CompiledSource(path="plugins/steps.py", digest=claim(plugins / "steps.py").digest, code="eA==")
    elif where == "missing":
        report = CompiledSource(path=str(plugins / "gone.py"), digest="0" * 64, code="eA==")
    else:
        (plugins / "pkg.py").mkdir()
        report = CompiledSource(path=str(plugins / "pkg.py"), digest="0" * 64, code="eA==")
    sources = CompiledSources(str(plugins))
    assert not sources.offer(REF, report)
    assert sources.get(REF) is None


def test_a_fifo_named_like_a_plugin_is_refused_without_blocking(plugins: Path) -> None:
    fifo = plugins / "fifo.py"
    os.mkfifo(fifo)
    sources = CompiledSources(str(plugins))
    result: list[bool] = []
    reader = threading.Thread(target=lambda: result.append(sources.offer(REF, CompiledSource(path=str(fifo), digest="0" * 64, code="eA=="))))
    reader.start()
    reader.join(timeout=10)
    assert result == [False]


@pytest.mark.parametrize("digest", ["", "ABC", "g" * 64, "0" * 63, "0" * 65])
def test_a_malformed_digest_is_refused(plugins: Path, digest: str) -> None:
    sources = CompiledSources(str(plugins))
    assert not sources.offer(REF, CompiledSource(path=str(plugins / "steps.py"), digest=digest, code="eA=="))


def test_empty_code_is_refused(plugins: Path) -> None:
    sources = CompiledSources(str(plugins))
    assert not sources.offer(REF, claim(plugins / "steps.py", code=""))


def test_past_the_byte_cap_the_oldest_code_is_forgotten(plugins: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "MAX_KEPT_BYTES", 10)
    sources = CompiledSources(str(plugins))
    (plugins / "other.py").write_text("x = 1\n")
    sources.offer("steps:run", claim(plugins / "steps.py", code="a" * 6))
    sources.offer("other:x", claim(plugins / "other.py", code="b" * 6))
    assert sources.get("steps:run") is None
    assert sources.get("other:x") is not None


def test_no_step_no_code(plugins: Path) -> None:
    assert CompiledSources(str(plugins)).get(None) is None
