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


def test_throughput_rounds_pair_each_round_and_alternate_which_side_goes_first(monkeypatch):
    """The ratio is taken within a round, and every other round the runner goes first, so a load
    that moves between turns does not always land on the same side.  The measurements are
    stand-ins here: what is pinned is the bookkeeping, not this machine's speed."""
    import trio

    order: list[str] = []
    pool_rates = iter([100.0, 50.0, 80.0])
    runner_rates = iter([210.0, 220.0, 90.0, 95.0, 170.0, 180.0])

    def pool(m: int) -> tuple[float, float]:
        order.append("pool")
        return next(pool_rates), 20.0

    async def sequential(sup: object, m: int) -> tuple[float, float]:
        order.append("seq")
        return next(runner_rates), 10.0

    async def concurrent(sup: object, m: int) -> tuple[float, float]:
        order.append("conc")
        return next(runner_rates), 9.0

    monkeypatch.setattr(bench_run, "baseline_forkserver_pool", pool)
    monkeypatch.setattr(bench_run, "runner_throughput_sequential", sequential)
    monkeypatch.setattr(bench_run, "runner_throughput_concurrent", concurrent)
    results = trio.run(lambda: bench_run.throughput_rounds(None, m=100, rounds=3))

    assert order == ["pool", "seq", "conc", "seq", "conc", "pool", "pool", "seq", "conc"]
    assert results["ratio_sequential_vs_pool_each_round"] == [2.1, 1.8, 2.125]
    assert results["ratio_concurrent_vs_pool_each_round"] == [2.2, 1.9, 2.25]
    assert results["ratio_sequential_vs_pool"] == 2.1
