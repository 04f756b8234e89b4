"""The four log lines of the spec's "Logging" section, one per level in use."""

from liberty.jobs.types import StepContext


async def log_levels(ctx: StepContext, *, n: int = 3, row_id: int = 42, **_) -> dict:
    """Emit one line at each level so the run log shows how they render."""
    i = 1
    ctx.log.info("starting batch")
    ctx.log.info(f"▶ batch {i} of {n}")
    ctx.log.warning(f"missing field on row {row_id} — skipping")
    ctx.log.error(f"upstream returned 500 — retry policy will decide")
    return {"lines_logged": 4}
