"""Attachment pruning: the spec's layout tree puts prune_attachments() here."""

import asyncio
import time
from pathlib import Path

from liberty.jobs.types import StepContext


async def prune_attachments(
    ctx: StepContext,
    *,
    directory: str | None = None,
    older_than_days: float = 30,
    **_,
) -> dict:
    """Delete the regular files directly in `directory` not modified for `older_than_days`.

    Without a directory there is nothing to prune: the step says so and
    succeeds, so a job can carry the step before its folder is configured.
    """
    if directory is None:
        ctx.log.info("no directory given — nothing to prune")
        return {"deleted": 0, "kept": 0}
    cutoff = time.time() - older_than_days * 86_400
    deleted = kept = 0
    for i, path in enumerate(sorted(Path(directory).iterdir())):
        if i % 100 == 0:
            await asyncio.sleep(0)
            if ctx.is_cancelled():
                ctx.log.warning(f"cancelled after deleting {deleted} files")
                raise asyncio.CancelledError()
        if not path.is_file() or path.is_symlink():
            continue
        if path.stat().st_mtime < cutoff:
            path.unlink()
            deleted += 1
        else:
            kept += 1
    ctx.log.info(f"pruned {deleted} attachments older than {older_than_days} days, kept {kept}")
    return {"deleted": deleted, "kept": kept}
