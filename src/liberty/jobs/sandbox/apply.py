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
from collections.abc import Callable
from typing import Any

import attrs

from .._sysfiles import read_small, write_small
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
    "/sys/devices/system/cpu",
    # Host-wide /proc files only: granting /proc would expose every process's
    # /proc/<pid>/environ, which Landlock's ptrace check does not cover on
    # PTRACE_MODE_READ (measured on 6.18).  The child's own /proc/<pid> is added by apply().
    "/proc/cpuinfo",
    "/proc/meminfo",
    "/proc/stat",
    "/proc/loadavg",
    "/proc/uptime",
    "/proc/version",
    "/proc/filesystems",
    "/proc/sys/kernel/random",
    "/proc/sys/vm/overcommit_memory",
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
    readable_files: list[str] = attrs.field(factory=list)  # known to be files: opened once, not as a directory first
    writable: list[str] = attrs.field(factory=list)
    landlock: bool = True
    no_new_privs: bool = True
    uid: int | None = None
    gid: int | None = None
    drop_capabilities: bool = True
    cgroups: list[str] = attrs.field(factory=list)  # the attempt's cgroup directories, one per hierarchy, to join first
    make_cgroups: bool = False  # planned by the supervisor: make them, then write `cgroup_limits`, then join
    cgroup_limits: dict[str, str] = attrs.field(factory=dict)  # control file -> value

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
        return cls(**{k: list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v for k, v in data.items()})


_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "bool": (bool,),
    "float | None": (int, float, type(None)),
    "int | None": (int, type(None)),
    "list[str]": (list,),
    "dict[str, str]": (dict,),
}


def _check_type(key: str, value: Any, annotation: Any) -> None:
    allowed = _TYPES[str(annotation)]
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if ok and isinstance(value, list):
        ok = all(isinstance(item, str) for item in value)
    if ok and isinstance(value, dict):
        ok = all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
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
    paths.append(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    paths.extend(p for p in sys.path if p and os.path.isabs(p))
    package_root = os.path.realpath(__file__)
    for _ in range(4):  # .../src/liberty/jobs/sandbox/apply.py -> .../src
        package_root = os.path.dirname(package_root)
    paths.append(package_root)
    paths.extend(_SYSTEM_READABLE)
    paths.extend(extra)
    seen: dict[str, None] = {}
    for p in paths:
        seen.setdefault(os.path.normpath(p), None)
    return list(seen)


def outermost(paths: list[str]) -> list[str]:
    """`paths` without those beneath another of them (compared by real path), order kept.

    A Landlock rule on a directory covers everything under it, mounts included,
    so the others only cost the child an open and a rule each.
    """
    real = {p: os.path.realpath(p) for p in paths}
    dirs = {r for r in real.values() if os.path.isdir(r)}

    def beneath_another(r: str) -> bool:
        parent = os.path.dirname(r)
        while parent != r:
            if parent in dirs:
                return True
            r, parent = parent, os.path.dirname(parent)
        return False

    kept: list[str] = []
    seen: set[str] = set()
    for p in paths:
        if real[p] in seen or beneath_another(real[p]):
            continue
        seen.add(real[p])
        kept.append(p)
    return kept


def _thread_count() -> int:
    try:
        return int(read_small("/proc/self/stat").rsplit(b")", 1)[1].split()[17])  # num_threads
    except (OSError, ValueError, IndexError):
        return 1


def apply(spec: SandboxSpec) -> AppliedReport:
    """Apply `spec` to this process, in the order the kernel needs; irreversible.

    Namespaces need CAP_SYS_ADMIN, so they come before the uid drop and the
    capability drop; Landlock needs no_new_privs; dumpable goes last because
    a uid change resets it.
    """
    report = AppliedReport()
    if spec.cgroups:
        # First: everything after, and every process the step starts, is counted and killable with it.
        _try(report, "cgroup", lambda: _enter_cgroups(spec))
    _report_threads(report)
    if not spec.network:
        _try(report, "network", _isolate_network)
    _apply_rlimits(spec, report)
    deny_tcp = not spec.network and not report["network"].applied
    # Rules are collected before the uid drop: O_PATH opens made as root reach
    # paths the new uid cannot traverse (the rules only narrow; DAC still applies).
    ruleset = _landlock_ruleset(spec, report, deny_tcp=deny_tcp) if spec.landlock else None
    if spec.uid is not None or spec.gid is not None:
        _try(report, "uid", lambda: _drop_uid(spec.uid, spec.gid))
    if spec.drop_capabilities:
        _try(report, "capabilities", _drop_capabilities)
    if spec.no_new_privs or spec.landlock:
        _try(report, "no_new_privs", _no_new_privs)
    if ruleset is not None:
        _try(report, "landlock", lambda: _restrict(spec, ruleset))
    if deny_tcp:
        _report_tcp_fallback(report, ruleset)
    _try(report, "dumpable", _undumpable)
    if "rlimit_nproc" in report and report["rlimit_nproc"].applied and os.getuid() == 0:
        report["rlimit_nproc"].applied = False
        report["rlimit_nproc"].detail += "; ignored: the child runs as uid 0 (use the pids cgroup or a uid drop)"
    return report


def rehearse(spec: SandboxSpec) -> dict[str, dict[str, Any]]:
    """`apply`'s work that changes nothing: the Landlock ruleset built and closed, never enforced,
    and a report of the same shape.  For the zygote's warm-up (`child/warmup.py`)."""
    report = AppliedReport()
    _report_threads(report)
    ruleset = _landlock_ruleset(spec, report, deny_tcp=False) if spec.landlock else None
    if ruleset is not None:
        report.add("landlock", True, f"{len(ruleset.rules)} rules built, not enforced")
        ruleset.close()
    return report.to_dict()


def _report_threads(report: AppliedReport) -> None:
    threads = _thread_count()
    report.add(
        "single_thread",
        threads == 1,
        "one thread" if threads == 1 else f"{threads} threads: namespaces, no_new_privs and Landlock bind only this one",
    )


def files_apart(paths: list[str]) -> tuple[list[str], list[str]]:
    """`paths` as a spec's `readable` and `readable_files`: Landlock opens a file once, not as a directory first."""
    files = [p for p in paths if os.path.isfile(p)]
    return [p for p in paths if p not in files], files


def _try(report: AppliedReport, name: str, action: Callable[[], str]) -> bool:
    try:
        detail = action()
    except (OSError, ValueError) as exc:
        report.add(name, False, f"{type(exc).__name__}: {exc}")
        return False
    report.add(name, True, detail)
    return True


def _enter_cgroups(spec: SandboxSpec) -> str:
    """Join the attempt's cgroups; planned ones are made first, limits set before anything is in them."""
    if spec.make_cgroups:
        for directory in spec.cgroups:
            os.mkdir(directory)  # an existing one is an error: it is not ours alone
        for path, value in spec.cgroup_limits.items():
            if not any(path.startswith(directory + "/") for directory in spec.cgroups):
                raise ValueError(f"cgroup limit file {path!r} is outside the attempt's cgroups")
            write_small(path, value.encode())
    for directory in spec.cgroups:
        write_small(os.path.join(directory, "cgroup.procs"), b"0")  # "0": the writing process
    n = len(spec.cgroups)
    made = f"made with {len(spec.cgroup_limits)} limit file(s) and " if spec.make_cgroups else ""
    return f"{made}joined {n} hierarch{'y' if n == 1 else 'ies'}"


def _isolate_network() -> str:
    return f"private network namespace ({namespaces.isolate_network()}), loopback only"


def _drop_capabilities() -> str:
    bounding = prctl.drop_capabilities()
    return f"effective {prctl.held_capabilities():#x}, bounding {bounding:#x}"


def _no_new_privs() -> str:
    prctl.set_no_new_privs()
    return "set"


def _undumpable() -> str:
    prctl.set_dumpable(False)
    return "PR_SET_DUMPABLE=0"


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


def _drop_uid(uid: int | None, gid: int | None) -> str:
    uid = os.getuid() if uid is None else uid
    if gid is None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = uid
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


def _landlock_ruleset(spec: SandboxSpec, report: AppliedReport, *, deny_tcp: bool) -> landlock.Ruleset | None:
    """`deny_tcp`: the netns failed, so let Landlock (ABI >= 4) at least refuse TCP."""
    try:
        ruleset = landlock.Ruleset(deny_tcp=deny_tcp)
    except OSError as exc:
        report.add("landlock", False, f"{type(exc).__name__}: {exc}")
        return None
    try:
        for path in spec.readable:
            ruleset.allow(path, landlock.READ_ONLY)
        for path in spec.readable_files:
            ruleset.allow(path, landlock.READ_ONLY, directory=False)
        for path in [spec.workdir, *spec.writable]:
            ruleset.allow(path, landlock.READ_WRITE)
        for path in DEVICES:
            ruleset.allow(path, landlock.DEVICE_RW, directory=False)
        ruleset.allow(f"/proc/{os.getpid()}", landlock.READ_ONLY)  # what /proc/self resolves to
        if not any(p == spec.workdir for p, _ in ruleset.rules):
            raise OSError(f"work directory {spec.workdir!r} cannot be opened; refusing a sandbox without it")
    except OSError as exc:
        ruleset.close()
        report.add("landlock", False, f"{type(exc).__name__}: {exc}")
        return None
    return ruleset


def _restrict(spec: SandboxSpec, ruleset: landlock.Ruleset) -> str:
    ruleset.restrict()
    skipped = f"; missing, skipped: {[p for p, _ in ruleset.skipped]}" if ruleset.skipped else ""
    scoped = ", signals and abstract unix sockets scoped" if ruleset.scoped else ""
    return f"ABI {ruleset.abi}: {len(ruleset.rules)} rules, read-write only under {[spec.workdir, *spec.writable]}{scoped}{skipped}"


def _report_tcp_fallback(report: AppliedReport, ruleset: landlock.Ruleset | None) -> None:
    if ruleset is None or not report["landlock"].applied:
        report.add("network_fallback", False, "no Landlock domain, so nothing denies TCP either")
    elif ruleset.handled_net:
        report.add("network_fallback", True, "Landlock denies TCP bind/connect (UDP and unix sockets stay open)")
    else:
        report.add("network_fallback", False, f"Landlock ABI {ruleset.abi} < 4 cannot deny TCP: the network stays reachable")


# Measures whose failure is a known, reported gap rather than a broken sandbox.
_TOLERATED = {"rlimit_nproc", "network_fallback"}


def sandbox_problem(report: dict[str, Any]) -> str | None:
    """The reason to refuse running a plugin after this sandbox report, or None.

    Judged twice: by the child itself, which then does not run the step, and by the supervisor.
    """
    failed = [f"{name}: {detail}" for name, detail in _unapplied(report) if name not in _TOLERATED]
    return "; ".join(failed) or None


def sandbox_gaps(report: dict[str, Any], *, pids_capped: bool) -> str:
    """The tolerated measures that did not apply, worth a line in the run log ('' if none matters)."""
    gaps = [
        f"{name} not applied ({detail})"
        for name, detail in _unapplied(report)
        if name in _TOLERATED and not (name == "rlimit_nproc" and pids_capped)  # the cgroup's pids.max holds it instead
    ]
    return "; ".join(gaps)


def _unapplied(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, detail) of each measure a sandbox report says did not apply."""
    return [(name, m.get("detail", "")) for name, m in report.items() if isinstance(m, dict) and not m.get("applied")]
