"""The bench's CPU figures: what a run and a pool task cost the machine, and the ceiling that cost sets."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", _BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cpu_meter = _load("cpu_meter")
bench_run = _load("run")


def test_busy_time_counts_user_nice_system_irq_softirq_but_not_idle_iowait_or_steal():
    line = "cpu  100 20 30 1000 50 5 5 7 0 0"
    assert cpu_meter.parse_busy_seconds(line, 100) == pytest.approx(1.6)


def test_a_line_that_is_not_the_summary_cpu_line_is_refused():
    with pytest.raises(ValueError, match="summary cpu line"):
        cpu_meter.parse_busy_seconds("cpu0 1 2 3 4 5 6 7", 100)
    with pytest.raises(ValueError, match="expected at least 7"):
        cpu_meter.parse_busy_seconds("cpu 1 2 3", 100)


def test_the_meter_sees_the_cpu_a_child_process_burns():
    before = cpu_meter.busy_seconds()
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\n"
    subprocess.run([sys.executable, "-c", spin], check=True)
    after = cpu_meter.busy_seconds()
    assert before is not None and after is not None
    assert after - before >= 0.3  # the machine may have been busier, never less busy


def test_cpu_per_item_is_the_busy_time_between_two_readings_shared_out():
    assert cpu_meter.cpu_ms_per_item(10.0, 10.5, 100) == pytest.approx(5.0)
    assert cpu_meter.cpu_ms_per_item(None, 10.5, 100) is None
    assert cpu_meter.cpu_ms_per_item(10.0, 10.5, 0) is None


def test_the_ceiling_is_what_every_cpu_busy_could_pay_for_against_the_pool():
    # 2 CPUs at 10 ms a run pay for 200 runs/s: twice a pool of 100 tasks/s.
    assert cpu_meter.cpu_bound_ceiling(2, 10.0, 100.0) == pytest.approx(2.0)
    assert cpu_meter.cpu_bound_ceiling(2, 12.5, 100.0) == pytest.approx(1.6)


def test_the_bench_reports_median_costs_and_the_median_round_ceiling():
    cost = bench_run.cpu_cost([9.0, 10.0, 12.0], [8.0, 8.5, 9.0], [18.0, 20.0, 17.0], [100.0, 100.0, 125.0])
    assert cost["cpu_ms_per_step_sequential"] == 10.0
    assert cost["cpu_ms_per_step_concurrent"] == 8.5
    assert cost["cpu_ms_per_pool_task"] == 18.0
    # One ceiling per round, each against that round's pool; the median one is reported.
    cpus = bench_run.os.cpu_count()
    ceilings = sorted([cpus * 1000 / 9 / 100, cpus * 1000 / 10 / 100, cpus * 1000 / 12 / 125])
    assert cost["sequential_ceiling_vs_pool"] == pytest.approx(ceilings[1])


def test_the_bench_says_so_when_a_round_could_not_be_measured():
    cost = bench_run.cpu_cost([9.0, None], [8.0, 8.5], [18.0, 20.0], [100.0, 100.0])
    assert cost == {"cpu_per_step": "not measured: /proc/stat cannot be read here"}
