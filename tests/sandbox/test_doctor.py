"""`nomaflow doctor`'s data: every protection, measured on this host, without touching the caller."""

from __future__ import annotations

from liberty.jobs.sandbox import prctl
from liberty.jobs.supervisor.doctor import diagnose, render

EXPECTED = [
    "cgroups",
    "memory limit",
    "pids limit",
    "cgroup.kill",
    "cpu accounting",
    "subreaper",
    "landlock",
    "network namespace",
    "user namespace",
    "no_new_privs",
    "capability drop",
    "separate uid",
    "rlimits",
    "PR_SET_DUMPABLE",
]


def test_diagnose_covers_every_protection_and_this_host_lacks_only_the_separate_uid() -> None:
    found = diagnose()
    assert [p.name for p in found] == EXPECTED
    assert [p.name for p in found if not p.active] == ["separate uid"]
    missing = next(p for p in found if p.name == "separate uid")
    assert "cannot read" in missing.detail and "fallback" in missing.detail


def test_diagnose_leaves_the_calling_process_as_it_was() -> None:
    before = (prctl.is_dumpable(), prctl.has_no_new_privs(), prctl.is_subreaper(), prctl.effective_capabilities())
    diagnose()
    assert (prctl.is_dumpable(), prctl.has_no_new_privs(), prctl.is_subreaper(), prctl.effective_capabilities()) == before


def test_render_prints_one_line_per_protection_with_its_state() -> None:
    lines = render(diagnose()).splitlines()
    assert len(lines) == len(EXPECTED)
    assert lines[0].startswith("ok  cgroups")
    assert any(line.startswith("--  separate uid") for line in lines)
