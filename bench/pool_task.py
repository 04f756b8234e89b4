"""Baseline: ProcessPoolExecutor(forkserver, max_tasks_per_child=1), the
fresh-process-per-task pool a user would pick instead of the runner.

Run as its own lean process (`python bench/pool_task.py N` prints, as JSON, tasks/s
and the machine's CPU milliseconds per task while the tasks ran):
measured here, a parent that has imported trio makes every forkserver worker
several times slower, so the baseline is given its fastest conditions.
"""

import concurrent.futures
import json
import multiprocessing
import os
import sys
import time

from cpu_meter import busy_seconds, cpu_ms_per_item


def noop(_: object = None) -> None:
    return None


def measure(n: int) -> dict[str, float | None]:
    ctx = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count(), mp_context=ctx, max_tasks_per_child=1) as pool:
        list(pool.map(noop, range(4)))  # warm the fork server
        cpu0 = busy_seconds()
        t0 = time.perf_counter()
        list(pool.map(noop, range(n)))
        elapsed = time.perf_counter() - t0
        cpu1 = busy_seconds()
    return {"tasks_per_s": n / elapsed, "cpu_ms_per_task": cpu_ms_per_item(cpu0, cpu1, n)}


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]))))
