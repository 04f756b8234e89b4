"""What a throughput figure cost in CPU, whoever spent it: the supervisor, its zygote and
steps, or the pool's processes (also anyone else busy on the machine meanwhile).

A step's CPU is spread over several processes, some gone before they could be
asked, so the meter reads the whole machine's busy time from /proc/stat.  It
imports nothing heavy: the pool's lean process uses it too.
"""

from __future__ import annotations

import os

# /proc/stat's cpu line: user nice system idle iowait irq softirq steal (guest is inside user).
_BUSY = (0, 1, 2, 5, 6)


def parse_busy_seconds(line: str, ticks_per_second: int) -> float:
    """Busy seconds summed over every CPU, from /proc/stat's first line; idle, iowait and steal are not ours."""
    fields = line.split()
    if not fields or fields[0] != "cpu":
        raise ValueError(f"not the summary cpu line of /proc/stat: {line[:80]!r}")
    values = [int(v) for v in fields[1:]]
    if len(values) < 7:
        raise ValueError(f"/proc/stat's cpu line has {len(values)} fields, expected at least 7")
    return sum(values[i] for i in _BUSY) / ticks_per_second


def busy_seconds() -> float | None:
    """The machine's busy CPU seconds so far, or None where /proc/stat cannot be read (not Linux)."""
    try:
        with open("/proc/stat") as stat:
            line = stat.readline()
    except OSError:
        return None
    return parse_busy_seconds(line, os.sysconf("SC_CLK_TCK"))


def cpu_ms_per_item(before: float | None, after: float | None, items: int) -> float | None:
    """Milliseconds of machine CPU per item between two readings, or None without them."""
    if before is None or after is None or items <= 0:
        return None
    return (after - before) * 1000 / items


def cpu_bound_ceiling(cpus: int, cpu_ms_per_step: float, pool_per_s: float) -> float:
    """The ratio to the pool that runs costing `cpu_ms_per_step` each could reach with every CPU busy.

    Back-to-back runs cannot go faster than the machine can pay for them: a
    figure under a target here means the target needs cheaper steps, not
    better scheduling.
    """
    return cpus * 1000 / cpu_ms_per_step / pool_per_s
