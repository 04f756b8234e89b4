"""The testing kit: build_fake_ctx, FakeStepContext and the `fake_ctx` pytest plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import liberty.jobs.testing as kit
from liberty.jobs.testing import FakeStepContext, build_fake_ctx
from liberty.jobs.types import StepContext, StepRecord

_SRC = Path(kit.__file__).resolve().parents[2]
_PYPROJECT = _SRC.parent / "pyproject.toml"


def test_fake_ctx_satisfies_the_step_context_protocol():
    assert isinstance(build_fake_ctx(), StepContext)


@pytest.mark.parametrize("level", ["DEBUG", "INFO", "WARNING", "ERROR"])
def test_each_log_method_records_its_level(level):
    ctx = build_fake_ctx()
    getattr(ctx.log, level.lower())("hello")
    assert ctx.log.calls == [(level, "hello")]


def test_log_records_calls_in_order():
    ctx = build_fake_ctx()
    ctx.log.info("one")
    ctx.log.error("two")
    assert ctx.log.calls == [("INFO", "one"), ("ERROR", "two")]


def test_log_converts_messages_to_str():
    ctx = build_fake_ctx()
    ctx.log.warning(42)
    assert ctx.log.calls == [("WARNING", "42")]


def test_debug_lines_are_kept_at_info_level():
    ctx = build_fake_ctx(log_level="INFO")
    ctx.log.debug("verbose")
    assert ctx.log.calls == [("DEBUG", "verbose")]


def test_params_is_a_snapshot_of_the_given_dict():
    given = {"period": "2026-04"}
    ctx = build_fake_ctx(params=given)
    given["period"] = "changed"
    assert ctx.params == {"period": "2026-04"}


def test_params_default_to_an_empty_dict():
    assert build_fake_ctx().params == {}


def test_identity_fields_have_test_defaults():
    ctx = build_fake_ctx()
    assert (ctx.session_user, ctx.run_id, ctx.job_id, ctx.log_level) == (
        "test",
        "fake-run",
        "fake-job",
        "INFO",
    )


def test_identity_fields_can_be_overridden():
    ctx = build_fake_ctx(session_user="cron", run_id="r1", job_id="j1", log_level="DEBUG")
    assert (ctx.session_user, ctx.run_id, ctx.job_id, ctx.log_level) == ("cron", "r1", "j1", "DEBUG")


def test_unknown_log_level_is_rejected():
    with pytest.raises(ValueError, match="'VERBOSE'"):
        build_fake_ctx(log_level="VERBOSE")


def test_get_connector_returns_the_object_given():
    connector = object()
    assert build_fake_ctx(connectors={"reporting": connector}).get_connector("reporting") is connector


def test_get_connector_unknown_names_the_name_and_the_available_ones():
    ctx = build_fake_ctx(connectors={"reporting": object(), "crm": object()})
    with pytest.raises(LookupError, match=r"'warehouse'.*available: 'crm', 'reporting'"):
        ctx.get_connector("warehouse")


def test_get_connector_without_connectors_says_none_are_available():
    with pytest.raises(LookupError, match="available: none"):
        build_fake_ctx().get_connector("reporting")


def test_previous_step_converts_a_dict_to_a_step_record():
    ctx = build_fake_ctx(
        previous_steps={
            "fetch": {"status": "FAILED", "output": {"n": 1}, "attempts": 3, "error": {"type": "X"}}
        }
    )
    assert ctx.previous_step("fetch") == StepRecord(
        name="fetch", status="FAILED", output={"n": 1}, attempts=3, error={"type": "X"}
    )


def test_previous_step_dict_defaults_to_one_successful_attempt():
    record = build_fake_ctx(previous_steps={"fetch": {"output": 7}}).previous_step("fetch")
    assert (record.status, record.attempts, record.output, record.error) == ("SUCCEEDED", 1, 7, None)


def test_previous_step_status_is_a_plain_string():
    record = build_fake_ctx(previous_steps={"fetch": {}}).previous_step("fetch")
    assert type(record.status) is str


def test_previous_step_returns_a_given_step_record_unchanged():
    record = StepRecord(name="fetch", status="SUCCEEDED", output={"body": []}, attempts=1)
    assert build_fake_ctx(previous_steps={"fetch": record}).previous_step("fetch") is record


def test_previous_step_unknown_names_the_available_ones():
    ctx = build_fake_ctx(previous_steps={"fetch": {}, "generate": {}})
    with pytest.raises(LookupError, match=r"'render'.*available: 'fetch', 'generate'"):
        ctx.previous_step("render")


def test_previous_step_dict_with_an_unknown_key_is_rejected():
    with pytest.raises(ValueError, match=r"previous_steps\['fetch'\].*\['outptu'\]"):
        build_fake_ctx(previous_steps={"fetch": {"outptu": 1}})


def test_previous_step_dict_with_an_unknown_status_is_rejected():
    with pytest.raises(ValueError, match="'SUCCESS'"):
        build_fake_ctx(previous_steps={"fetch": {"status": "SUCCESS"}})


def test_previous_step_value_of_the_wrong_type_is_rejected():
    with pytest.raises(TypeError, match=r"previous_steps\['fetch'\] is a list"):
        build_fake_ctx(previous_steps={"fetch": [1, 2]})


def test_a_new_context_is_not_cancelled():
    assert build_fake_ctx().is_cancelled() is False


def test_cancel_makes_is_cancelled_true():
    ctx = build_fake_ctx()
    ctx.cancel()
    assert ctx.is_cancelled() is True


def test_fake_ctx_fixture_is_a_default_fake_context(fake_ctx):
    assert isinstance(fake_ctx, FakeStepContext)
    assert (fake_ctx.params, fake_ctx.log.calls, fake_ctx.is_cancelled()) == ({}, [], False)


def test_importing_the_kit_pulls_in_only_liberty_attrs_and_the_stdlib():
    probe = textwrap.dedent(
        """
        import json, sys
        import pytest
        before = set(sys.modules)
        import liberty.jobs.testing
        new = {m.split(".")[0] for m in set(sys.modules) - before}
        print(json.dumps(sorted(new - set(sys.stdlib_module_names))))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "PYTHONPATH": str(_SRC)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert set(json.loads(out)) <= {"liberty", "attr", "attrs"}


def test_importing_the_kit_does_not_import_trio():
    probe = "import sys, liberty.jobs.testing; print('trio' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "PYTHONPATH": str(_SRC)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "False"


_PLUGIN = '''
from liberty.jobs.types import StepContext

async def count_rows(ctx: StepContext, *, table: str, **_) -> dict:
    db = ctx.get_connector("db")
    n = await db.scalar(f"SELECT count(*) FROM {table}")
    ctx.log.info(f"{table}: {n} rows")
    return {"rows": n}
'''

_PLUGIN_TESTS = '''
import pytest
from liberty.jobs.testing import build_fake_ctx
from myplugin import count_rows


class _Db:
    async def scalar(self, sql):
        return 12 if sql == "SELECT count(*) FROM orders" else -1


@pytest.mark.asyncio
async def test_count_rows():
    ctx = build_fake_ctx(connectors={"db": _Db()})
    assert await count_rows(ctx, table="orders") == {"rows": 12}
    assert ctx.log.calls == [("INFO", "orders: 12 rows")]


@pytest.mark.asyncio
async def test_fixture_in_an_asyncio_test(fake_ctx):
    fake_ctx.log.info("first")
    fake_ctx.cancel()
    assert fake_ctx.log.calls == [("INFO", "first")]


@pytest.mark.asyncio
async def test_fixture_is_fresh_per_test(fake_ctx):
    assert fake_ctx.log.calls == []
    assert not fake_ctx.is_cancelled()
'''


def _write_plugin_project(root: Path) -> None:
    (root / "myplugin.py").write_text(_PLUGIN)
    (root / "test_myplugin.py").write_text(_PLUGIN_TESTS)
    (root / "pytest.ini").write_text("[pytest]\nasyncio_mode = strict\npythonpath = .\n")


def _run_pytest(root: Path, *args: str, pythonpath: list[Path]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in pythonpath)}
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


def _nomaflow_entry_point_installed() -> bool:
    return bool(entry_points(group="pytest11", name="nomaflow"))


def test_plugin_authors_pytest_asyncio_tests_pass_with_the_kit(tmp_path):
    _write_plugin_project(tmp_path)
    # Installed, the entry point loads the plugin; naming it again would register it twice.
    load = [] if _nomaflow_entry_point_installed() else ["-p", "liberty.jobs.testing"]
    result = _run_pytest(tmp_path, *load, pythonpath=[_SRC])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout


def test_pyproject_entry_point_registers_the_fake_ctx_fixture(tmp_path):
    declared = tomllib.loads(_PYPROJECT.read_text())["project"]["entry-points"]["pytest11"]
    dist_info = tmp_path / "site" / "nomaflow_runner-0.0.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: nomaflow-runner\nVersion: 0.0.0\n")
    (dist_info / "entry_points.txt").write_text(
        "[pytest11]\n" + "".join(f"{name} = {target}\n" for name, target in declared.items())
    )
    project = tmp_path / "project"
    project.mkdir()
    _write_plugin_project(project)
    result = _run_pytest(project, pythonpath=[_SRC, tmp_path / "site"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout


# --- FakeSqlConnector ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_fake_sql_connector_runs_real_sql_with_the_runners_surface() -> None:
    from liberty.jobs.testing import FakeSqlConnector

    db = FakeSqlConnector()
    await db.execute("CREATE TABLE t (x INTEGER, y TEXT)")
    assert await db.executemany("INSERT INTO t VALUES (?, ?)", [(1, "a"), (2, "b"), (3, "c")]) == 3
    assert await db.scalar("SELECT count(*) FROM t WHERE x > ?", 1) == 2
    assert await db.fetchrow("SELECT y FROM t WHERE x = ?", 2) == {"y": "b"}
    assert await db.fetch("SELECT x FROM t ORDER BY x") == [{"x": 1}, {"x": 2}, {"x": 3}]
    assert [row["x"] async for row in db.stream("SELECT x FROM t ORDER BY x", batch_size=2)] == [1, 2, 3]


@pytest.mark.asyncio
async def test_fake_sql_connector_transaction_rolls_back_on_an_exception() -> None:
    from liberty.jobs.testing import FakeSqlConnector

    db = FakeSqlConnector()
    await db.execute("CREATE TABLE t (x INTEGER)")
    with pytest.raises(RuntimeError):
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO t VALUES (1)")
            raise RuntimeError("boom")
    assert await db.scalar("SELECT count(*) FROM t") == 0
    async with db.transaction() as tx:
        await tx.execute("INSERT INTO t VALUES (2)")
    assert await db.scalar("SELECT count(*) FROM t") == 1
