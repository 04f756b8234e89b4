"""The child's end of the pipes, driven by hand through a real `python -m liberty.jobs.child`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from liberty.jobs.child.channel import EXIT_PARENT_GONE, EXIT_PROTOCOL
from liberty.jobs.protocol import PROTOCOL_FDS_ENV, PROTOCOL_VERSION, Cancel, Prepare, Start, encode
from liberty.jobs.sandbox import SandboxSpec

SRC = Path(__file__).resolve().parents[2] / "src"

pytestmark = pytest.mark.timeout(60)


class RawChild:
    def __init__(self, plugins: Path) -> None:
        to_child_r, self.to_child = os.pipe()
        self.from_child, from_child_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "liberty.jobs.child"],
            pass_fds=(to_child_r, from_child_w),
            env={"PYTHONPATH": str(SRC), PROTOCOL_FDS_ENV: f"{to_child_r},{from_child_w}"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.plugins = plugins
        self._reader = os.fdopen(self.from_child, "rb")

    def send(self, *messages: object) -> None:
        os.write(self.to_child, b"".join(encode(m) for m in messages))  # type: ignore[arg-type]

    def line(self) -> bytes:
        return self._reader.readline()

    def prepared(self) -> None:
        self.send(Prepare(plugins=str(self.plugins)))
        assert b'"ready"' in self.line()  # written with `prepared`, once prepared
        assert b'"prepared"' in self.line()

    def ended(self, *, hang_up: bool = True) -> tuple[int, str]:
        """Its exit code and stderr; `hang_up` first closes our end, as a supervisor that died would."""
        if hang_up:
            os.close(self.to_child)
        else:
            self.proc.wait(timeout=30)
            os.close(self.to_child)
        _, err = self.proc.communicate(timeout=30)
        self._reader.close()
        return self.proc.returncode, err


@pytest.fixture
def child(tmp_path: Path) -> Iterator[RawChild]:
    (tmp_path / "steps.py").write_text("async def hello(ctx, **_):\n    return {'hi': 1}\n")
    raw = RawChild(tmp_path)
    try:
        yield raw
    finally:
        if raw.proc.poll() is None:
            raw.proc.kill()
            raw.proc.wait()


def start(**kw: object) -> Start:
    fields: dict[str, object] = dict(
        version=PROTOCOL_VERSION, run_id="r", job_id="j", step="s", attempt=1, function="steps:hello", params={}
    )
    fields.update(kw)
    return Start(**fields)  # type: ignore[arg-type]


def test_the_step_runs_once_start_arrives(child: RawChild) -> None:
    child.prepared()
    child.send(start())
    assert b'"hi"' in child.line()
    assert child.ended(hang_up=False)[0] == 0


def test_a_start_sent_with_prepare_runs_once_prepared(child: RawChild) -> None:
    child.send(Prepare(plugins=str(child.plugins)), start())  # a cold start: one write
    assert b'"ready"' in child.line()
    assert b'"prepared"' in child.line()
    assert b'"hi"' in child.line()
    assert child.ended(hang_up=False)[0] == 0


def test_a_start_sent_with_prepare_is_not_run_in_a_sandbox_its_report_calls_broken(child: RawChild, tmp_path: Path) -> None:
    (tmp_path / "steps.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\nasync def hello(ctx, **_):\n    return 1\n")
    broken = SandboxSpec(workdir=str(tmp_path / "no-such-dir"), readable=[sys.prefix, str(SRC), str(tmp_path)]).to_dict()
    child.send(Prepare(plugins=str(child.plugins), sandbox=broken), start())
    assert b'"ready"' in child.line()
    prepared = child.line()
    assert b'"prepared"' in prepared and b"cannot be opened" in prepared  # the landlock measure failed
    assert child.line() == b""  # nothing after: no result, the pipe closed
    assert child.ended(hang_up=False)[0] == 0
    assert not (tmp_path / "ran").exists()


def test_a_message_other_than_start_after_prepare_is_a_protocol_failure(child: RawChild) -> None:
    child.prepared()
    child.send(Cancel(stage="flag"))
    code, err = child.ended()
    assert code == EXIT_PROTOCOL
    assert "Cancel before start" in err


def test_a_second_start_is_a_protocol_failure(child: RawChild, tmp_path: Path) -> None:
    (tmp_path / "steps.py").write_text("import time\nasync def hello(ctx, **_):\n    time.sleep(30)\n")
    child.prepared()
    child.send(start(), start())  # both in one write: the second reaches the reader thread
    code, err = child.ended()
    assert code == EXIT_PROTOCOL
    assert "a second start message" in err


def test_the_child_exits_when_the_supervisor_is_gone_before_start(child: RawChild) -> None:
    child.prepared()
    assert child.ended()[0] == EXIT_PARENT_GONE


def running(child: RawChild, tmp_path: Path, body: str, *, sync: bool = False) -> None:
    """Start a step that marks that it runs, then does `body`; return once it runs."""
    marker = tmp_path / "running"
    head = "def" if sync else "async def"
    (tmp_path / "steps.py").write_text(
        f"import os, time\n{head} hello(ctx, **_):\n    open({str(marker)!r}, 'w').close()\n    {body}\n"
    )
    child.prepared()
    child.send(start())
    for _ in range(300):
        if marker.exists():
            return
        time.sleep(0.05)
    raise AssertionError("the step did not start within 15 s")


def test_a_step_the_supervisor_does_not_talk_to_again_runs_on_one_thread(child: RawChild, tmp_path: Path) -> None:
    (tmp_path / "steps.py").write_text("import os\nasync def hello(ctx, **_):\n    return {'tasks': len(os.listdir('/proc/self/task'))}\n")
    child.prepared()
    child.send(start())
    assert b'"tasks":1' in child.line().replace(b" ", b"")
    assert child.ended(hang_up=False)[0] == 0


@pytest.mark.parametrize(
    "body, sync",
    [("time.sleep(60)", False), ("while True: pass", False), ("time.sleep(60)", True)],
    ids=["sleeping-on-the-loop", "spinning-on-the-loop", "sleeping-in-a-sync-step"],
)
def test_the_child_exits_when_the_supervisor_is_gone_while_its_step_runs(child: RawChild, tmp_path: Path, body: str, sync: bool) -> None:
    running(child, tmp_path, body, sync=sync)
    began = time.monotonic()
    assert child.ended()[0] == EXIT_PARENT_GONE
    assert time.monotonic() - began < 20  # not the step's 60 s


def test_a_second_start_while_the_step_holds_the_loop_is_a_protocol_failure(child: RawChild, tmp_path: Path) -> None:
    running(child, tmp_path, "time.sleep(60)")
    child.send(start())
    code, err = child.ended()
    assert code == EXIT_PROTOCOL
    assert "a second start message" in err


def test_a_sigio_from_elsewhere_before_start_leaves_the_start_to_the_main_thread(child: RawChild) -> None:
    child.prepared()
    os.kill(child.proc.pid, signal.SIGIO)
    time.sleep(0.2)
    child.send(start())
    assert b'"hi"' in child.line()
    assert child.ended(hang_up=False)[0] == 0


FALLBACK_SCRIPT = """
import fcntl, os, sys, time
from liberty.jobs.child import channel as ch
from liberty.jobs.protocol import Cancel, encode
real_fcntl = fcntl.fcntl
def no_setown_ex(fd, cmd, *args):
    if cmd == ch._F_SETOWN_EX:
        raise OSError(22, "Invalid argument")
    return real_fcntl(fd, cmd, *args)
ch.fcntl.fcntl = no_setown_ex
r_in, w_in = os.pipe()
r_out, w_out = os.pipe()
channel = ch.Channel(r_in, w_out)
channel.watch_for_messages()
os.write(w_in, sys.stdin.buffer.read())
channel.wait_start()
os.write(w_in, encode(Cancel(stage="flag")))
landed = channel.cancelled.wait(10)
print(len(os.listdir("/proc/self/task")), landed, flush=True)
os._exit(0)
"""


def test_without_sigio_the_reader_thread_starts_with_the_step() -> None:
    out = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT],
        input=encode(start()),
        capture_output=True,
        env={"PYTHONPATH": str(SRC)},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [b"2", b"True"]  # the main thread and the reader, which set the flag
