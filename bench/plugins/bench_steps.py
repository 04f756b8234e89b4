"""Steps the benchmarks run; each is as small as it can be so the runner's cost shows."""

import time


async def first_line(ctx, **_):
    return {"t": time.time()}


async def trivial(ctx, **_):
    return None


async def idle(ctx, *, seconds: float = 30.0, **_):
    import asyncio

    while not ctx.is_cancelled():
        await asyncio.sleep(0.01)
    raise asyncio.CancelledError()


async def chatty(ctx, *, lines: int = 100_000, **_):
    log = ctx.log.info
    for i in range(lines):
        log(f"line {i} of the log throughput benchmark, some padding to look like a real line")
    return {"lines": lines}
