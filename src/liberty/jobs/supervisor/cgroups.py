"""Per-attempt cgroups: a memory and process ceiling, and a kill that takes everyone.

Two layouts exist in the wild and both are detected at run time, by creating
and removing a probe cgroup rather than by reading version strings:

- "v1-hybrid": v1 `memory` and `pids` (and `freezer`) hierarchies, plus the
  controller-less v2 `unified` tree, which still offers `cgroup.kill`,
  `cgroup.freeze` and `cpu.stat`.
- "v2": one cgroup2 tree with the memory and pids controllers delegated.

Every supervisor works below `<own cgroup>/nomaflow/sup-<pid>-<starttime>/`,
one `att-<name>` per attempt, in each hierarchy.  The start time in the name
makes "is that supervisor still alive?" immune to pid reuse, so a later
supervisor can clean up after one killed with -9.

All methods block briefly (file writes, short polls); call them from a
worker thread under trio.  Moving a pid into a cgroup does not move children
it already forked, so `add()` must happen before the child runs plugin code.
"""

from __future__ import annotations

import errno
import itertools
import os
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import attrs

from .._sysfiles import read_small, write_small
from ..errors import NomaflowError
from .processes import supervisor_alive, supervisor_tag

PREFIX = "nomaflow"
_POLL_S = 0.005
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_probe_counter = itertools.count()


class CgroupError(NomaflowError):
    """A cgroup operation the host claimed to support failed."""


@attrs.frozen
class Hierarchy:
    """One mounted hierarchy and this process's own cgroup directory in it."""

    role: str  # "memory" | "pids" | "freezer" | "unified" (hybrid) | "v2"
    mount: str
    own: str

    @property
    def base(self) -> Path:
        return Path(self.own) / PREFIX


@attrs.frozen
class CgroupSupport:
    """What containment this host gives us, and for every missing piece, why."""

    mode: str  # "v1-hybrid" | "v2" | "none"
    hierarchies: tuple[Hierarchy, ...] = ()
    memory: bool = False
    pids: bool = False
    kill: bool = False
    freeze: bool = False
    cpu: bool = False
    missing: dict[str, str] = attrs.field(factory=dict)

    def hierarchy(self, role: str) -> Hierarchy | None:
        return next((h for h in self.hierarchies if h.role == role), None)

    def summary(self) -> str:
        have = [p for p in ("memory", "pids", "kill", "freeze", "cpu") if getattr(self, p)]
        lacks = "; ".join(f"no {k}: {v}" for k, v in self.missing.items())
        return f"{self.mode}: {', '.join(have) or 'nothing'}" + (f" ({lacks})" if lacks else "")


# ---------------------------------------------------------------- detection


def _own_cgroups() -> tuple[dict[str, str], str | None]:
    """(v1 controller -> path, v2 path) from /proc/self/cgroup."""
    v1: dict[str, str] = {}
    v2 = None
    with open("/proc/self/cgroup") as f:
        for line in f:
            hid, controllers, path = line.rstrip("\n").split(":", 2)
            if hid == "0" and controllers == "":
                v2 = path
            for c in controllers.split(","):
                if c:
                    v1[c] = path
    return v1, v2


def _cgroup_mounts() -> tuple[dict[str, tuple[str, str]], tuple[str, str] | None]:
    """(v1 controller -> (mount point, mount root), v2 (mount point, mount root)) from mountinfo."""
    v1: dict[str, tuple[str, str]] = {}
    v2 = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) < 5 or len(rfields) < 3:
                continue
            root, point = _unescape(fields[3]), _unescape(fields[4])
            fstype, options = rfields[0], rfields[2].split(",")
            if fstype == "cgroup2" and v2 is None:
                v2 = (point, root)
            elif fstype == "cgroup":
                for opt in options:
                    v1.setdefault(opt, (point, root))
    return v1, v2


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _own_dir(mount: tuple[str, str], path: str) -> str:
    point, root = mount
    if root != "/" and (path == root or path.startswith(root + "/")):
        path = path[len(root) :]
    return os.path.normpath(point + "/" + path.lstrip("/"))


def _why(exc: OSError, what: str) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{what}: permission denied (uid {os.getuid()}; needs root or a delegated cgroup)"
    if exc.errno == errno.EROFS:
        return f"{what}: the cgroup file system is mounted read-only (a container?)"
    if exc.errno == errno.EBUSY:
        return f"{what}: busy (the no-internal-processes rule: the parent cgroup holds processes)"
    return f"{what}: {exc.strerror or exc}"


def _probe_dir(base: str, missing: dict[str, str], piece: str) -> Path | None:
    path = Path(base) / f"{PREFIX}-probe-{os.getpid()}-{next(_probe_counter)}"
    try:
        path.mkdir()
    except OSError as exc:
        missing[piece] = _why(exc, f"cannot create a cgroup in {base}")
        return None
    return path


def _write(path: Path, value: str) -> None:
    write_small(path, value.encode())


def _read(path: Path) -> str:
    return read_small(path).decode()


def _probe_v1(role: str, hierarchy: Hierarchy, missing: dict[str, str]) -> bool:
    piece = "freeze" if role == "freezer" else role
    test = _probe_dir(hierarchy.own, missing, piece)
    if test is None:
        return False
    try:
        if role == "memory":
            _write(test / "memory.limit_in_bytes", str(256 << 20))
            if "oom_kill " not in _read(test / "memory.oom_control"):
                missing["memory"] = "memory.oom_control has no oom_kill counter (kernel < 4.13): OOM kills undetectable"
                return False
        elif role == "pids":
            _write(test / "pids.max", "100")
        elif role == "freezer" and not (test / "freezer.state").exists():
            missing["freeze"] = "the v1 freezer cgroup has no freezer.state"
            return False
        return True
    except OSError as exc:
        missing[piece] = _why(exc, f"cannot configure a {role} cgroup")
        return False
    finally:
        _rmdir_quiet(test)


def _probe_unified(hierarchy: Hierarchy, missing: dict[str, str], *, pieces: dict[str, bool]) -> bool:
    test = _probe_dir(hierarchy.own, missing, "kill")
    if test is None:
        return False
    try:
        pieces["kill"] = (test / "cgroup.kill").exists()
        pieces["v2_freeze"] = (test / "cgroup.freeze").exists()
        pieces["freeze"] = pieces["freeze"] or pieces["v2_freeze"]
        pieces["cpu"] = (test / "cpu.stat").exists()
        if not pieces["kill"]:
            missing["kill"] = "no cgroup.kill (kernel < 5.14): kills freeze and signal instead"
        if hierarchy.role == "v2":
            for controller, filename, value in (("memory", "memory.max", str(256 << 20)), ("pids", "pids.max", "100")):
                try:
                    _write(test / filename, value)
                    pieces[controller] = True
                except FileNotFoundError:
                    missing.setdefault(controller, f"{filename} absent: the {controller} controller is not enabled for {hierarchy.own}")
                except OSError as exc:
                    missing[controller] = _why(exc, f"cannot write {filename}")
        return True
    finally:
        _rmdir_quiet(test)


LEAF = f"{PREFIX}-supervisor"


def _enable_v2_controllers(own: str, missing: dict[str, str]) -> None:
    """Memory and pids files appear in children only if enabled in the parent's subtree_control.

    v2 refuses that while the cgroup itself holds processes (EBUSY).  When
    the only one is this supervisor, it steps down into a leaf of its own
    cgroup; anyone else there is reported, never moved.
    """
    try:
        available = _read(Path(own) / "cgroup.controllers").split()
        enabled = _read(Path(own) / "cgroup.subtree_control").split()
    except OSError as exc:
        missing.setdefault("memory", _why(exc, f"cannot read {own}/cgroup.controllers"))
        return
    for controller in ("memory", "pids"):
        if controller not in available:
            missing[controller] = f"the {controller} controller is not available in {own} (cgroup.controllers: {available})"
        elif controller not in enabled:
            try:
                _write(Path(own) / "cgroup.subtree_control", f"+{controller}")
            except OSError as exc:
                if exc.errno == errno.EBUSY and _step_into_leaf(own, missing, controller):
                    _write(Path(own) / "cgroup.subtree_control", f"+{controller}")
                else:
                    missing.setdefault(controller, _why(exc, f"cannot enable {controller} in {own}/cgroup.subtree_control"))


def _step_into_leaf(own: str, missing: dict[str, str], controller: str) -> bool:
    others = [p for p in _read_procs(Path(own)) if p != os.getpid()]
    if others:
        missing[controller] = (
            f"cannot enable {controller} in {own}: it also holds processes {others[:5]} (no-internal-processes rule); "
            "start the supervisor alone in a delegated cgroup (e.g. systemd-run --scope -p Delegate=yes)"
        )
        return False
    leaf = Path(own) / LEAF
    leaf.mkdir(exist_ok=True)
    _write(leaf / "cgroup.procs", str(os.getpid()))
    return True


def detect() -> CgroupSupport:
    """Find the usable layout by creating and removing a probe cgroup in every hierarchy."""
    try:
        own_v1, own_v2 = _own_cgroups()
        mounts_v1, mount_v2 = _cgroup_mounts()
    except OSError as exc:
        return CgroupSupport("none", missing={"cgroups": f"cannot read /proc/self/cgroup or mountinfo: {exc}"})
    missing: dict[str, str] = {}
    pieces = {"memory": False, "pids": False, "kill": False, "freeze": False, "cpu": False}
    usable: list[Hierarchy] = []
    hybrid = "memory" in mounts_v1 or "pids" in mounts_v1
    if hybrid:
        for role in ("memory", "pids", "freezer"):
            if role not in mounts_v1 or role not in own_v1:
                if role != "freezer":
                    missing[role] = f"the v1 {role} controller is not mounted"
                continue
            h = Hierarchy(role, mounts_v1[role][0], _own_dir(mounts_v1[role], own_v1[role]))
            if _probe_v1(role, h, missing):
                usable.append(h)
                pieces["freeze" if role == "freezer" else role] = True
    if mount_v2 is not None and own_v2 is not None:
        own = _own_dir(mount_v2, own_v2)
        if os.path.basename(own) == LEAF:  # we stepped into our leaf earlier: attempts still go beside it
            own = os.path.dirname(own)
        h = Hierarchy("unified" if hybrid else "v2", mount_v2[0], own)
        if h.role == "v2":
            _enable_v2_controllers(h.own, missing)
        if _probe_unified(h, missing, pieces=pieces):
            usable.append(h)
            if pieces.pop("v2_freeze", False):  # cgroup.freeze does the v1 freezer's job: one hierarchy fewer per attempt
                usable = [u for u in usable if u.role != "freezer"]
    elif not hybrid:
        missing["cgroups"] = "no cgroup file system is mounted"
    else:
        missing.setdefault("kill", "no cgroup2 (unified) tree mounted: no cgroup.kill")
    pieces.pop("v2_freeze", None)
    for piece, ok in pieces.items():
        if ok:
            missing.pop(piece, None)
    mode = "none" if not usable else ("v1-hybrid" if hybrid else "v2")
    return CgroupSupport(mode, tuple(usable), missing=missing, **pieces)


# ---------------------------------------------------------------- one attempt


def _rmdir_quiet(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _read_procs(directory: Path) -> list[int]:
    try:
        return [int(x) for x in _read(directory / "cgroup.procs").split()]
    except FileNotFoundError:
        return []


def _unpopulated(v2_directory: Path) -> bool:
    """True when no process is in this cgroup or beneath it (v2's `cgroup.events`)."""
    try:
        return _keyed(v2_directory / "cgroup.events", "populated") == 0
    except OSError:
        return False


def _keyed(path: Path, key: str) -> int | None:
    try:
        for line in _read(path).splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (FileNotFoundError, ValueError):
        return None
    return None


def _int_file(path: Path) -> int | None:
    try:
        text = _read(path).strip()
    except FileNotFoundError:
        return None
    return None if text == "max" else int(text)


class AttemptCgroup:
    """One attempt's cgroup, one directory per hierarchy.  Blocking calls; `remove()` may race itself safely."""

    def __init__(self, name: str, dirs: dict[str, Path], *, memory_limit_bytes: int | None = None, pids_limit: int | None = None) -> None:
        self.name = name
        self.dirs = dirs
        self.memory_limit_bytes = memory_limit_bytes
        self.pids_limit = pids_limit
        # Planned (`CgroupManager.plan`), not made: the attempt makes `dirs`, writes these
        # limit files (path -> value) and joins, before any plugin code.
        self.planned = False
        self.limit_files: dict[str, str] = {}
        self.removed = False
        self.leftover: list[str] = []
        self._remove_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AttemptCgroup({self.name!r}, {sorted(self.dirs)})"

    @property
    def _kill_dir(self) -> Path | None:
        return self.dirs.get("unified") or self.dirs.get("v2")

    @property
    def _memory_dir(self) -> Path | None:
        return self.dirs.get("memory") or self.dirs.get("v2")

    @property
    def _pids_dir(self) -> Path | None:
        return self.dirs.get("pids") or self.dirs.get("v2")

    def add(self, pid: int) -> None:
        """Move `pid` (its whole thread group, not its existing children) into every hierarchy."""
        for directory in self.dirs.values():
            try:
                _write(directory / "cgroup.procs", str(pid))
            except ProcessLookupError:
                raise
            except OSError as exc:
                raise CgroupError(f"cannot move process {pid} into {directory}: {exc}") from exc

    def procs(self) -> list[int]:
        """Every live process in the attempt, across hierarchies."""
        found: set[int] = set()
        for directory in self.dirs.values():
            found.update(_read_procs(directory))
        return sorted(found)

    def kill(self) -> bool:
        """SIGKILL the whole population, forks racing the kill included; True if none is left."""
        kill_dir = self._kill_dir
        if kill_dir is not None and _unpopulated(kill_dir):
            # Nobody left to fork into it.  Unlike cgroup.kill, this read does not wait
            # for the kernel's cgroup mutex, which every mkdir and rmdir of a cgroup holds.
            return True
        if kill_dir is not None and (kill_dir / "cgroup.kill").exists():
            try:
                _write(kill_dir / "cgroup.kill", "1")
                return True
            except FileNotFoundError:
                return True
            except OSError:
                pass  # fall back to freezing and signalling
        with _Freeze(self.dirs):
            self._signal_until_empty(deadline=time.monotonic() + 2.0)
        return not self.procs()

    def _signal_until_empty(self, *, deadline: float) -> None:
        while True:
            pids = self.procs()
            if not pids or time.monotonic() > deadline:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(_POLL_S)

    def wait_empty(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.procs():
            if time.monotonic() > deadline:
                return False
            time.sleep(_POLL_S)
        return True

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer took in this cgroup."""
        directory = self._memory_dir
        if directory is None:
            return 0
        name = "memory.events" if "v2" in self.dirs else "memory.oom_control"
        return _keyed(directory / name, "oom_kill") or 0

    def oom_killed(self) -> bool:
        return self.oom_kills() > 0

    def peak_memory_bytes(self) -> int | None:
        directory = self._memory_dir
        if directory is None:
            return None
        return _int_file(directory / ("memory.peak" if "v2" in self.dirs else "memory.max_usage_in_bytes"))

    def pids_peak(self) -> int | None:
        """Highest task count (threads included), where the kernel keeps one (pids.peak, Linux >= 6.1)."""
        directory = self._pids_dir
        return None if directory is None else _int_file(directory / "pids.peak")

    def pids_limit_hits(self) -> int | None:
        """How many forks pids.max refused."""
        directory = self._pids_dir
        return None if directory is None else _keyed(directory / "pids.events", "max")

    def cpu_seconds(self) -> float | None:
        """CPU time of every process that ever ran in the attempt, descendants included."""
        directory = self._kill_dir
        if directory is None:
            return None
        usec = _keyed(directory / "cpu.stat", "usage_usec")
        return None if usec is None else usec / 1e6

    def usage(self) -> dict[str, float | int | bool | None]:
        """A snapshot to record before `remove()`."""
        return {
            "peak_memory_bytes": self.peak_memory_bytes(),
            "oom_kills": self.oom_kills(),
            "pids_peak": self.pids_peak(),
            "pids_limit_hits": self.pids_limit_hits(),
            "cpu_seconds": self.cpu_seconds(),
        }

    def remove_now(self) -> bool:
        """Delete every directory at once if no process is left in the cgroup: no kill, no wait, no
        retry, so it may run on the event loop.  False if any directory is left (`remove` finishes).

        The kernel refuses to remove a cgroup that holds a process, so a directory
        removed here was empty; the one that tells "populated" goes last.
        """
        if self.removed:
            return not self.leftover
        kill_dir = self._kill_dir
        if kill_dir is not None and kill_dir.exists() and not _unpopulated(kill_dir):  # planned, never made: nothing in it
            return False
        if not self._remove_lock.acquire(blocking=False):
            return False  # `remove` is at work on a thread
        try:
            if not self.removed:
                for directory in sorted(self.dirs.values(), key=lambda d: d == kill_dir):
                    if not _rmdir_quiet(directory):
                        return False
                self.leftover = []
                self.removed = True
        finally:
            self._remove_lock.release()
        return not self.leftover

    def remove(self, timeout: float = 5.0) -> bool:
        """Kill, wait for the cgroup to empty, delete every directory; idempotent.  False if any is left."""
        with self._remove_lock:
            if not self.removed:
                self._remove(timeout)
        return not self.leftover

    def _remove(self, timeout: float) -> None:
        kill_dir = self._kill_dir
        # Every process of the attempt is in its v2 cgroup too: unpopulated there, it is empty everywhere.
        if kill_dir is None or not _unpopulated(kill_dir):
            self.kill()
            if not self.wait_empty(timeout / 2):
                with _Freeze(self.dirs):
                    self._signal_until_empty(deadline=time.monotonic() + timeout / 2)
        deadline = time.monotonic() + timeout / 2
        left = list(self.dirs.values())
        while left:
            left = [d for d in left if not _rmdir_quiet(d)]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(_POLL_S)
        self.leftover = [str(d) for d in left]
        self.removed = True


class _Freeze:
    """Freeze the cgroup for the duration (v2 cgroup.freeze or v1 freezer), if either exists."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self._v2 = next((d for r, d in dirs.items() if r in ("unified", "v2") and (d / "cgroup.freeze").exists()), None)
        self._v1 = dirs.get("freezer")

    def __enter__(self) -> _Freeze:
        try:
            if self._v2 is not None:
                _write(self._v2 / "cgroup.freeze", "1")
                self._wait(lambda: _keyed(self._v2 / "cgroup.events", "frozen") == 1)  # type: ignore[operator]
            elif self._v1 is not None:
                _write(self._v1 / "freezer.state", "FROZEN")
                self._wait(lambda: _read(self._v1 / "freezer.state").strip() == "FROZEN")  # type: ignore[operator]
        except OSError:
            pass
        return self

    @staticmethod
    def _wait(done: object, timeout: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:  # type: ignore[operator]
            time.sleep(_POLL_S)

    def __exit__(self, *exc: object) -> None:
        try:
            if self._v2 is not None:
                _write(self._v2 / "cgroup.freeze", "0")
            elif self._v1 is not None:
                _write(self._v1 / "freezer.state", "THAWED")
        except OSError:
            pass


# ---------------------------------------------------------------- one supervisor


@attrs.frozen
class StaleCleanup:
    tag: str
    processes_killed: int
    removed: bool
    leftover: list[str]


def _check_name(name: str) -> None:
    if not name or not set(name) <= _NAME_CHARS:
        raise ValueError(f"attempt cgroup name {name!r} must be non-empty and use only letters, digits, '_', '.', '-'")


class CgroupManager:
    """All cgroups of one supervisor: creates attempt cgroups, cleans up after dead supervisors."""

    def __init__(self, support: CgroupSupport | None = None) -> None:
        self.support = detect() if support is None else support
        self.tag = supervisor_tag()
        self._lock = threading.Lock()
        self._attempts: dict[str, AttemptCgroup] = {}
        self._parents = {h.role: h.base / self.tag for h in self.support.hierarchies}
        self._made: set[Path] = set()  # parents known to exist: no mkdir (and FileExistsError) per attempt
        self._files: dict[Path, bool] = {}  # which optional control files a parent has

    @property
    def enabled(self) -> bool:
        return self.support.mode != "none"

    def root(self, role: str) -> Path | None:
        h = self.support.hierarchy(role)
        return None if h is None else h.base / self.tag

    def create(
        self, name: str, *, memory_mb: int | None = None, max_processes: int | None = None, account_memory: bool = True
    ) -> AttemptCgroup | None:
        """A fresh cgroup for one attempt with its limits set, or None when the host has no cgroups.

        A limit the host cannot enforce is left unset (`memory_limit_bytes` /
        `pids_limit` stay None) so the caller knows to use its fallback.
        """
        if not self.enabled:
            return None
        _check_name(name)
        dirs: dict[str, Path] = {}
        try:
            for h in self.support.hierarchies:  # every parent, so that later attempts can be planned
                parent = self._parents[h.role]
                if parent not in self._made:
                    self._make_parents(h, parent)
                    self._made.add(parent)
            for h in self._hierarchies(memory_mb, max_processes, account_memory):
                parent = self._parents[h.role]
                directory = parent / f"att-{name}"
                try:
                    directory.mkdir()
                except FileNotFoundError:  # our parent was removed under us: make it again, once
                    self._make_parents(h, parent)
                    directory.mkdir()
                dirs[h.role] = directory
            group = AttemptCgroup(name, dirs)
            for path, value in self._limits(group, memory_mb, max_processes).items():
                _write(Path(path), value)
        except FileExistsError as exc:
            for d in dirs.values():
                if d != Path(exc.filename):
                    _rmdir_quiet(d)
            raise CgroupError(f"attempt cgroup {name!r} already exists ({exc.filename}); attempt names must be unique") from exc
        except OSError as exc:
            for d in dirs.values():
                _rmdir_quiet(d)
            raise CgroupError(f"cannot create the cgroup of attempt {name!r}: {exc}") from exc
        with self._lock:
            self._attempts[name] = group
        return group

    def plan(
        self, name: str, *, memory_mb: int | None = None, max_processes: int | None = None, account_memory: bool = True
    ) -> AttemptCgroup | None:
        """`create`, but made by the attempt itself (`AttemptCgroup.planned`): no system call here.

        An mkdir waits for the kernel's global cgroup mutex, so `create` runs on a
        worker thread, whose hop (and its contention for the GIL) costs the
        supervisor more than the mkdirs; the attempt's own process, before any
        plugin code, makes them for nothing.  None when this supervisor's parent
        directories are not known to exist yet: `create` them first.
        """
        if not self.enabled:
            return None
        _check_name(name)
        if not self.ready:
            return None
        hierarchies = self._hierarchies(memory_mb, max_processes, account_memory)
        group = AttemptCgroup(name, {h.role: self._parents[h.role] / f"att-{name}" for h in hierarchies})
        group.planned = True
        group.limit_files = self._limits(group, memory_mb, max_processes)
        with self._lock:
            self._attempts[name] = group
        return group

    @property
    def ready(self) -> bool:
        """Attempt cgroups can be planned: every parent directory was made (by a `create`)."""
        return all(parent in self._made for parent in self._parents.values())

    def _hierarchies(self, memory_mb: int | None, max_processes: int | None, account_memory: bool) -> tuple[Hierarchy, ...]:
        """An attempt's hierarchies.  On a hybrid host: the v2 one (the kill, the CPU time); a v1
        memory cgroup to enforce a memory limit, or to count the peak (`account_memory`) where
        the supervisor has none of its own; a v1 pids cgroup to enforce a process limit.

        Made for every attempt, the v1 memory cgroup cost each run 5% of a trivial step's CPU
        (measured: every page the step touched was charged to a fresh memcg), where the
        supervisor has the peak anyway from the kernel's own accounting
        (`ChildHandle.max_rss_bytes`: descendants the step waited for included; the sampled
        sizes of the others), and the v1 pids cgroup 3% more, for a count of tasks that the
        sampled count of processes stands in for.
        """
        skip = set()
        if memory_mb is None and not account_memory:
            skip.add("memory")
        if max_processes is None:
            skip.add("pids")
        return tuple(h for h in self.support.hierarchies if h.role not in skip)

    def parents_lost(self) -> None:
        """An attempt could not make its planned cgroup: the next `create` makes the parents again."""
        self._made.clear()

    def _make_parents(self, h: Hierarchy, parent: Path) -> None:
        controllers = " ".join(f"+{c}" for c in ("memory", "pids") if getattr(self.support, c))
        for directory in (h.base, parent):
            try:
                directory.mkdir()
            except FileExistsError:
                continue
            if h.role == "v2" and controllers:
                _write(directory / "cgroup.subtree_control", controllers)

    def _limits(self, group: AttemptCgroup, memory_mb: int | None, max_processes: int | None) -> dict[str, str]:
        """The limit files to write in the group's directories, in order; notes the limits on `group`.

        Which optional files exist is read from the parent directory (the same
        controllers), once: `plan` makes no system call.
        """
        files: dict[str, str] = {}
        if memory_mb is not None and self.support.memory:
            limit = memory_mb * 1024 * 1024
            if "v2" in group.dirs:
                d = group.dirs["v2"]
                files[str(d / "memory.max")] = str(limit)
                for optional, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                    if self._has(d.parent / optional):
                        files[str(d / optional)] = value
            else:
                d = group.dirs["memory"]
                files[str(d / "memory.limit_in_bytes")] = str(limit)
                if self._has(d.parent / "memory.memsw.limit_in_bytes"):
                    files[str(d / "memory.memsw.limit_in_bytes")] = str(limit)
            group.memory_limit_bytes = limit
        if max_processes is not None and self.support.pids:
            files[str((group.dirs.get("pids") or group.dirs["v2"]) / "pids.max")] = str(max_processes)
            group.pids_limit = max_processes
        return files

    def _has(self, path: Path) -> bool:
        known = self._files.get(path)
        if known is None:
            known = self._files[path] = path.exists()
        return known

    def release(self, group: AttemptCgroup, timeout: float = 5.0) -> bool:
        """`group.remove()` and forget it."""
        ok = group.remove(timeout)
        self._forget(group)
        return ok

    def release_now(self, group: AttemptCgroup) -> bool:
        """`group.remove_now()`, forgetting it if it is gone; False leaves it for `release`."""
        if not group.remove_now():
            return False
        self._forget(group)
        return True

    def _forget(self, group: AttemptCgroup) -> None:
        with self._lock:
            self._attempts.pop(group.name, None)

    def close(self, timeout: float = 5.0) -> bool:
        """Remove every attempt cgroup still held, then this supervisor's own directories."""
        with self._lock:
            groups = list(self._attempts.values())
            self._attempts.clear()
        ok = all([g.remove(timeout) for g in groups])
        self._made.clear()
        for h in self.support.hierarchies:
            ok = _rmdir_quiet(h.base / self.tag) and ok
        return ok

    def cleanup_stale(self, timeout: float = 5.0) -> list[StaleCleanup]:
        """Kill and remove what supervisors that died without cleaning up (kill -9) left behind."""
        by_tag: dict[str, dict[str, dict[str, Path]]] = {}
        sup_dirs: dict[str, list[Path]] = {}
        for h in self.support.hierarchies:
            for base in _find_bases(h):
                for sup in _subdirs(base, "sup-"):
                    if sup.name == self.tag or supervisor_alive(sup.name):
                        continue
                    sup_dirs.setdefault(sup.name, []).append(sup)
                    for att in _subdirs(sup, "att-"):
                        by_tag.setdefault(sup.name, {}).setdefault(att.name, {})[h.role] = att
        results = []
        for tag, dirs in sup_dirs.items():
            killed, leftover = 0, []
            for att_name, att_dirs in by_tag.get(tag, {}).items():
                group = AttemptCgroup(att_name, att_dirs)
                killed += len(group.procs())
                if not group.remove(timeout):
                    leftover.extend(group.leftover)
            leftover.extend(str(d) for d in dirs if not _rmdir_quiet(d))
            results.append(StaleCleanup(tag, killed, not leftover, leftover))
        return results


def _subdirs(path: Path, prefix: str) -> Iterable[Path]:
    try:
        return [p for p in path.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except OSError:
        return []


def _find_bases(h: Hierarchy, max_depth: int = 4) -> list[Path]:
    """Our own base plus any `nomaflow` directory elsewhere in the hierarchy: a dead supervisor may have lived in another cgroup."""
    found = {h.base} if h.base.is_dir() else set()
    stack = [(Path(h.mount), 0)]
    while stack:
        path, depth = stack.pop()
        try:
            children = [p for p in path.iterdir() if p.is_dir()]
        except OSError:
            continue
        for child in children:
            if child.name == PREFIX:
                found.add(child)
            elif depth < max_depth and not child.name.startswith(PREFIX):
                stack.append((child, depth + 1))
    return sorted(found)
