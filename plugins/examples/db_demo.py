"""Demo steps for the `reporting` SQLite connector (connectors.toml at the repo root).

`seed_orders` makes the demo self-contained on a fresh machine: it creates and
fills the `orders` table that the spec's shared-helper example
(`reports.orders_summary:generate_monthly`) counts.  Re-running it replaces the
period's rows instead of adding more, so the demo can run any number of times.
"""

import datetime as dt

from liberty.jobs.types import StepContext

REGIONS = ("north", "south", "east", "west")


async def seed_orders(ctx: StepContext, *, period: str, count: int = 150, **_) -> dict:
    db = ctx.get_connector("reporting")
    try:
        year, month = (int(part) for part in period.split("-"))
        first_day = dt.date(year, month, 1)
    except ValueError:
        raise ValueError(f"period must look like 2026-04, got {period!r}") from None
    await db.execute(
        "CREATE TABLE IF NOT EXISTS orders ("
        " id INTEGER PRIMARY KEY, period TEXT NOT NULL, region TEXT NOT NULL,"
        " ordered_on TEXT NOT NULL, amount_cents INTEGER NOT NULL)"
    )
    rows = [
        (period, REGIONS[i % len(REGIONS)], (first_day + dt.timedelta(days=i % 28)).isoformat(), 1000 + (i * 37) % 9000)
        for i in range(count)
    ]
    # One transaction: a reader never sees the period half replaced.
    async with db.transaction() as tx:
        replaced = await tx.execute("DELETE FROM orders WHERE period = ?", period)
        inserted = await tx.executemany(
            "INSERT INTO orders (period, region, ordered_on, amount_cents) VALUES (?, ?, ?, ?)", rows
        )
    ctx.log.info(f"seeded {inserted} orders for {period} (replaced {replaced})")
    return {"period": period, "inserted": inserted, "replaced": replaced}


async def revenue_by_region(ctx: StepContext, *, period: str, **_) -> dict:
    """Aggregate while streaming: the rows never sit in memory all at once."""
    db = ctx.get_connector("reporting")
    cents: dict[str, int] = {}
    rows = 0
    async for row in db.stream("SELECT region, amount_cents FROM orders WHERE period = ?", period, batch_size=50):
        cents[row["region"]] = cents.get(row["region"], 0) + row["amount_cents"]
        rows += 1
    ctx.log.info(f"{period}: {rows} orders in {len(cents)} regions")
    return {"period": period, "orders": rows, "cents_by_region": dict(sorted(cents.items()))}
