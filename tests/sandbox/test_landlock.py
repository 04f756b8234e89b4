"""Landlock inside a real child: writes only in the work dir, reads only what Python and the step need."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import attrs
import pytest

from liberty.jobs.sandbox import SandboxSpec, landlock_abi

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
Runner = Any  # conftest.Runner: run_sandboxed(spec, attack_code) -> Outcome

pytestmark = pytest.mark.timeout(60)


def test_this_host_has_landlock_abi_7_or_later() -> None:
    assert landlock_abi() >= 7


def test_write_outside_workdir_is_denied_and_inside_allowed(run_sandboxed: Runner, base_spec: SandboxSpec, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    out = run_sandboxed(
        base_spec,
        f"""
        def write(path):
            with open(path, "w") as f:
                f.write("x")
        result(outside=attempt(lambda: write({str(outside / "f")!r})),
               tmp=attempt(lambda: write("/tmp/nomaflow-escape")),
               inside=attempt(lambda: write(os.path.join(os.getcwd(), "f"))))
        """,
    )
    assert out.report["landlock"].applied, out.report["landlock"].detail
    assert out.result == {
        "outside": {"ok": False, "error": "PermissionError", "errno": errno.EACCES},
        "tmp": {"ok": False, "error": "PermissionError", "errno": errno.EACCES},
        "inside": {"ok": True, "value": None},
    }
    assert not (outside / "f").exists()


def test_stdlib_imports_and_plugins_stay_readable(run_sandboxed: Runner, base_spec: SandboxSpec) -> None:
    out = run_sandboxed(
        base_spec,
        f"""
        was_loaded = "asyncio" in sys.modules
        import asyncio, decimal, sqlite3, ssl
        asyncio.run(asyncio.sleep(0))
        ssl.create_default_context()
        result(was_loaded=was_loaded,
               plugins=sorted(os.listdir({str(PLUGINS)!r})),
               db=sqlite3.connect("steps.db").execute("select 1").fetchone()[0])
        """,
    )
    assert out.returncode == 0, out.stderr
    assert out.result is not None
    assert out.result["was_loaded"] is False
    assert out.result["plugins"] == sorted(p.name for p in PLUGINS.iterdir())
    assert out.result["db"] == 1


def test_files_of_other_steps_and_system_secrets_are_unreadable(run_sandboxed: Runner, base_spec: SandboxSpec, tmp_path: Path) -> None:
    other = tmp_path / "other-step"
    other.mkdir()
    (other / "result.csv").write_text("secret")
    out = run_sandboxed(
        base_spec,
        f"""
        result(other=attempt(lambda: open({str(other / "result.csv")!r}).read()),
               shadow=attempt(lambda: open("/etc/shadow").read()),
               root=attempt(lambda: os.listdir("/root")))
        """,
    )
    assert out.result is not None
    assert {k: v["ok"] for k, v in out.result.items()} == {"other": False, "shadow": False, "root": False}


def test_subprocesses_run_and_inherit_the_restriction(run_sandboxed: Runner, base_spec: SandboxSpec, tmp_path: Path) -> None:
    out = run_sandboxed(
        base_spec,
        f"""
        import subprocess
        echo = subprocess.run(["echo", "hi"], capture_output=True, text=True).stdout
        touch = subprocess.run(["touch", {str(tmp_path / "escaped")!r}], capture_output=True).returncode
        result(echo=echo, touch=touch)
        """,
    )
    assert out.result == {"echo": "hi\n", "touch": 1}
    assert not (tmp_path / "escaped").exists()


def test_declared_writable_paths_are_writable(run_sandboxed: Runner, base_spec: SandboxSpec, tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    spec = attrs.evolve(base_spec, writable=[str(exports)])
    out = run_sandboxed(spec, f"result(w=attempt(lambda: open({str(exports / 'out.pdf')!r}, 'w').write('pdf')))")
    assert out.result == {"w": {"ok": True, "value": 3}}


def test_a_missing_workdir_is_reported_as_a_landlock_failure(run_sandboxed: Runner, base_spec: SandboxSpec, tmp_path: Path) -> None:
    spec = attrs.evolve(base_spec, workdir=str(tmp_path / "never-created"))
    out = run_sandboxed(spec, "result()")
    assert not out.report["landlock"].applied
    assert "never-created" in out.report["landlock"].detail


def test_the_supervisors_environ_and_signals_are_out_of_reach(run_sandboxed: Runner, base_spec: SandboxSpec, fake_supervisor: int) -> None:
    out = run_sandboxed(
        base_spec,
        f"""
        import signal
        result(environ=attempt(lambda: open("/proc/{fake_supervisor}/environ").read()),
               mem=attempt(lambda: open("/proc/{fake_supervisor}/mem", "rb").read(1)),
               signal=attempt(lambda: os.kill({fake_supervisor}, signal.SIGTERM)))
        """,
    )
    assert out.result is not None
    assert {k: v.get("error") for k, v in out.result.items()} == {
        "environ": "PermissionError",
        "mem": "PermissionError",
        "signal": "PermissionError",
    }


def test_landlock_alone_denies_tcp_where_no_network_namespace_exists(run_sandboxed: Runner, base_spec: SandboxSpec, tcp_server: int) -> None:
    spec = attrs.evolve(base_spec, landlock=False)
    out = run_sandboxed(
        spec,
        f"""
        import socket
        from liberty.jobs.sandbox import landlock
        rules = landlock.Ruleset(deny_tcp=True)
        rules.allow("/", landlock.READ_WRITE)
        rules.restrict()
        result(connect=attempt(lambda: socket.create_connection(("127.0.0.1", {tcp_server}), timeout=5).close()))
        """,
    )
    assert out.result == {"connect": {"ok": False, "error": "PermissionError", "errno": errno.EACCES}}


def test_a_rule_on_a_file_keeps_only_the_rights_a_file_can_have(tmp_path: Path) -> None:
    from liberty.jobs.sandbox import landlock

    (tmp_path / "f").write_text("x")
    rules = landlock.Ruleset()
    try:
        assert rules.allow(str(tmp_path), landlock.READ_WRITE)
        assert rules.allow(str(tmp_path / "f"), landlock.READ_WRITE)
        assert not rules.allow(str(tmp_path / "missing"), landlock.READ_WRITE)
    finally:
        rules.close()
    (dir_path, dir_rights), (file_path, file_rights) = rules.rules
    assert (dir_path, dir_rights) == (str(tmp_path), landlock.READ_WRITE & rules.handled_fs)
    assert (file_path, file_rights) == (str(tmp_path / "f"), landlock.READ_WRITE & rules.handled_fs & landlock._FILE_ONLY_RIGHTS)
    assert file_rights != dir_rights
    assert [p for p, _ in rules.skipped] == [str(tmp_path / "missing")]


def test_a_path_said_to_be_a_file_is_opened_once_with_a_files_rights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from liberty.jobs.sandbox import landlock

    (tmp_path / "f").write_text("x")
    opened: list[int] = []
    real_open = os.open
    monkeypatch.setattr(landlock.os, "open", lambda path, flags, *a: opened.append(flags) or real_open(path, flags, *a))
    rules = landlock.Ruleset()
    try:
        assert rules.allow(str(tmp_path / "f"), landlock.READ_WRITE, directory=False)
        assert rules.allow(str(tmp_path), landlock.READ_WRITE, directory=False)  # wrong: it only loses rights
    finally:
        rules.close()
    assert len(opened) == 2 and not any(flags & os.O_DIRECTORY for flags in opened)
    assert [rights for _, rights in rules.rules] == [landlock.READ_WRITE & rules.handled_fs & landlock._FILE_ONLY_RIGHTS] * 2


def test_a_closed_ruleset_takes_no_more_rules(tmp_path: Path) -> None:
    from liberty.jobs.sandbox import landlock

    rules = landlock.Ruleset()
    rules.close()
    with pytest.raises(landlock.LandlockError, match="closed"):
        rules.allow(str(tmp_path), landlock.READ_WRITE)
