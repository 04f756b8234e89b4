"""Sealing the child, between receiving `start` and importing the plugin.

Runs on the child's only thread (namespaces, no_new_privs and Landlock are
per-thread; a thread started earlier would stay outside).  Each measure is
tried independently and lands in the report as applied or failed with the
reason: the supervisor decides whether a missing one is fatal, but nothing is
ever silently skipped.
"""

from __future__ import annotations

import os
import pwd
import resource
import sys
from pathlib import Path
from typing import Any

import attrs

from . import landlock, namespaces, prctl, rlimits

DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_SYSTEM_READABLE = (
    "/usr",
    "/lib",
    "/lib64",
    "/lib32",
    "/bin",
    "/sbin",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/nsswitch.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/passwd",
    "/etc/group",
    "/etc/mime.types",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/os-release",
    "/proc",
    "/sys/devices/system/cpu",
)


@attrs.define
class SandboxSpec:
    """What the supervisor asks of the child; travels in the start message as a dict."""

    workdir: str
    cpu_seconds: float | None = None
    max_open_files: int | None = None
    max_file_mb: int | None = None
    max_processes: int | None = None
    network: bool = True
    readable: list[str] = attrs.field(factory=list)
    writable: list[str] = attrs.field(factory=list)
    landlock: bool = True
    no_new_privs: bool = True
    uid: int | None = None
    gid: int | None = None
    drop_capabilities: bool = False

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SandboxSpec:
        """Strict: an unknown key or a wrong type is an error naming the key."""
        if not isinstance(data, dict):
            raise TypeError(f"sandbox spec must be a dict, got {type(data).__name__}")
        fields = {f.name: f for f in attrs.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"sandbox spec: unknown keys {unknown}; known: {sorted(fields)}")
        for key, value in data.items():
            _check_type(key, value, fields[key].type)
        return cls(**{k: list(v) if isinstance(v, list) else v for k, v in data.items()})


_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "bool": (bool,),
    "float | None": (int, float, type(None)),
    "int | None": (int, type(None)),
    "list[str]": (list,),
}


def _check_type(key: str, value: Any, annotation: Any) -> None:
    allowed = _TYPES[str(annotation)]
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if ok and isinstance(value, list):
        ok = all(isinstance(item, str) for item in value)
    if not ok:
        raise TypeError(f"sandbox spec: {key} must be {annotation}, got {type(value).__name__} {value!r:.60}")


@attrs.define
class Measure:
    name: str
    applied: bool
    detail: str


@attrs.define
class AppliedReport:
    """Every requested measure, applied or not, with the reason."""

    measures: list[Measure] = attrs.field(factory=list)

    def add(self, name: str, applied: bool, detail: str) -> None:
        self.measures.append(Measure(name, applied, detail))

    def __getitem__(self, name: str) -> Measure:
        for m in self.measures:
            if m.name == name:
                return m
        raise KeyError(name)

    def __contains__(self, name: str) -> bool:
        return any(m.name == name for m in self.measures)

    def failed(self) -> list[Measure]:
        return [m for m in self.measures if not m.applied]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {m.name: {"applied": m.applied, "detail": m.detail} for m in self.measures}

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, Any]]) -> AppliedReport:
        return cls([Measure(name, bool(v["applied"]), str(v["detail"])) for name, v in data.items()])


def default_readable(*extra: str) -> list[str]:
    """What a Python child needs to read: its interpreter, site-packages, this package, system libraries."""
    paths: list[str] = []
    for prefix in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        paths.append(prefix)
    paths.append(str(Path(os.path.realpath(sys.executable)).parent.parent))
    paths.extend(p for p in sys.path if p and os.path.isabs(p))
    paths.append(str(Path(__file__).resolve().parents[3]))  # the directory holding liberty/
    paths.extend(_SYSTEM_READABLE)
    paths.extend(extra)
    seen: dict[str, None] = {}
    for p in paths:
        seen.setdefault(os.path.normpath(p), None)
    return list(seen)


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def apply(spec: SandboxSpec) -> AppliedReport:
    """Apply `spec` to this process, in the order the kernel needs; irreversible."""
    report = AppliedReport()
    threads = _thread_count()
    report.add(
        "single_thread",
        threads == 1,
        "one thread" if threads == 1 else f"{threads} threads: namespaces, no_new_privs and Landlock bind only this one",
    )
    if not spec.network:
        _apply_network(report)
    _apply_rlimits(spec, report)
    if spec.uid is not None or spec.gid is not None:
        _apply_uid(spec, report)
    if spec.drop_capabilities:
        _try(report, "capabilities", lambda: (prctl.drop_capabilities(), f"effective {prctl.effective_capabilities():#x}, bounding {prctl.bounding_capabilities():#x}")[1])
    if spec.no_new_privs or spec.landlock:
        _try(report, "no_new_privs", lambda: (prctl.set_no_new_privs(), "set")[1])
    deny_tcp = not spec.network and not report["network"].applied
    if spec.landlock:
        _apply_landlock(spec, report, deny_tcp=deny_tcp)
    elif deny_tcp:
        report.add("network_fallback", False, "Landlock is off in the spec, so nothing denies TCP either")
    _try(report, "dumpable", lambda: (prctl.set_dumpable(False), "PR_SET_DUMPABLE=0")[1])
    nproc = report["rlimit_nproc"] if "rlimit_nproc" in report else None
    if nproc is not None and nproc.applied and os.getuid() == 0:
        nproc.applied = False
        nproc.detail += "; ignored: the child runs as uid 0 (use the pids cgroup or a uid drop)"
    return report


def _try(report: AppliedReport, name: str, action: Any) -> bool:
    try:
        detail = action()
    except (OSError, ValueError) as exc:
        report.add(name, False, f"{type(exc).__name__}: {exc}")
        return False
    report.add(name, True, detail)
    return True


def _apply_network(report: AppliedReport) -> None:
    _try(report, "network", lambda: f"private network namespace ({namespaces.isolate_network()}), loopback only")


def _apply_rlimits(spec: SandboxSpec, report: AppliedReport) -> None:
    report.add("rlimit_core", *_set_limit(resource.RLIMIT_CORE, 0, 0, "core dumps off"))
    if spec.cpu_seconds is not None:
        soft, hard = rlimits.cpu_limits(spec.cpu_seconds)
        report.add("rlimit_cpu", *_set_limit(resource.RLIMIT_CPU, soft, hard, "SIGXCPU at soft, SIGKILL at hard"))
    if spec.max_open_files is not None:
        report.add("rlimit_nofile", *_set_limit(resource.RLIMIT_NOFILE, spec.max_open_files, None, "EMFILE past it"))
    if spec.max_file_mb is not None:
        size = spec.max_file_mb * 1024 * 1024
        report.add("rlimit_fsize", *_set_limit(resource.RLIMIT_FSIZE, size, None, "EFBIG past it"))
    if spec.max_processes is not None:
        report.add("rlimit_nproc", *_set_limit(resource.RLIMIT_NPROC, spec.max_processes, None, "per uid, EAGAIN past it"))


def _set_limit(which: int, soft: int, hard: int | None, what: str) -> tuple[bool, str]:
    try:
        got = rlimits.lower(which, soft, hard)
    except (OSError, ValueError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    wanted = (soft, soft if hard is None else hard)
    if got != wanted:
        return got[0] <= soft, f"soft={got[0]} hard={got[1]} (asked {wanted}, capped by the inherited hard limit); {what}"
    return True, f"soft={got[0]} hard={got[1]}; {what}"


def _apply_uid(spec: SandboxSpec, report: AppliedReport) -> None:
    uid = os.getuid() if spec.uid is None else spec.uid
    gid = spec.gid
    if gid is None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = uid

    def drop() -> str:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if uid != 0:
            try:
                os.setuid(0)
            except PermissionError:
                pass
            else:
                raise OSError(f"uid drop to {uid} did not hold: setuid(0) succeeded afterwards")
        return f"uid={os.getuid()} gid={os.getgid()} groups={os.getgroups()}"

    _try(report, "uid", drop)


def _apply_landlock(spec: SandboxSpec, report: AppliedReport, *, deny_tcp: bool) -> None:
    """`deny_tcp`: the netns failed, so let Landlock (ABI >= 4) at least refuse TCP."""

    def seal() -> str:
        ruleset = landlock.Ruleset(deny_tcp=deny_tcp)
        try:
            for path in spec.readable:
                ruleset.allow(path, landlock.READ_ONLY)
            for path in [spec.workdir, *spec.writable]:
                ruleset.allow(path, landlock.READ_WRITE)
            for path in DEVICES:
                ruleset.allow(path, landlock.DEVICE_RW)
            if not any(p == spec.workdir for p, _ in ruleset.rules):
                raise OSError(f"work directory {spec.workdir!r} cannot be opened; refusing a sandbox without it")
            ruleset.restrict()
        finally:
            ruleset.close()
        if deny_tcp:
            report.add(
                "network_fallback",
                ruleset.handled_net != 0,
                "Landlock denies TCP bind/connect (UDP and unix sockets stay open)"
                if ruleset.handled_net
                else f"Landlock ABI {ruleset.abi} < 4 cannot deny TCP: the network stays reachable",
            )
        skipped = f"; missing, skipped: {[p for p, _ in ruleset.skipped]}" if ruleset.skipped else ""
        scoped = ", signals and abstract unix sockets scoped" if ruleset.scoped else ""
        return f"ABI {ruleset.abi}: {len(ruleset.rules)} rules, read-write only under {[spec.workdir, *spec.writable]}{scoped}{skipped}"

    if not _try(report, "landlock", seal) and deny_tcp:
        report.add("network_fallback", False, "Landlock failed, so nothing denies TCP either")
