# The "Testing your function" example of shared/spec/custom-python-steps.txt, verbatim: it must
# run unmodified.  Its last line asserts a non-empty tuple, which is always true (pytest warns);
# test_examples_with_fake_ctx.py::test_generate_monthly_logs_the_period_last makes the check it meant.
# tests/test_reports_summary.py
import pytest
from reports.summary import generate_monthly

@pytest.mark.asyncio
async def test_generate_monthly(fake_ctx):
    result = await generate_monthly(fake_ctx, period="2026-04", target_path="/tmp/out.pdf")
    assert result["size_bytes"] > 0
    assert (fake_ctx.log.calls[-1] == "INFO", "wrote 2026-04 summary")
