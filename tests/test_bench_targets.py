"""`make bench` ends with a verdict per target; these pin how a figure is judged against its bound."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_run", Path(__file__).resolve().parents[1] / "bench" / "run.py")
assert _spec is not None and _spec.loader is not None
bench_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_run)


def _results(**overrides: float) -> dict:
    figures = {"conc": 2.1, "seq": 1.5, "latency": 1.6, "log": 0.9, "rss": 0.04, "cancel": 61.0}
    figures.update(overrides)
    return {
        "throughput": {"runs_per_round": 100, "ratio_concurrent_vs_pool": figures["conc"], "ratio_sequential_vs_pool": figures["seq"], "target_ratio": 2.0},
        "start_latency": {"ratio_p50_vs_raw_fork": figures["latency"], "target_ratio_p50_vs_raw_fork": 3.0},
        "log_throughput": {"ratio_vs_raw_pipe": figures["log"], "target_ratio": 0.5},
        "concurrency": {
            "concurrent_idle_steps": 200,
            "supervisor_rss_mib_per_idle_step": figures["rss"],
            "target_rss_mib_per_step": 2.0,
            "cancel_one_max_ms": figures["cancel"],
            "target_cancel_ms": 100.0,
        },
    }


def _verdicts(results: dict) -> dict[str, bool]:
    return {row["target"]: row["met"] for row in bench_run.targets(results)}


def test_a_throughput_below_its_floor_is_missed_and_one_above_is_met():
    verdicts = _verdicts(_results())
    assert verdicts["throughput, 100 concurrent runs, vs the pool"] is True
    assert verdicts["throughput, sequential runs, vs the pool"] is False


def test_a_latency_or_cost_over_its_ceiling_is_missed():
    verdicts = _verdicts(_results(latency=3.2, cancel=140.0))
    assert verdicts["start latency p50 vs raw fork"] is False
    assert verdicts["cancel with 200 running, slowest"] is False
    assert verdicts["supervisor RSS per idle step, 200 running"] is True


def test_a_figure_exactly_on_its_bound_meets_it():
    verdicts = _verdicts(_results(seq=2.0, latency=3.0, log=0.5))
    assert verdicts["throughput, sequential runs, vs the pool"] is True
    assert verdicts["start latency p50 vs raw fork"] is True
    assert verdicts["log lines/s vs raw pipe"] is True


def test_only_the_sections_that_ran_are_judged():
    results = _results()
    del results["concurrency"]
    results["connectors"] = {
        "round_trip": {"ratio": 1.1, "target": 2.0, "met": True},
        "stream": {"ratio": 3.4, "target": 3.0, "met": False},
    }
    verdicts = _verdicts(results)
    assert not any("running" in name for name in verdicts)
    assert verdicts["connector round trip vs baseline"] is True
    assert verdicts["connector stream vs baseline"] is False


def test_a_connector_section_keeps_its_own_verdict_on_the_unrounded_ratio():
    results = _results()
    results["connectors"] = {"round_trip": {"ratio": 2.0, "target": 2.0, "met": False}}  # 2.004 rounded to 2.0
    assert _verdicts(results)["connector round trip vs baseline"] is False


def test_the_concurrent_target_names_the_runs_it_measured():
    results = _results()
    results["throughput"]["runs_per_round"] = 20
    assert "throughput, 20 concurrent runs, vs the pool" in _verdicts(results)
