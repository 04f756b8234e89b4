"""Connector benchmarks, each a ratio against a baseline measured in the same run.

(a) round trip: `await target.scalar("SELECT 1")` on an SQLite `:memory:`
    connector, timed by the step itself, against a raw JSON-lines ping-pong
    between two processes (what crossing a pipe and back at least costs).
(b) stream: 1M small rows through `target.stream(...)`, timed by the step,
    against iterating the same query with `sqlite3` in-process.

Each is measured in `ROUNDS` rounds, a round being the baseline and then the
connector right after it, so that both see the same machine load; the ratio is
the median of the rounds' ratios, and every round is printed.

    python bench/connectors_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import trio

from liberty.jobs import Job, Limits, Step, Supervisor

ROUND_TRIP_TARGET = 2.0
STREAM_TARGET = 3.0
ROUNDS = 3
STREAM_SQL = "SELECT id, qty, code FROM items"

_STEPS = '''
import statistics
import time


async def round_trips(ctx, *, n, warmup, **_):
    target = ctx.get_connector("mem")
    for _ in range(warmup):
        await target.scalar("SELECT 1")
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        value = await target.scalar("SELECT 1")
        times.append(time.perf_counter() - t0)
        assert value == 1
    times.sort()
    return {"median": statistics.median(times), "p10": times[len(times) // 10], "p90": times[len(times) * 9 // 10],
            "min": times[0], "n": n}


async def stream_rows(ctx, *, sql, batch_size, **_):
    target = ctx.get_connector("big")
    t0 = time.perf_counter()
    rows = 0
    async for row in target.stream(sql, batch_size=batch_size):
        rows += 1
    return {"seconds": time.perf_counter() - t0, "rows": rows}
'''

_ECHO = textwrap.dedent(
    """
    import sys
    r, w = sys.stdin.buffer, sys.stdout.buffer
    for line in r:
        w.write(line)
        w.flush()
    """
)


def raw_pipe_round_trips(n: int, warmup: int) -> dict[str, float]:
    """Median of: parent writes one JSON line, the child echoes it, the parent reads and decodes it."""
    proc = subprocess.Popen([sys.executable, "-c", _ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    assert proc.stdin is not None and proc.stdout is not None
    message = {"t": "call", "id": 0, "connector": "mem", "method": "scalar", "args": ["SELECT 1"], "kwargs": {}, "tx": None}
    times = []
    try:
        for i in range(warmup + n):
            message["id"] = i
            t0 = time.perf_counter()
            proc.stdin.write(json.dumps(message).encode() + b"\n")
            reply = json.loads(proc.stdout.readline())
            elapsed = time.perf_counter() - t0
            assert reply["id"] == i
            if i >= warmup:
                times.append(elapsed)
    finally:
        proc.stdin.close()
        proc.wait()
    times.sort()
    return {"median": statistics.median(times), "p10": times[len(times) // 10], "p90": times[len(times) * 9 // 10], "min": times[0]}


def make_items(path: Path, rows: int) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, qty INTEGER NOT NULL, code TEXT NOT NULL)")
        db.executemany("INSERT INTO items (qty, code) VALUES (?, ?)", ((i % 97, f"c{i % 1000}") for i in range(rows)))
    db.close()


def in_process_iteration(path: Path, *, with_dicts: bool) -> dict[str, float]:
    """The same query iterated with sqlite3 in this process: tuples, and (for context) dict rows."""
    out = {}
    with sqlite3.connect(path) as db:
        t0 = time.perf_counter()
        rows = sum(1 for _ in db.execute(STREAM_SQL))
        out["tuples_s"] = time.perf_counter() - t0
        if with_dicts:
            cur = db.execute(STREAM_SQL)
            names = [d[0] for d in cur.description]
            t0 = time.perf_counter()
            rows_d = sum(1 for row in cur for _ in (dict(zip(names, row)),))
            out["dicts_s"] = time.perf_counter() - t0
            assert rows == rows_d
    db.close()
    out["rows"] = rows
    return out


async def bench_connectors(quick: bool) -> dict[str, Any]:
    n_calls, warmup = (500, 100) if quick else (1000, 100)  # per round
    n_rows, batch_size = (200_000 if quick else 1_000_000), 5000
    with tempfile.TemporaryDirectory(prefix="nomaflow-bench-conn-") as tmp:
        root = Path(tmp)
        plugins = root / "plugins"
        plugins.mkdir()
        (plugins / "conn_bench.py").write_text(_STEPS)
        (root / "connectors.toml").write_text(
            '[mem]\ntype = "sqlite"\npath = ":memory:"\n\n[big]\ntype = "sqlite"\npath = "big.db"\ncall_timeout_seconds = 600\n'
        )
        make_items(root / "big.db", n_rows)

        def step(python: str, **op_kwargs: Any) -> Step:
            return Step(
                name="s", python=f"conn_bench:{python}", connectors=["mem", "big"], timeout_seconds=600,
                op_kwargs=op_kwargs, limits=Limits(max_output_kb=64),
            )

        async def run(name: str, python: str, **op_kwargs: Any) -> dict[str, Any]:
            done = await sup.run(Job(name=name, steps=[step(python, **op_kwargs)]))
            if done.status != "SUCCEEDED":
                raise RuntimeError(f"benchmark step failed: {done.steps[0].error}")
            return done.steps[0].output

        raws, rts, locals_, streams = [], [], [], []
        async with Supervisor(plugins=plugins, history=":memory:", connectors=root / "connectors.toml") as sup:
            for _ in range(ROUNDS):
                raws.append(raw_pipe_round_trips(n_calls, warmup))
                rts.append(await run("bench-round-trip", "round_trips", n=n_calls, warmup=warmup))
            for i in range(ROUNDS):
                locals_.append(in_process_iteration(root / "big.db", with_dicts=i == 0))
                streams.append(await run("bench-stream", "stream_rows", sql=STREAM_SQL, batch_size=batch_size))
        assert all(st["rows"] == local["rows"] == n_rows for st, local in zip(streams, locals_))
    rt_ratios = [rt["median"] / raw["median"] for rt, raw in zip(rts, raws)]
    st_ratios = [st["seconds"] / local["tuples_s"] for st, local in zip(streams, locals_)]
    round_trip_ratio, stream_ratio = statistics.median(rt_ratios), statistics.median(st_ratios)
    us = lambda seconds: round(seconds * 1e6, 1)  # noqa: E731
    return {
        "round_trip": {
            "calls_per_round": n_calls,
            "connector_median_us": [us(rt["median"]) for rt in rts],
            "connector_p90_us": [us(rt["p90"]) for rt in rts],
            "raw_pipe_median_us": [us(raw["median"]) for raw in raws],
            "raw_pipe_p90_us": [us(raw["p90"]) for raw in raws],
            "round_ratios": [round(r, 2) for r in rt_ratios],
            "ratio": round(round_trip_ratio, 2),
            "target": ROUND_TRIP_TARGET,
            "met": round_trip_ratio <= ROUND_TRIP_TARGET,
        },
        "stream": {
            "rows": n_rows,
            "batch_size": batch_size,
            "connector_s": [round(st["seconds"], 3) for st in streams],
            "connector_rows_per_s": [round(n_rows / st["seconds"]) for st in streams],
            "in_process_tuples_s": [round(local["tuples_s"], 3) for local in locals_],
            "in_process_dicts_s": round(locals_[0]["dicts_s"], 3),
            "round_ratios": [round(r, 2) for r in st_ratios],
            "ratio": round(stream_ratio, 2),
            "ratio_vs_dict_rows": round(statistics.median(st["seconds"] for st in streams) / locals_[0]["dicts_s"], 2),
            "target": STREAM_TARGET,
            "met": stream_ratio <= STREAM_TARGET,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer calls, 200k rows instead of 1M")
    args = parser.parse_args()
    result = trio.run(bench_connectors, args.quick)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
