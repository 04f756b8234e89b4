"""The spec's "Cancellation" example: the async-friendly loop."""

import asyncio

from liberty.jobs.types import StepContext


async def process_one(item) -> None:
    """Stand-in for per-item work: a short await, as real I/O would be."""
    await asyncio.sleep(0.005)


async def long_loop(ctx: StepContext, *, items: list, **_) -> dict:
    processed = 0
    for i, item in enumerate(items):
        # Yield to the event loop every 100 items so cancellation lands.
        if i % 100 == 0:
            await asyncio.sleep(0)
            if ctx.is_cancelled():
                ctx.log.warning(f"cancelled at item {i}/{len(items)}")
                raise asyncio.CancelledError()
        await process_one(item)
        processed += 1
    return {"processed": processed}


async def long_loop_range(ctx: StepContext, *, count: int, **_) -> dict:
    """`long_loop` over `range(count)`: a long run without a huge list in the job file."""
    return await long_loop(ctx, items=list(range(count)))
