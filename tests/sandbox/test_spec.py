"""SandboxSpec travels in the start message: JSON in, JSON out, strict on the way in; its readable list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from liberty.jobs.sandbox import AppliedReport, SandboxSpec, outermost, probe


def test_spec_round_trips_through_json() -> None:
    spec = SandboxSpec(workdir="/w", cpu_seconds=1.5, max_open_files=64, network=False, readable=["/usr"], writable=["/x"], uid=65534)
    assert SandboxSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_spec_rejects_unknown_keys_by_name() -> None:
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxSpec.from_dict({"workdir": "/w", "memory_mb": 5})


@pytest.mark.parametrize(
    ("key", "value"),
    [("max_open_files", "64"), ("network", 1), ("uid", True), ("readable", ["/usr", 3]), ("cgroup_limits", {"/x": 1}), ("make_cgroups", "yes")],
)
def test_spec_rejects_wrong_types_by_key(key: str, value: object) -> None:
    with pytest.raises(TypeError, match=key):
        SandboxSpec.from_dict({"workdir": "/w", key: value})


def test_report_round_trips_through_json() -> None:
    report = AppliedReport()
    report.add("landlock", True, "ABI 7")
    report.add("network", False, "EPERM")
    again = AppliedReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report
    assert [m.name for m in again.failed()] == ["network"]


def test_probe_finds_every_kernel_protection_on_this_host() -> None:
    found = probe()
    assert found["landlock"] == {"ok": True, "detail": "ABI 7"}
    assert {k: v["ok"] for k, v in found.items() if k != "separate_uid"} == {
        "landlock": True,
        "netns": True,
        "userns": True,
        "no_new_privs": True,
        "rlimits": True,
        "dumpable": True,
        "drop_capabilities": True,
    }


def test_probe_says_why_the_unprivileged_uid_cannot_run_this_interpreter() -> None:
    found = probe(["/root/.pyenv"])
    assert found["separate_uid"]["ok"] is False
    assert "cannot read ['/root/.pyenv']" in found["separate_uid"]["detail"]


def test_outermost_drops_paths_beneath_another_by_real_path(tmp_path: Path) -> None:
    top = tmp_path / "top"
    (top / "inner").mkdir(parents=True)
    (tmp_path / "file").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(top / "inner")
    paths = [str(top / "inner"), str(top), str(link), str(tmp_path / "file"), str(tmp_path / "missing")]
    assert outermost(paths) == [str(top), str(tmp_path / "file"), str(tmp_path / "missing")]


def test_outermost_keeps_a_path_beside_a_file_or_a_prefix_that_is_not_a_parent(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "database").mkdir()
    paths = [str(tmp_path / "data"), str(tmp_path / "database")]
    assert outermost(paths) == paths
