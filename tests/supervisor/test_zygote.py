"""The zygote (fork server): the default start mode, and the fork hazards it must not pass on to attempts."""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import sys
import textwrap
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from liberty.jobs import Job, Step, Supervisor
from liberty.jobs.history import RunView
from liberty.jobs.protocol.zygote import REPLY, REQUEST_HEADER
from liberty.jobs.supervisor.spawn import child_environment
from liberty.jobs.supervisor.zygote import Zygote
from supervisor_helpers import plugins_dir

pytestmark = [pytest.mark.trio, pytest.mark.timeout(60)]

PROBES = '''
import os
import random
import sys


def cmdline(ctx, **_):
    with open("/proc/self/cmdline") as f:
        return f.read().split("\\0")[:-1]


def randomness(ctx, **_):
    import ssl

    return {
        "random": random.random(),
        "state": hash(random.getstate()),
        "openssl": ssl.RAND_bytes(16).hex(),  # OpenSSL reseeds on a pid change, with no fork handler
        "cmdline": cmdline(ctx),
    }


def fds(ctx, **_):
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[name] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the descriptor listdir used, closed by now
            pass
    return found


def environment(ctx, **_):
    import ctypes

    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_char_p
    return {"os": dict(os.environ), "cwd": os.getcwd(),
            "libc": {k: (libc.getenv(k.encode()) or b"").decode() for k in os.environ}}


def session(ctx, **_):
    autogroup = "/proc/self/autogroup"  # absent on a kernel without scheduler autogroups
    return {"pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0),
            "autogroup": open(autogroup).read().split()[0] if os.path.exists(autogroup) else None}


def uses_sqlite(ctx, **_):
    import sqlite3

    with open("/proc/self/maps") as f:
        return sqlite3.connect(":memory:").execute("SELECT 41 + 1").fetchone()[0], "_sqlite3" in f.read()
'''

FORBIDDEN_MODULES = ("alpha", "sqlite3", "_sqlite3", "trio", "psutil", "httpx", "psycopg",
                     "liberty.jobs.supervisor", "liberty.jobs.connectors", "liberty.jobs.history")


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    return plugins_dir(tmp_path, probes=PROBES)


def step(python: str, name: str = "s") -> Step:
    return Step(name=name, python=python, timeout_seconds=30, cancel_grace_seconds=2)


def job(*steps: Step) -> Job:
    return Job(name="zygote-test", steps=list(steps))


def succeeded(run: RunView) -> list[Any]:
    assert [s.status for s in run.steps] == ["SUCCEEDED"] * len(run.steps), [(s.name, s.error) for s in run.steps]
    return [s.output for s in run.steps]


def forked_from_zygote(argv: list[str]) -> bool:
    return argv[-2:] == ["-m", "liberty.jobs.child.zygote"]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def zygote_pid(sup: Supervisor) -> int:
    assert sup._zygote is not None and sup._zygote.pid is not None, f"no zygote running ({sup.start_mode_note})"
    return sup._zygote.pid


async def test_zygote_is_the_default_start_mode_where_cgroups_work(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:") as sup:
        cgroups = sup.containment.cgroups
        assert cgroups is not None and cgroups.enabled, "this host is expected to have cgroups (see DESIGN.md)"
        assert (sup.start_mode, sup.start_mode_note) == ("zygote", "")
        [argv] = succeeded(await sup.run(job(step("probes:cmdline"))))
    assert forked_from_zygote(argv), argv


async def test_two_attempts_see_different_random_state(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:") as sup:
        first, second = succeeded(await sup.run(job(step("probes:randomness", "a"), step("probes:randomness", "b"))))
    assert forked_from_zygote(first["cmdline"]) and forked_from_zygote(second["cmdline"])
    assert first["random"] != second["random"]
    assert first["state"] != second["state"]
    assert first["openssl"] != second["openssl"]


async def test_an_attempt_inherits_no_fds_beyond_stdio_and_the_protocol_pipes(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:") as sup:
        [forked] = succeeded(await sup.run(job(step("probes:fds"))))
        zygote_fds = {os.readlink(f"/proc/{zygote_pid(sup)}/fd/{fd}") for fd in os.listdir(f"/proc/{zygote_pid(sup)}/fd")}
    async with Supervisor(plugins=plugins, history=":memory:", start_mode="spawn") as sup:
        [spawned] = succeeded(await sup.run(job(step("probes:fds"))))

    assert {"0", "1", "2", "3", "4"} <= set(forked)
    assert all(forked[fd].startswith("pipe:") for fd in "1234"), forked
    # Beyond 0-4, only what the child's own asyncio loop opened after the fork: its epoll and self-pipe.
    extra = {fd: target for fd, target in forked.items() if int(fd) > 4}
    assert all(t == "anon_inode:[eventpoll]" or t.startswith("socket:") for t in extra.values()), forked
    assert not set(extra.values()) & zygote_fds, f"the attempt holds the zygote's descriptors: {forked} / {zygote_fds}"

    def kinds(table: dict[str, str]) -> dict[str, str]:
        return {fd: target.split("[")[0] for fd, target in table.items()}

    assert kinds(forked) == kinds(spawned), "a forked attempt's descriptors differ from a freshly spawned one's"


async def test_an_attempt_has_exactly_the_environment_the_supervisor_sent(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:") as sup:
        [forked] = succeeded(await sup.run(job(step("probes:environment"))))
    async with Supervisor(plugins=plugins, history=":memory:", start_mode="spawn") as sup:
        [spawned] = succeeded(await sup.run(job(step("probes:environment"))))
    assert set(forked["os"]) == set(spawned["os"]), (forked["os"], spawned["os"])
    assert forked["os"]["HOME"] == forked["os"]["TMPDIR"] == forked["cwd"] != "/"
    assert forked["libc"] == forked["os"], "os.environ and the C library's environment disagree"


async def test_an_attempt_leads_its_own_process_group_in_the_zygotes_session_and_scheduler_group(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:") as sup:
        first, second = succeeded(await sup.run(job(step("probes:session", "a"), step("probes:session", "b"))))
        zygote = zygote_pid(sup)
        autogroup = Path(f"/proc/{zygote}/autogroup")
        zygote_autogroup = autogroup.read_text().split()[0] if autogroup.exists() else None
    for attempt in (first, second):
        assert attempt["pgid"] == attempt["pid"] and attempt["sid"] == zygote, attempt
        assert attempt["autogroup"] == zygote_autogroup, (attempt, zygote_autogroup)


async def test_the_zygote_runs_no_threads(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:") as sup:
        succeeded(await sup.run(job(step("probes:cmdline", "a"), step("probes:uses_sqlite", "b"))))
        with open(f"/proc/{zygote_pid(sup)}/status") as f:
            status = dict(line.split(":", 1) for line in f.read().splitlines())
    assert status["Threads"].strip() == "1"


async def test_the_zygote_forks_attempts_as_the_supervisors_children_with_one_clone(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:") as sup:
        [argv] = succeeded(await sup.run(job(step("probes:cmdline"))))
        assert sup._zygote is not None
        assert (sup._zygote.fork_method, sup._zygote.fork_note) == ("clone-parent", "")
    assert forked_from_zygote(argv), argv


async def test_the_zygote_has_an_empty_bounding_set_but_keeps_what_attempts_need_to_seal(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:") as sup:
        succeeded(await sup.run(job(step("probes:cmdline"))))
        with open(f"/proc/{zygote_pid(sup)}/status") as f:
            status = dict(line.split(":", 1) for line in f.read().splitlines())
    assert int(status["CapBnd"], 16) == 0
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) != 0  # root here: caps held until each attempt's capset


async def test_a_killed_zygote_is_restarted_and_the_next_run_succeeds(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:", spares=0) as sup:  # no spare forked before the kill
        succeeded(await sup.run(job(step("probes:cmdline"))))
        killed = zygote_pid(sup)
        os.kill(killed, signal.SIGKILL)
        with trio.fail_after(10):
            while alive(killed):
                await trio.sleep(0.05)
        [argv] = succeeded(await sup.run(job(step("probes:cmdline"))))
        assert sup._zygote is not None and sup._zygote.restarts >= 1
        assert zygote_pid(sup) != killed and alive(zygote_pid(sup))
    assert forked_from_zygote(argv), f"the attempt was not forked from a restarted zygote: {argv}"


async def test_spawn_mode_runs_the_child_as_python_m_liberty_jobs_child(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:", start_mode="spawn") as sup:
        [argv] = succeeded(await sup.run(job(step("probes:cmdline"))))
        assert sup._zygote is None
    assert argv[0] == sys.executable
    assert argv[-2:] == ["-m", "liberty.jobs.child"]


async def test_an_edited_plugin_is_picked_up_in_zygote_mode(plugins: Path) -> None:
    source = textwrap.dedent('''
        def version(ctx, **_):
            return "v1"
    ''')
    (plugins / "edited.py").write_text(source)
    async with Supervisor(plugins=plugins, history=":memory:") as sup:
        assert sup.start_mode == "zygote"
        before = succeeded(await sup.run(job(step("edited:version"))))
        (plugins / "edited.py").write_text(source.replace("v1", "v2"))  # same size, maybe the same mtime second
        after = succeeded(await sup.run(job(step("edited:version"))))
    assert (before, after) == (["v1"], ["v2"])


async def test_the_zygote_never_loads_sqlite_even_after_attempts_did(plugins: Path) -> None:
    async with Supervisor(plugins=plugins, history=":memory:") as sup:
        [(answer, attempt_mapped_it)] = succeeded(await sup.run(job(step("probes:uses_sqlite"))))
        with open(f"/proc/{zygote_pid(sup)}/maps") as f:
            zygote_maps = f.read()
    assert (answer, attempt_mapped_it) == (42, True)
    assert "_sqlite3" not in zygote_maps


async def test_an_attempt_starts_without_earlier_attempts_plugins_or_supervisor_modules(plugins: Path) -> None:
    (plugins / "alpha.py").write_text("import sqlite3\n\ndef first(ctx, **_):\n    return sqlite3.sqlite_version\n")
    (plugins / "beta.py").write_text(textwrap.dedent(f'''
        import sys

        def second(ctx, **_):
            present = sorted(m for m in sys.modules if m.startswith({FORBIDDEN_MODULES!r}))
            return {{"forbidden": present, "self": __name__ in sys.modules}}
    '''))
    async with Supervisor(plugins=plugins, history=":memory:") as sup:
        assert sup.start_mode == "zygote"
        _, second = succeeded(await sup.run(job(step("alpha:first", "a"), step("beta:second", "b"))))
    assert second == {"forbidden": [], "self": True}


def zombie_children() -> set[int]:
    me = os.getpid()
    out = set()
    for child in psutil.Process(me).children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                out.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return out


async def test_a_killed_zygote_leaves_no_zombie_after_its_restart(plugins: Path) -> None:
    before = zombie_children()
    async with Supervisor(plugins=plugins, history=":memory:", spares=0) as sup:
        succeeded(await sup.run(job(step("probes:cmdline"))))
        os.kill(zygote_pid(sup), signal.SIGKILL)
        succeeded(await sup.run(job(step("probes:cmdline"))))
        with trio.fail_after(10):
            while zombie_children() - before:
                await trio.sleep(0.05)
    assert not (zombie_children() - before)


# --- the request framing (protocol/zygote.py), spoken to a real zygote ------------------------


async def _raw_request(zygote: Zygote, body: bytes, fds: list[int], request_id: int = 7) -> bytes:
    assert zygote._sock is not None
    await zygote._sock.sendmsg([REQUEST_HEADER.pack(request_id) + body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    return await zygote._sock.recv(65536)


async def test_a_request_with_the_wrong_number_of_descriptors_is_refused_with_the_reason() -> None:
    zygote = Zygote(child_environment(workdir="/"))
    await zygote._start()
    r, w = os.pipe()
    try:
        raw = await _raw_request(zygote, b"{}", [r, w])
    finally:
        os.close(r)
        os.close(w)
        await zygote.aclose()
    assert REPLY.unpack_from(raw) == (7, -1)
    assert raw[REPLY.size :].decode() == "ValueError: expected 4 descriptors, got 2"


async def test_an_attempt_whose_request_body_is_malformed_exits_3_with_the_reason_on_its_stderr() -> None:
    zygote = Zygote(child_environment(workdir="/"))
    await zygote._start()
    (in_r, in_w), (out_r, out_w), (so_r, so_w), (se_r, se_w) = (os.pipe() for _ in range(4))
    ours = [in_w, out_r, so_r, se_r]
    try:
        theirs = [in_r, out_w, so_w, se_w]
        try:
            raw = await _raw_request(zygote, json.dumps({"env": {"A": 1}, "cwd": "/"}).encode(), theirs)
        finally:
            for fd in theirs:
                os.close(fd)
        request_id, pid = REPLY.unpack_from(raw)
        assert request_id == 7 and pid > 0
        with trio.fail_after(20):
            _, status = await trio.to_thread.run_sync(os.waitpid, pid, 0)
        stderr = os.read(se_r, 65536).decode()
    finally:
        for fd in ours:
            os.close(fd)
        await zygote.aclose()
    assert os.waitstatus_to_exitcode(status) == 3
    assert "failed outside the step" in stderr and "env must map strings to strings" in stderr


class _CancelOnRecv:
    """The zygote's socket, but the caller's scope is cancelled right after the request went out."""

    def __init__(self, sock: Any, scope: trio.CancelScope) -> None:
        self._sock, self._scope, self.replies = sock, scope, []

    async def sendmsg(self, *args: Any) -> int:
        return await self._sock.sendmsg(*args)

    async def recv(self, size: int) -> bytes:
        self._scope.cancel()
        raw = await self._sock.recv(size)
        self.replies.append(raw)
        return raw

    def close(self) -> None:
        self._sock.close()


async def test_a_start_cancelled_while_the_zygote_forks_reaps_that_process_and_the_next_fork_works() -> None:
    zygote = Zygote(child_environment(workdir="/"))
    await zygote._start()
    try:
        with trio.CancelScope() as scope:
            zygote._sock = proxy = _CancelOnRecv(zygote._sock, scope)  # type: ignore[assignment]
            await zygote.fork(workdir="/", env=child_environment(workdir="/"))
        assert scope.cancelled_caught
        [raw] = proxy.replies
        _, pid = REPLY.unpack_from(raw)
        assert pid > 0
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped already, by the cancelled fork
        zygote._sock = proxy._sock
        child = await zygote.fork(workdir="/", env=child_environment(workdir="/"))  # not answered with the stale reply
        await child.aclose()
        with trio.fail_after(10):
            await child.wait()
    finally:
        await zygote.aclose()
