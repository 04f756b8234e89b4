"""Baseline: os.fork() of a warm interpreter -> the child's first line.

Run as its own lean process (`python bench/fork_baseline.py N` prints the
latencies as JSON), warmed like the zygote (asyncio imported), so the baseline
does not pay for the benchmark process's own memory: fork time grows with the
parent's page tables.
"""

import asyncio  # noqa: F401  (warm, like the zygote)
import json
import os
import sys
import time


def fork_latencies(n: int) -> list[float]:
    out = []
    for _ in range(n):
        r, w = os.pipe()
        t0 = time.time()
        pid = os.fork()
        if pid == 0:
            os.write(w, repr(time.time()).encode())
            os._exit(0)
        os.close(w)
        data = os.read(r, 64)
        os.close(r)
        os.waitpid(pid, 0)
        out.append(float(data) - t0)
    return out


if __name__ == "__main__":
    print(json.dumps(fork_latencies(int(sys.argv[1]))))
