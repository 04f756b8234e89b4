"""Every example plugin of the spec, run against build_fake_ctx with real effects."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import os
import subprocess
import sys
import time
import tomllib
import zlib
from pathlib import Path

import psutil
import pytest

import housekeeping
from examples.cancellation import long_loop, long_loop_range
from examples.chaining import fetch_releases, upsert_releases
from examples.connectors_demo import refresh_view
from examples.cpu_bound import blocking_pdf_render, render_pdf
from examples.failures import check_upstream
from examples.heartbeat import big_etl
from examples.logging_demo import log_levels
from liberty.jobs.testing import FakeSqlConnector, build_fake_ctx
from reports import orders_summary, summary
from reports.housekeeping import prune_attachments
from utils.connectors import assert_row_count

_ROOT = Path(__file__).resolve().parents[2]
_PLUGINS = _ROOT / "plugins"
_JOBS = _ROOT / "jobs"


class _Sql:
    """A connector double: `scalar` answers one value; every statement is recorded."""

    def __init__(self, value):
        self.value = value
        self.statements: list[str] = []

    async def scalar(self, sql):
        self.statements.append(sql)
        return self.value

    async def execute(self, sql):
        self.statements.append(sql)
        return 0


def _resolve(reference: str):
    module, _, function = reference.partition(":")
    return getattr(importlib.import_module(module), function)


# reports.summary -----------------------------------------------------------


@pytest.mark.asyncio
async def test_generate_monthly_writes_a_pdf_of_the_reported_size(tmp_path):
    target = tmp_path / "out.pdf"
    result = await summary.generate_monthly(build_fake_ctx(), period="2026-04", target_path=str(target))
    assert result == {"path": str(target), "size_bytes": target.stat().st_size}
    assert target.read_bytes().startswith(b"%PDF-1.4") and target.read_bytes().endswith(b"%%EOF\n")


@pytest.mark.asyncio
async def test_generate_monthly_logs_the_period_last(tmp_path):
    ctx = build_fake_ctx()
    await summary.generate_monthly(ctx, period="2026-04", target_path=str(tmp_path / "x.pdf"))
    assert ctx.log.calls[-1] == ("INFO", "wrote 2026-04 summary")


@pytest.mark.asyncio
async def test_generate_monthly_creates_missing_parent_directories(tmp_path):
    target = tmp_path / "a" / "b" / "out.pdf"
    await summary.generate_monthly(build_fake_ctx(), period="2026-04", target_path=str(target))
    assert target.is_file()


@pytest.mark.asyncio
async def test_generate_monthly_pdf_xref_offsets_point_at_objects(tmp_path):
    target = tmp_path / "out.pdf"
    await summary.generate_monthly(build_fake_ctx(), period="2026-04", target_path=str(target))
    pdf = target.read_bytes()
    xref_at = int(pdf.rsplit(b"startxref\n", 1)[1].split(b"\n")[0])
    offsets = [int(line[:10]) for line in pdf[xref_at:].split(b"\n")[3:8]]
    assert [pdf[o : o + 8] for o in offsets] == [b"%d 0 obj\n" % n for n in range(1, 6)]


# utils.connectors and reports.orders_summary --------------------------------


@pytest.mark.asyncio
async def test_assert_row_count_returns_the_count():
    target = _Sql(150)
    assert await assert_row_count(target, "SELECT 1", min_rows=100) == 150
    assert target.statements == ["SELECT 1"]


@pytest.mark.asyncio
async def test_assert_row_count_below_floor_raises_with_both_numbers():
    with pytest.raises(RuntimeError, match="row count 5 below floor 100"):
        await assert_row_count(_Sql(5), "SELECT 1", min_rows=100)


@pytest.mark.asyncio
async def test_orders_generate_monthly_counts_orders_on_the_reporting_connector():
    reporting = _Sql(250)
    ctx = build_fake_ctx(connectors={"reporting": reporting})
    assert await orders_summary.generate_monthly(ctx, period="2026-04") == {
        "period": "2026-04",
        "orders": 250,
    }
    assert reporting.statements == ["SELECT count(*) FROM orders"]


@pytest.mark.asyncio
async def test_orders_generate_monthly_fails_below_the_floor():
    ctx = build_fake_ctx(connectors={"reporting": _Sql(99)})
    with pytest.raises(RuntimeError, match="row count 99 below floor 100"):
        await orders_summary.generate_monthly(ctx, period="2026-04")


@pytest.mark.asyncio
async def test_orders_generate_monthly_without_the_connector_names_it():
    with pytest.raises(LookupError, match="'reporting'"):
        await orders_summary.generate_monthly(build_fake_ctx(), period="2026-04")


# housekeeping ---------------------------------------------------------------


def _aged_file(path: Path, days: float) -> Path:
    path.write_text("x")
    then = time.time() - days * 86_400
    os.utime(path, (then, then))
    return path


@pytest.mark.asyncio
async def test_prune_attachments_deletes_only_files_older_than_the_cutoff(tmp_path):
    old = _aged_file(tmp_path / "old.bin", 40)
    new = _aged_file(tmp_path / "new.bin", 1)
    result = await prune_attachments(build_fake_ctx(), directory=str(tmp_path), older_than_days=30)
    assert result == {"deleted": 1, "kept": 1}
    assert (old.exists(), new.exists()) == (False, True)


@pytest.mark.asyncio
async def test_prune_attachments_leaves_subdirectories_alone(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    _aged_file(sub / "old.bin", 40)
    os.utime(sub, (0, 0))
    result = await prune_attachments(build_fake_ctx(), directory=str(tmp_path), older_than_days=30)
    assert result == {"deleted": 0, "kept": 0}
    assert (sub / "old.bin").exists()


@pytest.mark.asyncio
async def test_prune_attachments_without_a_directory_has_nothing_to_do():
    ctx = build_fake_ctx()
    assert await prune_attachments(ctx) == {"deleted": 0, "kept": 0}
    assert ctx.log.calls == [("INFO", "no directory given — nothing to prune")]


@pytest.mark.asyncio
async def test_prune_attachments_cancelled_deletes_nothing(tmp_path):
    old = _aged_file(tmp_path / "old.bin", 40)
    ctx = build_fake_ctx()
    ctx.cancel()
    with pytest.raises(asyncio.CancelledError):
        await prune_attachments(ctx, directory=str(tmp_path))
    assert old.exists()


def test_housekeeping_reference_resolves_to_the_same_function():
    assert _resolve("housekeeping:prune_attachments") is prune_attachments
    assert housekeeping.prune_attachments is prune_attachments


# examples -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_log_levels_emits_the_four_logging_lines():
    ctx = build_fake_ctx()
    assert await log_levels(ctx, n=5, row_id=7) == {"lines_logged": 4}
    assert ctx.log.calls == [
        ("INFO", "starting batch"),
        ("INFO", "▶ batch 1 of 5"),
        ("WARNING", "missing field on row 7 — skipping"),
        ("ERROR", "upstream returned 500 — retry policy will decide"),
    ]


@pytest.mark.asyncio
async def test_refresh_view_refreshes_then_counts_on_the_named_connector():
    warehouse = _Sql(321)
    ctx = build_fake_ctx(connectors={"warehouse": warehouse})
    assert await refresh_view(ctx, target_connector="warehouse") == {"rows_after_refresh": 321}
    assert warehouse.statements == [
        "REFRESH MATERIALIZED VIEW reporting.daily_summary",
        "SELECT count(*) FROM reporting.daily_summary",
    ]
    assert ctx.log.calls == [("INFO", "refreshed view · 321 rows")]


@pytest.mark.asyncio
async def test_fetch_releases_returns_the_given_releases_as_body():
    result = await fetch_releases(build_fake_ctx(), releases=[{"tag": "v9"}])
    assert result["body"] == [{"tag": "v9"}]


@pytest.mark.asyncio
async def test_fetch_releases_output_is_json_serialisable():
    result = await fetch_releases(build_fake_ctx())
    assert json.loads(json.dumps(result)) == result
    assert len(result["body"]) == 3


@pytest.mark.asyncio
async def test_upsert_releases_counts_the_previous_steps_body():
    ctx = build_fake_ctx(
        previous_steps={"fetch-releases": {"status": "SUCCEEDED", "output": {"body": [1, 2, 3, 4]}}}
    )
    assert await upsert_releases(ctx) == {"upserted": 4}
    assert ctx.log.calls == [("INFO", "upserted 4 releases")]


@pytest.mark.asyncio
async def test_upsert_releases_refuses_after_a_failed_fetch():
    ctx = build_fake_ctx(previous_steps={"fetch-releases": {"status": "FAILED"}})
    with pytest.raises(RuntimeError, match="refusing to upsert"):
        await upsert_releases(ctx)


@pytest.mark.asyncio
async def test_long_loop_returns_the_processed_count():
    assert await long_loop(build_fake_ctx(), items=list(range(150))) == {"processed": 150}


@pytest.mark.asyncio
async def test_long_loop_cancelled_before_start_raises_and_logs_item_zero():
    ctx = build_fake_ctx()
    ctx.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long_loop(ctx, items=list(range(250)))
    assert ctx.log.calls == [("WARNING", "cancelled at item 0/250")]


@pytest.mark.asyncio
async def test_long_loop_cancelled_mid_run_stops_at_the_next_checkpoint():
    ctx = build_fake_ctx()
    # Loop timers fire in deadline order, so this lands before item 100's 5 ms sleep ends.
    asyncio.get_running_loop().call_later(0.02, ctx.cancel)
    with pytest.raises(asyncio.CancelledError):
        await long_loop(ctx, items=list(range(300)))
    assert ctx.log.calls == [("WARNING", "cancelled at item 100/300")]


@pytest.mark.asyncio
async def test_long_loop_range_loops_over_count_items():
    ctx = build_fake_ctx()
    ctx.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long_loop_range(ctx, count=100_000)
    assert ctx.log.calls == [("WARNING", "cancelled at item 0/100000")]


@pytest.mark.asyncio
async def test_render_pdf_reports_the_rendered_size():
    data = {"title": "t", "totals": [1, 2]}
    assert await render_pdf(build_fake_ctx(), data=data) == {"bytes": len(blocking_pdf_render(data))}


def test_blocking_pdf_render_deflates_pages_that_contain_the_data():
    pdf = blocking_pdf_render({"title": "Orders"}, pages=2)
    first = pdf.split(b"stream\n", 1)[1].split(b"\nendstream", 1)[0]
    assert b'(1.1) {"title": "Orders"}' in zlib.decompress(first)
    assert pdf.count(b"endobj") == 2


@pytest.mark.asyncio
async def test_check_upstream_raises_with_the_status_and_body():
    with pytest.raises(RuntimeError, match="upstream returned 503 — body: busy"):
        await check_upstream(build_fake_ctx(), status_code=503, body="busy")


@pytest.mark.asyncio
async def test_check_upstream_truncates_the_body_to_200_characters():
    with pytest.raises(RuntimeError) as info:
        await check_upstream(build_fake_ctx(), status_code=500, body="x" * 500)
    assert str(info.value).endswith("body: " + "x" * 200)


@pytest.mark.asyncio
async def test_check_upstream_fails_by_default():
    with pytest.raises(RuntimeError, match="upstream returned 500"):
        await check_upstream(build_fake_ctx())


@pytest.mark.asyncio
async def test_check_upstream_succeeds_on_200():
    assert await check_upstream(build_fake_ctx(), status_code=200) == {"status_code": 200}


@pytest.mark.asyncio
async def test_big_etl_processes_all_rows_with_a_progress_line_every_50k():
    ctx = build_fake_ctx()
    assert await big_etl(ctx) == {"rows": 1_000_000}
    assert len(ctx.log.calls) == 20
    assert ctx.log.calls[0] == ("INFO", "▶ 50000 / 1000000 (5%)")
    assert ctx.log.calls[-1] == ("INFO", "▶ 1000000 / 1000000 (100%)")


@pytest.mark.asyncio
async def test_big_etl_cancelled_stops_after_the_first_batch():
    ctx = build_fake_ctx()
    ctx.cancel()
    with pytest.raises(asyncio.CancelledError):
        await big_etl(ctx)
    assert ctx.log.calls == []


def test_spin_forever_never_returns_and_burns_cpu():
    probe = (
        "import asyncio\n"
        "from liberty.jobs.testing import FakeSqlConnector, build_fake_ctx\n"
        "from examples.hostile import spin_forever\n"
        "asyncio.run(spin_forever(build_fake_ctx()))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_ROOT / "src"), str(_PLUGINS)])}
    proc = subprocess.Popen([sys.executable, "-c", probe], env=env)
    try:
        spinner = psutil.Process(proc.pid)
        deadline = time.monotonic() + 30
        while spinner.cpu_times().user < 1.0 and time.monotonic() < deadline:
            assert proc.poll() is None, "spin_forever returned"
            time.sleep(0.1)
        assert spinner.cpu_times().user >= 1.0
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


# job files ------------------------------------------------------------------


def _steps(job_file: str) -> tuple[dict, list[dict]]:
    job = tomllib.loads((_JOBS / job_file).read_text())
    return job.get("params", {}), job["steps"]


@pytest.mark.parametrize("job_file", ["demo.toml", "cancel_demo.toml", "timeout_demo.toml"])
def test_job_file_steps_bind_to_their_functions(job_file):
    params, steps = _steps(job_file)
    for step in steps:
        function = _resolve(step["python"])
        assert inspect.iscoroutinefunction(function), step["name"]
        inspect.signature(function).bind(build_fake_ctx(), **(params | step.get("op_kwargs", {})))


@pytest.mark.asyncio
async def test_demo_job_runs_in_order_against_fake_contexts_within_seconds():
    params, steps = _steps("demo.toml")
    records: dict[str, dict] = {}
    reporting = FakeSqlConnector()  # the demo's `reporting` connector, in-process
    started = time.monotonic()
    for step in steps:
        kwargs = params | step.get("op_kwargs", {})
        connectors = {name: reporting for name in step.get("connectors", [])}
        ctx = build_fake_ctx(params=kwargs, previous_steps=records, job_id="demo", connectors=connectors)
        output = await _resolve(step["python"])(ctx, **kwargs)
        records[step["name"]] = {"status": "SUCCEEDED", "output": json.loads(json.dumps(output))}
    assert time.monotonic() - started < 5
    assert records["upsert-releases"]["output"] == {"upserted": 3}
    assert records["long-loop"]["output"] == {"processed": 300}
    assert records["heartbeat"]["output"] == {"rows": 1_000_000}
    assert records["generate"]["output"]["size_bytes"] > 0


def test_demo_job_step_names_are_unique():
    _, steps = _steps("demo.toml")
    names = [step["name"] for step in steps]
    assert len(names) == len(set(names))


def test_cancel_demo_runs_long_enough_to_cancel_by_hand():
    _, [step] = _steps("cancel_demo.toml")
    # ~5 ms per item: at least a few minutes of work.
    assert step["op_kwargs"]["count"] * 0.005 > 120


def test_timeout_demo_times_out_quickly():
    _, [step] = _steps("timeout_demo.toml")
    assert (step["timeout_seconds"], step["cancel_grace_seconds"]) == (2, 1)
