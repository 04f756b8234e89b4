"""Baseline: ProcessPoolExecutor(forkserver, max_tasks_per_child=1), the
fresh-process-per-task pool a user would pick instead of the runner.

Run as its own lean process (`python bench/pool_task.py N` prints tasks/s):
measured here, a parent that has imported trio makes every forkserver worker
several times slower, so the baseline is given its fastest conditions.
"""

import concurrent.futures
import multiprocessing
import os
import sys
import time


def noop(_: object = None) -> None:
    return None


def tasks_per_second(n: int) -> float:
    ctx = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count(), mp_context=ctx, max_tasks_per_child=1) as pool:
        list(pool.map(noop, range(4)))  # warm the fork server
        t0 = time.perf_counter()
        list(pool.map(noop, range(n)))
        return n / (time.perf_counter() - t0)


if __name__ == "__main__":
    print(tasks_per_second(int(sys.argv[1])))
