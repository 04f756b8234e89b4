"""Hostile plugins against the real supervisor (issue 4, item 6).

Every plugin here tries to hurt: exhaust a resource, escape the attempt, crash
in an unusual way, or reach something it must not.  Each test checks what the
history records (status, reason, `limit_hit`) and, through `hostile_supervisor`,
that the same Supervisor still runs a normal step afterwards.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from liberty.jobs import Job, Limits, Step, Supervisor
from liberty.jobs.history import AttemptRecord, LogLine, RunView
from liberty.jobs.supervisor.containment import FD_RESERVE, THREAD_RESERVE
from supervisor_helpers import gone, messages, plugins_dir

pytestmark = pytest.mark.trio

MiB = 1024 * 1024


# --- helpers --------------------------------------------------------------------


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    return plugins_dir(tmp_path, healthy="async def fine(ctx, **_):\n    return {'fine': True}\n")


def plugin(plugins: Path, source: str, name: str = "hostile") -> str:
    (plugins / f"{name}.py").write_text(textwrap.dedent(source))
    return name


def step(python: str, **kwargs: Any) -> Step:
    kwargs.setdefault("timeout_seconds", 30)
    kwargs.setdefault("cancel_grace_seconds", 2)
    return Step(name="hostile", python=python, **kwargs)


def job(the_step: Step) -> Job:
    return Job(name="hostile-job", steps=[the_step])


@asynccontextmanager
async def hostile_supervisor(plugins: Path, **kwargs: Any) -> AsyncIterator[Supervisor]:
    """A Supervisor that must still run a normal step once the hostile one is done.

    Tests assert after the `async with` block, not inside it, so that a failed
    check never races the supervisor's own shutdown of the runs.
    """
    kwargs.setdefault("history", ":memory:")
    async with Supervisor(plugins=plugins, **kwargs) as sup:
        yield sup
        after = await sup.run(job(step("healthy:fine")))
    assert (after.status, after.steps[0].output) == ("SUCCEEDED", {"fine": True}), after.steps[0].error


async def run_hostile(plugins: Path, python: str, **step_kwargs: Any) -> tuple[RunView, AttemptRecord, list[LogLine]]:
    start_mode = step_kwargs.pop("start_mode", "zygote")
    async with hostile_supervisor(plugins, start_mode=start_mode) as sup:
        run = await sup.run(job(step(python, **step_kwargs)))
        return run, run.steps[0].attempt_records[-1], sup.store.logs(run.run_id, limit=10**7)


def failure(run: RunView) -> tuple[str, str, str]:
    """(status, reason, error type) of the run's only step."""
    s = run.steps[0]
    assert s.error is not None, f"expected a failure, got {s.status} with output {s.output!r:.200}"
    return s.status, s.error["reason"], s.error["type"]


def our_zombies() -> set[int]:
    """Children of this process (the supervisor, a child subreaper) left unreaped."""
    zombies = set()
    for task in os.listdir("/proc/self/task"):
        try:
            children = Path(f"/proc/self/task/{task}/children").read_text().split()
        except OSError:
            continue
        for pid in map(int, children):
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    zombies.add(pid)
            except psutil.NoSuchProcess:
                continue
    return zombies


def new_zombies(before: set[int]) -> set[int]:
    """Zombies that appeared since `before`; reaped here so they do not pollute later tests."""
    new = our_zombies() - before
    for pid in new:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    return new


def attempt_cgroups(sup: Supervisor) -> list[Path] | None:
    """Attempt cgroup directories still present under this supervisor's tag, but for its waiting
    warm spares; None without cgroups.

    The target machines have cgroups (DESIGN.md), so None fails the `== []` checks.
    """
    manager = sup.containment.cgroups
    if manager is None or not manager.enabled:
        return None
    spares = {str(pid) for pid in sup._spares.pids()} if sup._spares is not None else set()
    making = sup._spares is not None and bool(sup._spares._making)
    found = []
    for h in manager.support.hierarchies:
        root = manager.root(h.role)
        if root is not None and root.is_dir():
            for p in root.iterdir():
                if p.is_dir() and p.name.startswith("att-"):
                    procs = set((p / "cgroup.procs").read_text().split())
                    pending = making and not procs and p.name.startswith("att-spare-")  # created, pid not in yet
                    if not (procs and procs <= spares) and not pending:
                        found.append(p)
    return found


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def current_rss() -> int:
    return psutil.Process().memory_info().rss


# --- bombs -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["in_process", "in_a_grandchild"])
async def test_memory_bomb_fails_with_reason_memory(plugins: Path, where: str) -> None:
    mod = plugin(
        plugins,
        """
        import subprocess, sys

        BOMB = "hog = []\\nwhile True:\\n    hog.append(bytearray(8 * 1024 * 1024))\\n"

        async def in_process(ctx, **_):
            exec(BOMB)

        def in_a_grandchild(ctx, **_):
            subprocess.run([sys.executable, "-c", BOMB], check=True)
        """,
    )
    run, attempt, _ = await run_hostile(plugins, f"{mod}:{where}", limits=Limits(memory_mb=64))
    assert failure(run) == ("FAILED", "memory", "MemoryLimitExceeded")
    assert "memory_mb=64" in run.steps[0].error["message"]
    assert attempt.usage["limit_hit"] == "memory" and attempt.usage["cgroup"] is True


@pytest.mark.parametrize("how", ["fork", "subprocess"])
async def test_fork_bomb_never_exceeds_max_processes_and_leaves_nothing(plugins: Path, how: str) -> None:
    mod = plugin(
        plugins,
        """
        import os, subprocess, time

        async def bomb(ctx, *, how, **_):
            started, refused = [], 0
            for _ in range(200):
                try:
                    if how == "fork":
                        pid = os.fork()
                        if pid == 0:
                            time.sleep(60)
                            os._exit(0)
                    else:
                        pid = subprocess.Popen(["sleep", "60"]).pid
                except OSError:
                    refused += 1
                else:
                    started.append(pid)
            return {"started": started, "refused": refused}
        """,
    )
    ceiling = 16 + THREAD_RESERVE  # pids.max counts the child's own threads too; the reserve covers them
    zombies_before = our_zombies()
    async with hostile_supervisor(plugins) as sup:
        run = await sup.run(job(step(f"{mod}:bomb", limits=Limits(max_processes=16), op_kwargs={"how": how})))
        started = (run.steps[0].output or {}).get("started", [])
        alive, zombies, cgroups = [pid for pid in started if not gone(pid)], new_zombies(zombies_before), attempt_cgroups(sup)
    attempt = run.steps[0].attempt_records[-1]
    assert run.status == "SUCCEEDED", run.steps[0].error
    assert run.steps[0].output["refused"] > 0 and 0 < len(started) < ceiling
    assert attempt.usage["limit_hit"] == "processes"
    assert attempt.usage["max_processes"] <= ceiling
    assert (alive, zombies, cgroups) == ([], set(), [])


async def test_cpu_burner_in_a_thread_fails_with_reason_cpu(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        import asyncio, threading

        def spin():
            while True:
                pass

        async def burn(ctx, **_):
            threading.Thread(target=spin, daemon=True).start()
            await asyncio.sleep(60)
        """,
    )
    t0 = time.monotonic()
    run, attempt, _ = await run_hostile(plugins, f"{mod}:burn", timeout_seconds=60, limits=Limits(cpu_seconds=1))
    assert time.monotonic() - t0 < 20
    assert failure(run) == ("FAILED", "cpu", "CpuLimitExceeded")
    assert attempt.usage["limit_hit"] == "cpu"
    assert attempt.cpu_s > 0.5  # killed at 1 s by the kernel; the recorded figure reads 0.7-1.0 on a loaded VM


# --- floods ------------------------------------------------------------------------


PRINT_FLOOD = """
    import sys

    LINE = "x" * 1023

    async def lines(ctx, **_):
        for i in range(20 * 1024):  # 20 MiB in 1 KiB lines
            print(LINE)
        return {"printed": 20 * 1024}

    async def one_line(ctx, **_):
        chunk = "y" * (1024 * 1024)
        for _ in range(20):  # 20 MiB without a single newline
            sys.stdout.write(chunk)
        sys.stdout.flush()
        return {"printed": 20 * 1024 * 1024}
"""


async def test_twenty_mb_of_print_is_logged_completely_under_the_default_cap(plugins: Path, tmp_path: Path) -> None:
    mod = plugin(plugins, PRINT_FLOOD)
    async with hostile_supervisor(plugins, history=tmp_path / "history.db") as sup:
        before = current_rss()
        reset_peak_rss()
        run = await sup.run(job(step(f"{mod}:lines")))
        growth = peak_rss() - before
        logs = sup.store.logs(run.run_id, limit=10**6)
    assert run.status == "SUCCEEDED"
    stdout = messages(logs, "stdout")
    assert len(stdout) == 20 * 1024 and set(stdout) == {"x" * 1023}
    assert not any("log cap" in m for m in messages(logs, "system"))
    assert growth < 100 * MiB, f"the supervisor grew by {growth / MiB:.0f} MiB"


async def test_twenty_mb_of_print_is_truncated_at_max_log_mb_with_a_marker(plugins: Path, tmp_path: Path) -> None:
    mod = plugin(plugins, PRINT_FLOOD)
    async with hostile_supervisor(plugins, history=tmp_path / "history.db") as sup:
        before = current_rss()
        reset_peak_rss()
        run = await sup.run(job(step(f"{mod}:lines", limits=Limits(max_log_mb=1))))
        growth = peak_rss() - before
        logs = sup.store.logs(run.run_id, limit=10**6)
    assert run.status == "SUCCEEDED" and run.steps[0].output == {"printed": 20 * 1024}
    stdout = messages(logs, "stdout")
    assert 0 < len(stdout) <= 1024 and sum(len(m) + 1 for m in stdout) <= MiB
    system = messages(logs, "system")
    assert any("log cap of 1 MiB reached" in m for m in system)
    assert any(m.startswith(f"{20 * 1024 - len(stdout)} log lines dropped") for m in system)
    assert growth < 100 * MiB, f"the supervisor grew by {growth / MiB:.0f} MiB"


async def test_twenty_mb_on_one_line_is_cut_into_bounded_pieces(plugins: Path, tmp_path: Path) -> None:
    mod = plugin(plugins, PRINT_FLOOD)
    async with hostile_supervisor(plugins, history=tmp_path / "history.db") as sup:
        before = current_rss()
        reset_peak_rss()
        run = await sup.run(job(step(f"{mod}:one_line")))
        growth = peak_rss() - before
        logs = sup.store.logs(run.run_id, limit=10**6)
    assert run.status == "SUCCEEDED"
    stdout = messages(logs, "stdout")
    assert sum(len(m) for m in stdout) == 20 * MiB and max(len(m) for m in stdout) <= 64 * 1024
    assert growth < 100 * MiB, f"the supervisor grew by {growth / MiB:.0f} MiB"


async def test_flood_of_ctx_log_lines_is_truncated_and_the_supervisor_stays_small(plugins: Path, tmp_path: Path) -> None:
    mod = plugin(
        plugins,
        """
        async def chatter(ctx, **_):
            for i in range(200_000):
                ctx.log.info(f"line {i:07d} " + "z" * 80)
            return {"sent": 200_000}
        """,
    )
    async with hostile_supervisor(plugins, history=tmp_path / "history.db") as sup:
        before = current_rss()
        reset_peak_rss()
        t0 = time.monotonic()
        run = await sup.run(job(step(f"{mod}:chatter", limits=Limits(max_log_mb=1))))
        elapsed = time.monotonic() - t0
        growth = peak_rss() - before
        logs = sup.store.logs(run.run_id, limit=10**6)
    assert run.status == "SUCCEEDED" and run.steps[0].output == {"sent": 200_000}
    kept = messages(logs, "log")
    assert kept[0].startswith("line 0000000 ") and sum(len(m) + 1 for m in kept) <= MiB
    assert any("log cap of 1 MiB reached" in m for m in messages(logs, "system"))
    assert growth < 100 * MiB, f"the supervisor grew by {growth / MiB:.0f} MiB"
    assert elapsed < 30


async def test_concurrent_floods_of_wide_lines_keep_the_supervisor_small(plugins: Path, tmp_path: Path) -> None:
    """Four steps each print 64 MiB (the default max_log_mb) in 64 KiB lines at the same time."""
    mod = plugin(
        plugins,
        """
        import sys

        async def wide(ctx, **_):
            line = "w" * (64 * 1024 - 1) + "\\n"
            for _ in range(64 * 16):
                sys.stdout.write(line)
            sys.stdout.flush()
            return {"printed_mb": 64}
        """,
    )
    async with hostile_supervisor(plugins, history=tmp_path / "history.db") as sup:
        before = current_rss()
        reset_peak_rss()
        runs: list[RunView] = []

        async def one() -> None:
            runs.append(await sup.run(job(step(f"{mod}:wide"))))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(one)
        growth = peak_rss() - before
    assert [r.status for r in runs] == ["SUCCEEDED"] * 4
    assert growth < 100 * MiB, f"the supervisor grew by {growth / MiB:.0f} MiB while logging 256 MiB"


async def test_disk_filler_stops_at_max_file_mb_with_limit_hit_file_size(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        import os

        def fill(ctx, **_):
            block = b"\\0" * (1024 * 1024)
            with open("filler.bin", "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(block)
                except OSError:
                    ctx.log.info(f"size {os.path.getsize('filler.bin')}")
                    raise
        """,
    )
    run, attempt, logs = await run_hostile(plugins, f"{mod}:fill", limits=Limits(max_file_mb=5))
    assert failure(run) == ("FAILED", "exception", "OSError")
    assert "[Errno 27]" in run.steps[0].error["message"]
    assert attempt.usage["limit_hit"] == "file_size"
    assert f"size {5 * MiB}" in messages(logs, "log")


async def test_fd_exhaustion_stops_at_max_open_files_with_limit_hit_open_files(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        import os

        async def hoard(ctx, **_):
            held = []
            try:
                while True:
                    held.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                ctx.log.info(f"opened {len(held)}")
                raise
        """,
    )
    run, attempt, logs = await run_hostile(plugins, f"{mod}:hoard", limits=Limits(max_open_files=64))
    assert failure(run) == ("FAILED", "exception", "OSError")
    assert "[Errno 24]" in run.steps[0].error["message"]
    assert attempt.usage["limit_hit"] == "open_files"
    opened = int(next(m for m in messages(logs, "log") if m.startswith("opened ")).split()[1])
    assert 0 < opened <= 64 + FD_RESERVE


# --- escapes -----------------------------------------------------------------------


ESCAPES = """
    import os, subprocess, time

    def setsid_grandchild():
        return subprocess.Popen(["sleep", "1000"], start_new_session=True).pid

    def daemon(exec_sleep):
        r, w = os.pipe()
        middle = os.fork()
        if middle == 0:
            os.setsid()
            if os.fork() == 0:
                os.write(w, str(os.getpid()).encode())
                os.close(w)
                if exec_sleep:
                    os.execvp("sleep", ["sleep", "1000"])
                time.sleep(1000)
            os._exit(0)
        os.close(w)
        os.waitpid(middle, 0)
        return int(os.read(r, 100))

    SPAWN = {
        "setsid_grandchild": setsid_grandchild,
        "python_daemon": lambda: daemon(False),
        "exec_daemon": lambda: daemon(True),
    }

    async def escape(ctx, *, kind, fail, **_):
        pid = SPAWN[kind]()
        if fail:
            raise RuntimeError(f"pid={pid}")
        return {"pid": pid}
"""


@pytest.mark.parametrize("start_mode", ["zygote", "spawn"])
@pytest.mark.parametrize("fail", [False, True], ids=["succeeded", "failed"])
@pytest.mark.parametrize("kind", ["setsid_grandchild", "python_daemon", "exec_daemon"])
async def test_escaped_process_is_gone_when_the_attempt_returns(plugins: Path, kind: str, fail: bool, start_mode: str) -> None:
    mod = plugin(plugins, ESCAPES)
    zombies_before = our_zombies()
    async with hostile_supervisor(plugins, start_mode=start_mode) as sup:
        run = await sup.run(job(step(f"{mod}:escape", op_kwargs={"kind": kind, "fail": fail})))
        s = run.steps[0]
        pid = int(s.error["message"].removeprefix("pid=")) if fail else s.output["pid"]
        escaped, zombies, cgroups = not gone(pid), new_zombies(zombies_before), attempt_cgroups(sup)
        if escaped:
            os.kill(pid, signal.SIGKILL)
    assert s.status == ("FAILED" if fail else "SUCCEEDED"), s.error
    assert not escaped, f"{kind} {pid} outlived its attempt"
    assert cgroups == []
    assert zombies == set(), f"killed escapees re-parented to the supervisor and were never reaped: {zombies}"


# --- uncooperative code ------------------------------------------------------------------


async def test_sync_code_ignoring_sigterm_is_killed_at_the_grace(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        import os, signal, time

        signal.signal(signal.SIGTERM, signal.SIG_IGN)

        async def stubborn(ctx, **_):
            # Blocking code on the event loop itself: neither the flag nor the task
            # cancel can land, so only the kill at the grace ends it.
            ctx.log.info(f"pid {os.getpid()}")
            while True:
                try:
                    time.sleep(1000)
                except BaseException:
                    pass
        """,
    )
    t0 = time.monotonic()
    run, _, logs = await run_hostile(plugins, f"{mod}:stubborn", timeout_seconds=1, cancel_grace_seconds=1)
    elapsed = time.monotonic() - t0
    assert failure(run) == ("TIMED_OUT", "timeout", "TimeoutError")
    assert "killed after the 1 s grace" in run.steps[0].error["message"]
    assert 2 <= elapsed < 10
    pid = int(next(m for m in messages(logs, "log") if m.startswith("pid ")).split()[1])
    assert gone(pid)


# --- bad exits -------------------------------------------------------------------------


BAD_EXITS = """
    import ctypes, os, sys

    def os_exit():
        os._exit(7)

    def segfault():
        ctypes.string_at(0)

    def sys_exit():
        sys.exit(3)

    def keyboard_interrupt():
        raise KeyboardInterrupt

    def deep_recursion():
        def down(n):
            return down(n + 1) + 1
        down(0)

    async def bad_exit_async(ctx, *, how, **_):
        globals()[how]()

    def bad_exit_sync(ctx, *, how, **_):
        globals()[how]()
"""


@pytest.mark.parametrize("flavour", ["async", "sync"])
@pytest.mark.parametrize(
    ("how", "reason", "type_", "says"),
    [
        ("os_exit", "crashed", "ChildCrashed", "exit code 7"),
        ("segfault", "crashed", "ChildCrashed", "SIGSEGV"),
        ("sys_exit", "exception", "SystemExit", "3"),
        ("keyboard_interrupt", "exception", "KeyboardInterrupt", ""),
        ("deep_recursion", "exception", "RecursionError", "maximum recursion depth"),
    ],
)
async def test_bad_exit_fails_with_a_sensible_reason(
    plugins: Path, how: str, reason: str, type_: str, says: str, flavour: str
) -> None:
    mod = plugin(plugins, BAD_EXITS)
    run, _, _ = await run_hostile(plugins, f"{mod}:bad_exit_{flavour}", op_kwargs={"how": how})
    assert failure(run) == ("FAILED", reason, type_), run.steps[0].error["message"]
    assert says in run.steps[0].error["message"]
    if reason == "exception":
        assert how in run.steps[0].error["traceback"]  # where the plugin gave up


async def test_exception_with_a_huge_message_fails_with_its_own_type(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        async def shout(ctx, **_):
            raise RuntimeError("upstream said: " + "x" * 10_000_000)
        """,
    )
    run, _, _ = await run_hostile(plugins, f"{mod}:shout")
    assert failure(run) == ("FAILED", "exception", "RuntimeError"), run.steps[0].error["message"][:300]
    error = run.steps[0].error
    assert error["message"].startswith("upstream said: xxx") and len(error["message"]) < MiB
    assert "shout" in error["traceback"] and len(error["traceback"]) < MiB


# --- probing -----------------------------------------------------------------------


async def test_a_step_cannot_read_or_write_another_running_steps_work_dir(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        import asyncio, os
        from pathlib import Path

        async def keeper(ctx, **_):
            Path("private.txt").write_text("for my eyes only")
            ctx.log.info(f"workdir {os.getcwd()}")
            while not ctx.is_cancelled():
                await asyncio.sleep(0.05)

        def attempt(action):
            try:
                action()
            except OSError as exc:
                return type(exc).__name__
            return "allowed"

        async def snoop(ctx, *, victim, **_):
            return {
                "read": attempt(lambda: Path(victim, "private.txt").read_text()),
                "list": attempt(lambda: os.listdir(victim)),
                "write": attempt(lambda: Path(victim, "planted.txt").write_text("x")),
            }
        """,
    )
    async with hostile_supervisor(plugins) as sup:
        keeper = await sup.start(job(step(f"{mod}:keeper")))
        with trio.fail_after(30):
            while not (lines := [m for m in messages(sup.store.logs(keeper.run_id), "log") if m.startswith("workdir ")]):
                await trio.sleep(0.05)
        victim = lines[0].removeprefix("workdir ")
        snoop = await sup.run(job(step(f"{mod}:snoop", op_kwargs={"victim": victim})))
        await sup.cancel(keeper.run_id)
        kept = await keeper.wait()
    assert snoop.status == "SUCCEEDED", snoop.steps[0].error
    assert snoop.steps[0].output == {"read": "PermissionError", "list": "PermissionError", "write": "PermissionError"}
    assert kept.status == "CANCELLED"


async def test_secret_hunt_through_environ_and_proc_finds_nothing(plugins: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("NOMAFLOW_TEST_SECRET", secret)
    in_memory = ctypes.create_string_buffer(secret.encode())  # a known address in the supervisor's memory
    mod = plugin(
        plugins,
        """
        import os

        def read(path, offset=None, size=1 << 20):
            try:
                with open(path, "rb", buffering=0) as f:
                    if offset is not None:
                        f.seek(offset)
                    return f.read(size)
            except (OSError, ValueError, OverflowError):
                return None

        async def hunt(ctx, *, secret, supervisor, address, pids, **_):
            needle = secret.encode()
            try:
                pids = sorted(set(pids) | {int(p) for p in os.listdir("/proc") if p.isdigit()})
            except OSError:
                pass
            places = {
                "os.environ": repr(dict(os.environ)).encode(),
                "/proc/self/environ": read("/proc/self/environ"),
                f"/proc/{os.getppid()}/environ": read(f"/proc/{os.getppid()}/environ"),
                "/proc/1/environ": read("/proc/1/environ"),
                f"/proc/{supervisor}/mem@secret": read(f"/proc/{supervisor}/mem", address, len(needle)),
                f"/proc/{supervisor}/cmdline": read(f"/proc/{supervisor}/cmdline"),
            }
            maps = read(f"/proc/{supervisor}/maps") or b""
            places[f"/proc/{supervisor}/maps"] = maps or None
            for pid in pids:
                places[f"/proc/{pid}/environ"] = read(f"/proc/{pid}/environ")
            readable = sorted(k for k, v in places.items() if v is not None)
            found = sorted(k for k, v in places.items() if v and needle in v)
            return {"found": found, "readable": readable, "tried": len(places)}
        """,
    )
    params = {
        "secret": secret,
        "supervisor": os.getpid(),
        "address": ctypes.addressof(in_memory),
        "pids": psutil.pids(),
    }
    run, _, _ = await run_hostile(plugins, f"{mod}:hunt", op_kwargs=params)
    assert run.status == "SUCCEEDED", run.steps[0].error
    result = run.steps[0].output
    assert result["found"] == []
    assert result["tried"] > 10
    leaks = [p for p in result["readable"] if p != "os.environ" and not p.startswith("/proc/self/")]
    assert leaks == [], f"readable outside the child's own /proc/self: {leaks}"
    assert in_memory.value == secret.encode()  # the address was right all along


async def test_writes_outside_the_work_dir_fail(plugins: Path, tmp_path: Path) -> None:
    mod = plugin(
        plugins,
        """
        import os
        from pathlib import Path

        def attempt(action):
            try:
                action()
            except OSError as exc:
                return type(exc).__name__
            return "written"

        async def scribble(ctx, *, elsewhere, **_):
            here = Path(__file__).resolve()
            targets = {
                "work dir": lambda: Path("mine.txt").write_text("ok"),
                "own plugin file": lambda: here.write_text("# replaced"),
                "new plugin": lambda: (here.parent / "planted.py").write_text("x = 1"),
                "plugin removal": lambda: (here.parent / "healthy.py").unlink(),
                "test dir": lambda: Path(elsewhere, "planted").write_text("x"),
                "/tmp": lambda: Path("/tmp", f"planted-{os.getpid()}").write_text("x"),
                "/dev/shm": lambda: Path("/dev/shm", f"planted-{os.getpid()}").write_text("x"),
                "/etc": lambda: Path("/etc", f"planted-{os.getpid()}").write_text("x"),
                "home": lambda: Path("/root", f"planted-{os.getpid()}").write_text("x"),
                "mkdir /var/tmp": lambda: os.mkdir(f"/var/tmp/planted-{os.getpid()}"),
            }
            return {name: attempt(action) for name, action in targets.items()}
        """,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    original = (plugins / f"{mod}.py").read_text()
    run, _, _ = await run_hostile(plugins, f"{mod}:scribble", op_kwargs={"elsewhere": str(elsewhere)})
    assert run.status == "SUCCEEDED", run.steps[0].error
    result = run.steps[0].output
    assert result.pop("work dir") == "written"
    assert set(result.values()) == {"PermissionError"}, result
    assert (plugins / f"{mod}.py").read_text() == original
    assert sorted(p.name for p in plugins.iterdir() if p.suffix == ".py") == ["healthy.py", f"{mod}.py"]
    assert list(elsewhere.iterdir()) == []


CONNECT = """
    import socket

    async def connect(ctx, *, port, **_):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"hello from the step")
        except OSError as exc:
            return {"connected": False, "error": type(exc).__name__}
        return {"connected": True}
"""


@pytest.fixture
def loopback_server() -> Any:
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server


async def test_loopback_server_is_unreachable_with_network_false(plugins: Path, loopback_server: socket.socket) -> None:
    mod = plugin(plugins, CONNECT)
    port = loopback_server.getsockname()[1]
    run, attempt, _ = await run_hostile(plugins, f"{mod}:connect", op_kwargs={"port": port}, limits=Limits(network=False))
    assert run.status == "SUCCEEDED", run.steps[0].error
    assert run.steps[0].output == {"connected": False, "error": "ConnectionRefusedError"}
    assert attempt.usage["sandbox"]["network"] is True


async def test_loopback_server_is_reachable_with_network_true(plugins: Path, loopback_server: socket.socket) -> None:
    mod = plugin(plugins, CONNECT)
    port = loopback_server.getsockname()[1]
    run, _, _ = await run_hostile(plugins, f"{mod}:connect", op_kwargs={"port": port}, limits=Limits(network=True))
    assert run.steps[0].output == {"connected": True}
    loopback_server.settimeout(5)
    conn, _ = loopback_server.accept()
    with conn:
        assert conn.recv(100) == b"hello from the step"


async def test_garbage_on_inherited_fds_other_than_the_protocol_is_harmless(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        import os

        async def spray(ctx, **_):
            accepted = []
            for fd in range(0, 65):
                if fd == 4:
                    continue
                try:
                    os.write(fd, b"\\xff\\x00garbage{\\"t\\": 99}\\n")
                    accepted.append(fd)
                except OSError:
                    pass
            return {"accepted": accepted}
        """,
    )
    run, _, logs = await run_hostile(plugins, f"{mod}:spray")
    assert run.status == "SUCCEEDED", run.steps[0].error
    assert {1, 2} <= set(run.steps[0].output["accepted"])
    assert 3 not in run.steps[0].output["accepted"]  # the read end of the supervisor's pipe
    assert any("garbage" in m for m in messages(logs, "stdout"))


async def test_garbage_on_the_protocol_fd_fails_with_reason_protocol(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        import asyncio, os

        async def garble(ctx, **_):
            os.write(4, b"\\xff\\x00garbage{\\"t\\": 99}\\n")
            await asyncio.sleep(30)
        """,
    )
    t0 = time.monotonic()
    run, _, _ = await run_hostile(plugins, f"{mod}:garble")
    assert failure(run) == ("FAILED", "protocol", "ProtocolError")
    assert time.monotonic() - t0 < 20


async def test_the_child_cannot_signal_the_supervisor(plugins: Path) -> None:
    mod = plugin(
        plugins,
        """
        import os, signal

        def attempt(action):
            try:
                action()
            except OSError as exc:
                return type(exc).__name__
            return "delivered"

        async def rebel(ctx, *, supervisor, **_):
            parent = os.getppid()
            tries = {
                "kill ppid": lambda: os.kill(parent, signal.SIGUSR2),
                "kill supervisor": lambda: os.kill(supervisor, signal.SIGUSR2),
                "probe supervisor": lambda: os.kill(supervisor, 0),
                "killpg supervisor": lambda: os.killpg(os.getpgid(supervisor), signal.SIGUSR2),
                "pidfd supervisor": lambda: signal.pidfd_send_signal(os.pidfd_open(supervisor), signal.SIGUSR2),
            }
            return {"parent": parent, **{name: attempt(action) for name, action in tries.items()}}
        """,
    )
    received: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: received.append(signum))
    try:
        run, _, _ = await run_hostile(plugins, f"{mod}:rebel", op_kwargs={"supervisor": os.getpid()})
        await trio.sleep(0.2)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert run.status == "SUCCEEDED", run.steps[0].error
    result = run.steps[0].output
    assert result.pop("parent") == os.getpid()
    assert set(result.values()) == {"PermissionError"}, result
    assert received == []


# --- soak --------------------------------------------------------------------------


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


async def _spares_settled(sup: Supervisor) -> None:
    """Every warm spare prepared and none in the making: each holds its pipes, so fds are counted at rest."""
    spares = sup._spares
    assert spares is not None
    with trio.fail_after(20):
        while len(spares.pids()) < spares.size or spares._making:
            await trio.sleep(0.01)


@pytest.mark.slow
async def test_thousand_sequential_trivial_steps_leave_nothing_behind(plugins: Path) -> None:
    trivial = job(step("healthy:fine"))
    fds_before, zombies_before = _fd_count(), our_zombies()
    async with Supervisor(plugins=plugins, history=":memory:") as sup:
        t0 = time.monotonic()
        for _ in range(50):
            assert (await sup.run(trivial)).status == "SUCCEEDED"
        await _spares_settled(sup)
        fds_warm, threads_warm = _fd_count(), _thread_count()
        failed = []
        for i in range(950):
            run = await sup.run(trivial)
            if run.status != "SUCCEEDED":
                failed.append((i, run.steps[0].error))
        elapsed = time.monotonic() - t0
        await _spares_settled(sup)
        fds, threads, zombies, cgroups = _fd_count(), _thread_count(), new_zombies(zombies_before), attempt_cgroups(sup)
        manager = sup.containment.cgroups
        roots = [manager.root(h.role) for h in manager.support.hierarchies] if manager else []
    assert failed == []
    assert fds <= fds_warm + 2, f"{fds - fds_warm} fds more than after 50 steps"
    assert threads <= threads_warm + 2, f"{threads - threads_warm} threads more than after 50 steps"
    assert (zombies, cgroups) == (set(), [])
    assert roots and [r for r in roots if r is not None and r.exists()] == []
    assert _fd_count() <= fds_before + 2
    assert new_zombies(zombies_before) == set()
    assert elapsed < 110
