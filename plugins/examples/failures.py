"""The spec's "Raising on failure" snippet inside a step."""

from typing import NamedTuple

from liberty.jobs.types import StepContext


class _Response(NamedTuple):
    """The two fields of an HTTP response the snippet reads."""

    status_code: int
    text: str


async def check_upstream(
    ctx: StepContext,
    *,
    status_code: int = 500,
    body: str = "Internal Server Error",
    **_,
) -> dict:
    """Fail like an upstream call that returned `status_code` with `body`."""
    response = _Response(status_code=status_code, text=body)
    if response.status_code != 200:
        raise RuntimeError(
            f"upstream returned {response.status_code} — body: {response.text[:200]}"
        )
    return {"status_code": response.status_code}
