"""The spec's "Reading a previous step's output" example, with the step it reads."""

from liberty.jobs.types import StepContext

_SAMPLE_RELEASES = [
    {"tag": "v1.0.0", "published": "2026-03-02"},
    {"tag": "v1.1.0", "published": "2026-03-30"},
    {"tag": "v1.1.1", "published": "2026-04-11"},
]


async def fetch_releases(ctx: StepContext, *, releases: list | None = None, **_) -> dict:
    """Stand in for the spec's http step: output shaped like its decoded JSON `body`.

    Returns `releases` when given, else a small fixed sample, so the chain runs
    without network access.
    """
    body = list(_SAMPLE_RELEASES if releases is None else releases)
    ctx.log.info(f"fetched {len(body)} releases")
    return {"status_code": 200, "body": body}


async def upsert_releases(ctx: StepContext, **_) -> dict:
    http_step = ctx.previous_step("fetch-releases")
    if http_step.status != "SUCCEEDED":
        raise RuntimeError("upstream step failed — refusing to upsert")
    payload = http_step.output["body"]  # decoded JSON
    # ... upsert ...
    n = len(payload)
    ctx.log.info(f"upserted {n} releases")
    return {"upserted": n}
