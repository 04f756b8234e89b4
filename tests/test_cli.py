"""The `nomaflow` command, run the way an operator runs it: the console script, in a project directory."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from liberty.jobs.connectors import SECRET_KEY_ENV, decrypt_secret, load_connectors

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[1]
NOMAFLOW = Path(sys.executable).parent / "nomaflow"
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR)\s+(\S+) (.*)$")
RUN_LINE = re.compile(r"^run ([0-9a-f]+) · job ")
STEP_KEYS = {"name", "status", "attempts", "output", "error", "wall_s", "cpu_s", "peak_rss_mb"}

STEPS_PLUGIN = '''
import asyncio
import time

from examples.cancellation import long_loop


async def echo(ctx, **kwargs):
    ctx.log.info("echo says hello")
    return {key: [value, type(value).__name__] for key, value in sorted(kwargs.items())}


async def boom(ctx, **_):
    raise ValueError("boom from the plugin")


def sleepy(ctx, **_):
    time.sleep(600)


async def announced_long_loop(ctx, *, count, **_):
    ctx.log.info("looping")
    return await long_loop(ctx, items=list(range(count)))


async def ticker(ctx, *, ticks, **_):
    for i in range(ticks):
        ctx.log.info(f"tick {i}")
        await asyncio.sleep(0.25)
    return ticks


async def count_rows(ctx, **_):
    db = ctx.get_connector("local")
    return await db.scalar("SELECT count(*) FROM things")
'''


# --- helpers --------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **extra}


def nomaflow(cwd: Path, *args: str, stdin: str | None = None, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(NOMAFLOW), *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=timeout, env=_env(**env)
    )


class Live:
    """A `nomaflow` process whose output lines are collected (with arrival times) while it runs."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(NOMAFLOW), *args], cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=_env(),
        )
        self.stdout: list[tuple[float, str]] = []
        self.stderr: list[str] = []
        self._changed = threading.Condition()
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout, True), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr, False), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any, into: list[Any], stamped: bool) -> None:
        for line in stream:
            with self._changed:
                into.append((time.monotonic(), line.rstrip("\n")) if stamped else line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for _, line in self.stdout:
                    if found := regex.search(line):
                        return found
                left = deadline - time.monotonic()
                assert left > 0 and self.proc.poll() is None, (
                    f"no stdout line matched {pattern!r}; stdout: {self.text()!r}; stderr: {self.stderr!r}"
                )
                self._changed.wait(min(left, 0.2))

    def finish(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=10)
        return code

    def text(self) -> str:
        return "\n".join(line for _, line in self.stdout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project directory: the repo's plugins plus this file's, jobs/, and nomaflow.toml keeping history here."""
    shutil.copytree(ROOT / "plugins", tmp_path / "plugins", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "plugins" / "cli_steps.py").write_text(STEPS_PLUGIN)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "nomaflow.toml").write_text('plugins = "plugins"\nhistory = "state/history.db"\n')
    return tmp_path


def write_job(project: Path, name: str, *steps: dict[str, Any], extra: str = "") -> str:
    """jobs/NAME.toml with these steps (values rendered as TOML); returns its relative path."""
    lines = [f'name = "{name}"', extra]
    for step in steps:
        lines.append("[[steps]]")
        for key, value in step.items():
            lines.append(f"{key} = {json.dumps(value)}")
    path = project / "jobs" / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return f"jobs/{name}.toml"


def one_step(function: str, name: str = "s", **keys: Any) -> dict[str, Any]:
    return {"name": name, "python": function, "timeout_seconds": 30, "cancel_grace_seconds": 2, **keys}


def run_id_of(result_stdout: str) -> str:
    for line in result_stdout.splitlines():
        if found := RUN_LINE.match(line):
            return found.group(1)
    raise AssertionError(f"no 'run <id> · job' line in {result_stdout!r}")


def show_json(project: Path, run_id: str) -> dict[str, Any]:
    result = nomaflow(project, "show", run_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def sqlite_connectors(project: Path) -> None:
    import sqlite3

    with sqlite3.connect(project / "local.db") as db:
        db.execute("CREATE TABLE things (x INTEGER)")
        db.executemany("INSERT INTO things VALUES (?)", [(1,), (2,), (3,)])
    (project / "connectors.toml").write_text('[local]\ntype = "sqlite"\npath = "local.db"\n')


# --- run ----------------------------------------------------------------------------


def test_run_of_a_good_job_exits_0_with_live_log_lines_and_a_summary(project: Path) -> None:
    job = write_job(project, "good", one_step("cli_steps:echo", name="echo"))
    result = nomaflow(project, "run", job)
    assert result.returncode == 0, result.stderr
    logs = [m for line in result.stdout.splitlines() if (m := LOG_LINE.match(line))]
    assert ("INFO", "echo", "echo says hello") in [m.groups() for m in logs], result.stdout
    run_id = run_id_of(result.stdout)
    assert f"run {run_id} · good · SUCCEEDED" in result.stdout
    assert re.search(r"│ echo\s+│ SUCCEEDED\s+│ 1 ", result.stdout), result.stdout


def test_run_json_prints_the_design_shape_on_stdout_and_the_live_log_on_stderr(project: Path) -> None:
    job = write_job(project, "good", one_step("cli_steps:echo", name="echo"))
    result = nomaflow(project, "run", job, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)  # nothing but the document on stdout
    assert list(doc)[:4] == ["run_id", "job", "status", "steps"]
    assert (doc["job"], doc["status"]) == ("good", "SUCCEEDED")
    [step] = doc["steps"]
    assert set(step) == STEP_KEYS
    assert (step["name"], step["status"], step["attempts"], step["error"]) == ("echo", "SUCCEEDED", 1, None)
    assert all(isinstance(step[k], (int, float)) for k in ("wall_s", "cpu_s", "peak_rss_mb"))
    assert any(LOG_LINE.match(line) and "echo says hello" in line for line in result.stderr.splitlines()), result.stderr


def test_run_param_values_parse_as_json_else_string_and_reach_the_plugin(project: Path) -> None:
    job = write_job(project, "params", one_step("cli_steps:echo"))
    result = nomaflow(project, "run", job, "--json", "--param", "n=3", "--param", "name=x", "--param", "flags=[1, true]")
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)["steps"][0]["output"]
    assert output == {"n": [3, "int"], "name": ["x", "str"], "flags": [[1, True], "list"]}


def test_run_with_a_failing_step_exits_1_and_skips_the_steps_after_it(project: Path) -> None:
    job = write_job(project, "failing", one_step("cli_steps:boom", name="boom"), one_step("cli_steps:echo", name="after"))
    result = nomaflow(project, "run", job, "--json")
    assert result.returncode == 1, result.stderr
    doc = json.loads(result.stdout)
    assert doc["status"] == "FAILED"
    boom, after = doc["steps"]
    assert (boom["status"], after["status"]) == ("FAILED", "SKIPPED")
    assert set(boom["error"]) == {"type", "message", "reason", "traceback"}
    assert (boom["error"]["type"], boom["error"]["message"], boom["error"]["reason"]) == (
        "ValueError", "boom from the plugin", "exception"
    )


def test_run_with_a_timed_out_step_exits_1_and_says_timed_out(project: Path) -> None:
    job = write_job(project, "slow", one_step("cli_steps:sleepy", timeout_seconds=1, cancel_grace_seconds=0.5))
    started = time.monotonic()
    result = nomaflow(project, "run", job, "--json")
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 20
    doc = json.loads(result.stdout)
    assert (doc["status"], doc["steps"][0]["status"], doc["steps"][0]["error"]["reason"]) == (
        "TIMED_OUT", "TIMED_OUT", "timeout"
    )


# --- step ---------------------------------------------------------------------------


def test_step_runs_one_function_ad_hoc_with_params(project: Path) -> None:
    result = nomaflow(project, "step", "cli_steps:echo", "--param", "n=3", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["job"] == "step:cli_steps:echo"
    assert (doc["steps"][0]["status"], doc["steps"][0]["output"]) == ("SUCCEEDED", {"n": [3, "int"]})


def test_step_connector_option_lets_the_step_use_that_connector(project: Path) -> None:
    sqlite_connectors(project)
    result = nomaflow(project, "step", "cli_steps:count_rows", "--connector", "local", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["steps"][0]["output"] == 3


def test_step_without_the_connector_option_may_not_use_it(project: Path) -> None:
    sqlite_connectors(project)
    result = nomaflow(project, "step", "cli_steps:count_rows", "--json")
    assert result.returncode == 1
    assert "local" in json.loads(result.stdout)["steps"][0]["error"]["message"]


# --- reading the history --------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One project with one finished two-step run, shared by the read-only commands."""
    root = tmp_path_factory.mktemp("history")
    shutil.copytree(ROOT / "plugins", root / "plugins", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "plugins" / "cli_steps.py").write_text(STEPS_PLUGIN)
    (root / "jobs").mkdir()
    (root / "nomaflow.toml").write_text('history = "history.db"\n')
    job = write_job(root, "readme", one_step("cli_steps:echo", name="first"), one_step("cli_steps:echo", name="second"))
    result = nomaflow(root, "run", job, "--param", "n=7")
    assert result.returncode == 0, result.stderr
    return root, run_id_of(result.stdout)


def test_runs_lists_the_run(finished: tuple[Path, str]) -> None:
    root, run_id = finished
    result = nomaflow(root, "runs")
    assert result.returncode == 0, result.stderr
    assert re.search(rf"{run_id}\s+│ readme\s+│ SUCCEEDED\s+│ cli ", result.stdout), result.stdout
    listed = json.loads(nomaflow(root, "runs", "--json").stdout)
    assert [(r["run_id"], r["job"], r["status"], r["session_user"]) for r in listed] == [(run_id, "readme", "SUCCEEDED", "cli")]


def test_show_prints_the_steps_and_their_outputs(finished: tuple[Path, str]) -> None:
    root, run_id = finished
    result = nomaflow(root, "show", run_id)
    assert result.returncode == 0, result.stderr
    assert f"run {run_id} · readme · SUCCEEDED" in result.stdout
    assert 'first → {"n": [7, "int"]}' in result.stdout
    assert 'second → {"n": [7, "int"]}' in result.stdout


def test_show_accepts_a_four_character_prefix_of_the_run_id(finished: tuple[Path, str]) -> None:
    root, run_id = finished
    result = nomaflow(root, "show", run_id[:4], "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["run_id"] == run_id


def test_show_json_has_the_design_shape(finished: tuple[Path, str]) -> None:
    root, run_id = finished
    doc = show_json(root, run_id)
    assert list(doc)[:4] == ["run_id", "job", "status", "steps"]
    assert (doc["run_id"], doc["job"], doc["status"]) == (run_id, "readme", "SUCCEEDED")
    assert [set(s) for s in doc["steps"]] == [STEP_KEYS, STEP_KEYS]
    assert [(s["name"], s["output"]) for s in doc["steps"]] == [("first", {"n": [7, "int"]}), ("second", {"n": [7, "int"]})]


def test_logs_prints_the_run_log_lines(finished: tuple[Path, str]) -> None:
    root, run_id = finished
    result = nomaflow(root, "logs", run_id)
    assert result.returncode == 0, result.stderr
    lines = [m.groups() for line in result.stdout.splitlines() if (m := LOG_LINE.match(line))]
    assert ("INFO", "first", "echo says hello") in lines
    assert ("INFO", "second", "echo says hello") in lines


def test_logs_json_prints_one_object_per_line(finished: tuple[Path, str]) -> None:
    root, run_id = finished
    result = nomaflow(root, "logs", run_id, "--json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records and all({"ts", "step", "attempt", "level", "stream", "message"} <= set(r) for r in records)
    said = [(r["step"], r["attempt"], r["level"], r["stream"]) for r in records if r["message"] == "echo says hello"]
    assert said == [("first", 1, "INFO", "log"), ("second", 1, "INFO", "log")]


def test_unknown_run_id_exits_2_with_a_helpful_message(finished: tuple[Path, str]) -> None:
    root, _ = finished
    for command in ("show", "logs", "cancel"):
        result = nomaflow(root, command, "ffffffffffff")
        assert result.returncode == 2, (command, result.stderr)
        assert "ffffffffffff" in result.stderr and "nomaflow runs" in result.stderr, result.stderr


# --- cancel, follow, Ctrl-C ----------------------------------------------------------------


@pytest.fixture
def long_run(project: Path) -> Iterator[tuple[Live, str]]:
    """`nomaflow run` of the spec's long_loop over 100 000 items, started and looping."""
    job = write_job(project, "long", one_step("cli_steps:announced_long_loop", name="loop", cancel_grace_seconds=3,
                                              timeout_seconds=600))
    (project / job).write_text((project / job).read_text() + "[steps.op_kwargs]\ncount = 100000\n")
    live = Live(project, "run", job)
    try:
        run_id = live.wait_for(RUN_LINE.pattern).group(1)
        live.wait_for(r"INFO\s+loop looping$")
        yield live, run_id
    finally:
        live.kill()


def test_cancel_from_another_process_ends_the_run_cancelled_with_exit_130(project: Path, long_run: tuple[Live, str]) -> None:
    live, run_id = long_run
    result = nomaflow(project, "cancel", run_id)
    assert result.returncode == 0, result.stderr
    asked = time.monotonic()
    assert live.finish(timeout=3 + 20) == 130, live.stderr
    assert time.monotonic() - asked < 3 + 15
    doc = show_json(project, run_id)
    assert (doc["status"], doc["steps"][0]["status"]) == ("CANCELLED", "CANCELLED")
    logs = nomaflow(project, "logs", run_id).stdout
    assert re.search(r"WARNING\s+loop cancelled at item \d+/100000", logs), logs


def test_ctrl_c_cancels_the_run_and_exits_130(project: Path, long_run: tuple[Live, str]) -> None:
    live, run_id = long_run
    live.proc.send_signal(signal.SIGINT)
    assert live.finish(timeout=3 + 20) == 130, live.stderr
    assert show_json(project, run_id)["status"] == "CANCELLED"


def test_logs_follow_prints_lines_as_they_come_and_exits_when_the_run_ends(project: Path) -> None:
    job = write_job(project, "ticks", one_step("cli_steps:ticker", name="tick"))
    (project / job).write_text((project / job).read_text() + "[steps.op_kwargs]\nticks = 16\n")
    run = Live(project, "run", job)
    follow = None
    try:
        run_id = run.wait_for(RUN_LINE.pattern).group(1)
        run.wait_for(r"tick 0$")
        follow = Live(project, "logs", run_id, "--follow")
        follow.wait_for(r"INFO\s+tick tick 1$", timeout=20)
        assert run.proc.poll() is None, "the run ended before follow printed anything: nothing was followed"
        assert run.finish() == 0, run.stderr
        run_ended = time.monotonic()
        assert follow.finish(timeout=20) == 0, follow.stderr
        assert time.monotonic() - run_ended < 10
        ticks = [(at, line) for at, line in follow.stdout if re.search(r"INFO\s+tick tick \d+$", line)]
        assert [line.rsplit(" ", 1)[1] for _, line in ticks] == [str(i) for i in range(16)]
        assert ticks[0][0] < run_ended
        assert ticks[-1][0] - ticks[0][0] > 1.0, "the lines came all at once, not as the run wrote them"
    finally:
        run.kill()
        if follow is not None:
            follow.kill()


# --- bad input ----------------------------------------------------------------------


def assert_usage_error(result: subprocess.CompletedProcess[str], *names: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    for name in names:
        assert name in result.stderr, f"{name!r} not named in: {result.stderr}"
    assert "Traceback" not in result.stderr


def test_malformed_toml_exits_2_naming_the_file(project: Path) -> None:
    (project / "jobs" / "broken.toml").write_text('name = "x"\n[[steps]\n')
    assert_usage_error(nomaflow(project, "run", "jobs/broken.toml"), "jobs/broken.toml", "line 2")


def test_unknown_key_exits_2_naming_the_file_the_key_and_the_expected_keys(project: Path) -> None:
    job = write_job(project, "typo", one_step("cli_steps:echo", timout_seconds=3))
    assert_usage_error(nomaflow(project, "run", job), job, "steps[0]", "timout_seconds", "timeout_seconds")


def test_wrong_type_exits_2_naming_the_file_the_key_and_the_expected_type(project: Path) -> None:
    job = write_job(project, "typed", {"name": "s", "python": "cli_steps:echo", "timeout_seconds": "ten"})
    assert_usage_error(nomaflow(project, "run", job), job, "steps[0].timeout_seconds", "expected a number", "'ten'")


def test_wrong_type_in_nomaflow_toml_defaults_names_the_full_key(project: Path) -> None:
    (project / "nomaflow.toml").write_text('[defaults]\ntimeout_seconds = "ten"\n')
    job = write_job(project, "good", one_step("cli_steps:echo"))
    assert_usage_error(nomaflow(project, "run", job), "nomaflow.toml", "defaults.timeout_seconds", "expected a number")


def test_missing_job_file_exits_2_naming_it(project: Path) -> None:
    assert_usage_error(nomaflow(project, "run", "jobs/nowhere.toml"), "jobs/nowhere.toml", "not found")


def test_missing_plugins_dir_exits_2_naming_it(project: Path) -> None:
    (project / "nomaflow.toml").write_text('plugins = "no-such-plugins"\nhistory = "h.db"\n')
    job = write_job(project, "good", one_step("cli_steps:echo"))
    assert_usage_error(nomaflow(project, "run", job), str(project / "no-such-plugins"), "plugins")


def test_bad_param_exits_2_naming_it(project: Path) -> None:
    job = write_job(project, "good", one_step("cli_steps:echo"))
    assert_usage_error(nomaflow(project, "run", job, "--param", "novalue"), "--param", "novalue", "key=value")


@pytest.mark.parametrize(
    "command",
    [[], ["run"], ["step"], ["runs"], ["show"], ["logs"], ["cancel"], ["doctor"],
     ["connectors"], ["connectors", "list"], ["connectors", "test"], ["connectors", "encrypt"]],
    ids=lambda c: " ".join(c) or "nomaflow",
)
def test_help_of_every_command_exits_0(tmp_path: Path, command: list[str]) -> None:
    result = nomaflow(tmp_path, *command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage: nomaflow" in result.stdout


# --- doctor -------------------------------------------------------------------------


def test_doctor_json_lists_each_protection_with_an_active_flag(project: Path) -> None:
    result = nomaflow(project, "doctor", "--json")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    names = [p["name"] for p in found]
    for expected in ("cgroups", "memory limit", "pids limit", "subreaper", "landlock", "network namespace", "rlimits"):
        assert expected in names
    assert all(isinstance(p["active"], bool) and p["detail"] for p in found)
    assert {p["name"]: p["active"] for p in found}["rlimits"] is True


def test_doctor_prints_a_table_of_protections(project: Path) -> None:
    result = nomaflow(project, "doctor")
    assert result.returncode == 0, result.stderr
    assert re.search(r"│ landlock\s+│ (yes|no)\s+│", result.stdout), result.stdout
    assert re.search(r"│ rlimits\s+│ yes\s+│", result.stdout), result.stdout


# --- connectors ---------------------------------------------------------------------


SECRET = "s3cr3t-Pa55word-nobody-may-see"


def test_connectors_list_names_each_connector_and_no_secret(project: Path) -> None:
    sqlite_connectors(project)
    with (project / "connectors.toml").open("a") as f:
        f.write('[warehouse]\ntype = "postgres"\nhost = "127.0.0.1"\nport = 1\nuser = "u"\npassword_env = "WAREHOUSE_PW"\n')
    result = nomaflow(project, "connectors", "list", WAREHOUSE_PW=SECRET)
    assert result.returncode == 0, result.stderr
    assert re.search(r"local\s+│ sqlite\s+│ sqlite .*local\.db", result.stdout), result.stdout
    assert re.search(r"warehouse\s+│ postgres", result.stdout), result.stdout
    assert SECRET not in result.stdout + result.stderr


def test_connectors_test_of_an_sqlite_connector_prints_ok(project: Path) -> None:
    sqlite_connectors(project)
    result = nomaflow(project, "connectors", "test", "local")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("local: OK")


def test_connectors_test_of_an_unreachable_server_fails_without_printing_the_secret(project: Path) -> None:
    (project / "connectors.toml").write_text(
        '[warehouse]\ntype = "postgres"\nhost = "127.0.0.1"\nport = 1\nuser = "u"\npassword_env = "WAREHOUSE_PW"\n'
        "timeout_seconds = 2\n"
    )
    result = nomaflow(project, "connectors", "test", "warehouse", WAREHOUSE_PW=SECRET)
    assert result.returncode == 1
    assert "warehouse: FAILED" in result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_connectors_encrypt_reads_stdin_and_gives_a_value_password_encrypted_accepts(project: Path) -> None:
    key = nomaflow(project, "connectors", "encrypt", "--generate-key").stdout.strip()
    result = nomaflow(project, "connectors", "encrypt", stdin=SECRET + "\n", **{SECRET_KEY_ENV: key})
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert SECRET not in token
    assert decrypt_secret(token, key) == SECRET
    (project / "connectors.toml").write_text(
        f'[warehouse]\ntype = "postgres"\nhost = "127.0.0.1"\nuser = "u"\npassword_encrypted = "{token}"\n'
    )
    configs = load_connectors(project / "connectors.toml", environ={SECRET_KEY_ENV: key})
    assert configs["warehouse"].params["password"] == SECRET


def test_connectors_encrypt_generate_key_prints_a_fresh_key_each_time(project: Path) -> None:
    first = nomaflow(project, "connectors", "encrypt", "--generate-key")
    second = nomaflow(project, "connectors", "encrypt", "--generate-key")
    assert first.returncode == second.returncode == 0
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}=\n", first.stdout), first.stdout
    assert first.stdout != second.stdout


def test_connectors_encrypt_without_a_key_exits_2_naming_the_variable(project: Path) -> None:
    env_without_key = {k: v for k, v in os.environ.items() if k != SECRET_KEY_ENV}
    result = subprocess.run(
        [str(NOMAFLOW), "connectors", "encrypt"], cwd=project, input=SECRET, capture_output=True, text=True,
        timeout=60, env=env_without_key,
    )
    assert_usage_error(result, SECRET_KEY_ENV)


# --- the README's demo ----------------------------------------------------------------


def test_demo_job_runs_from_a_copy_of_the_repo_with_every_step_succeeded(tmp_path: Path) -> None:
    for name in ("jobs", "plugins"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    if (ROOT / "connectors.toml").exists():
        shutil.copy(ROOT / "connectors.toml", tmp_path / "connectors.toml")
    result = nomaflow(tmp_path, "run", "jobs/demo.toml", "--json", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    assert doc["status"] == "SUCCEEDED"
    assert [s["status"] for s in doc["steps"]] == ["SUCCEEDED"] * len(doc["steps"])
    assert len(doc["steps"]) >= 5
