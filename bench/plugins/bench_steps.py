"""Steps the benchmarks run; each is as small as it can be so the runner's cost shows."""

import time


async def first_line(ctx, **_):
    return {"t": time.time()}


async def trivial(ctx, **_):
    return None


async def idle(ctx, *, seconds: float = 3600.0, **_):
    """Truly idle (200 of these must not load the machine): the runner's cancel escalation
    cancels this task at half the grace period, and CancelledError lands at the await."""
    import asyncio

    await asyncio.sleep(seconds)


async def chatty(ctx, *, lines: int = 100_000, **_):
    log = ctx.log.info
    for i in range(lines):
        log(f"line {i} of the log throughput benchmark, some padding to look like a real line")
    return {"lines": lines}
