"""`nomaflow doctor`: which protections this host really gives a step, and why any is missing.

Everything is tried, not inferred: cgroups by creating a probe cgroup, the
sandbox measures in throwaway forks.  Nothing here changes the calling
process.
"""

from __future__ import annotations

import os
import sys

import attrs

from .. import sandbox
from ..sandbox import prctl
from ..sandbox.probe import in_fork
from .cgroups import CgroupSupport, detect


@attrs.frozen
class Protection:
    name: str
    active: bool
    detail: str


def _subreaper() -> str:
    prctl.prctl(prctl.PR_SET_CHILD_SUBREAPER, 1)
    if not prctl.is_subreaper():
        raise OSError("PR_SET_CHILD_SUBREAPER did not stick")
    return "orphaned descendants re-parent to the supervisor"


def _cgroup_protections(support: CgroupSupport) -> list[Protection]:
    def piece(name: str, have: bool, good: str, fallback: str) -> Protection:
        why = support.missing.get(name) or support.missing.get("cgroups") or f"cgroups: {support.mode}"
        return Protection(name, have, good if have else f"{why}; fallback: {fallback}")

    where = ", ".join(f"{h.role}={h.own}" for h in support.hierarchies)
    return [
        Protection(
            "cgroups",
            support.mode != "none",
            f"{support.mode} ({where})" if support.mode != "none" else "; ".join(support.missing.values()) or "none",
        ),
        piece("memory limit", support.memory, "cgroup memory limit, OOM kills counted", "an RSS watchdog over the process tree"),
        piece("pids limit", support.pids, "cgroup pids.max (counts threads too)", "RLIMIT_NPROC, effective only with a separate uid"),
        piece("cgroup.kill", support.kill, "one write kills the attempt's whole population", "freeze, then SIGKILL every member until empty"),
        piece("cpu accounting", support.cpu, "cpu.stat counts every descendant's CPU time", "RLIMIT_CPU per process and psutil sums"),
    ]


def diagnose(plugins: str | None = None) -> list[Protection]:
    """Every protection, active or not, with the measured reason."""
    support = detect()
    interpreter = [p for p in sys.path if p and os.path.isdir(p)] + ([plugins] if plugins else [])
    found = sandbox.probe(interpreter)
    subreaper = in_fork(_subreaper)

    def from_probe(name: str, key: str, fallback: str = "") -> Protection:
        result = found[key]
        detail = result["detail"] if result["ok"] or not fallback else f"{result['detail']}; fallback: {fallback}"
        return Protection(name, bool(result["ok"]), detail)

    return [
        *_cgroup_protections(support),
        Protection("subreaper", bool(subreaper["ok"]), subreaper["detail"]),
        from_probe("landlock", "landlock", "none: the child can read and write wherever its uid may"),
        from_probe("network namespace", "netns", "Landlock (ABI >= 4) denies TCP bind/connect; UDP stays open"),
        from_probe("user namespace", "userns", "a non-root supervisor cannot isolate the network"),
        from_probe("no_new_privs", "no_new_privs"),
        from_probe("capability drop", "drop_capabilities"),
        from_probe("separate uid", "separate_uid", "the child keeps the supervisor's uid: capabilities dropped, Landlock"),
        from_probe("rlimits", "rlimits"),
        from_probe("PR_SET_DUMPABLE", "dumpable"),
    ]


def render(protections: list[Protection]) -> str:
    """Plain text, one protection per line, for the CLI."""
    width = max(len(p.name) for p in protections)
    return "\n".join(f"{'ok ' if p.active else '-- '} {p.name:<{width}}  {p.detail}" for p in protections)
