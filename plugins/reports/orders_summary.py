# The spec's "Reusing functions across jobs" example calls this file
# plugins/reports/summary.py, but that module already holds the first example's
# generate_monthly(ctx, *, period, target_path) and one module cannot hold two
# functions of the same name; reference this one as
# reports.orders_summary:generate_monthly.
from utils.connectors import assert_row_count

async def generate_monthly(ctx, *, period, **_):
    target = ctx.get_connector("reporting")
    rows = await assert_row_count(target, "SELECT count(*) FROM orders", min_rows=100)
    # ...
    ctx.log.info(f"{period}: {rows} orders")
    return {"period": period, "orders": rows}
