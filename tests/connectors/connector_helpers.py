"""Shared helpers of the connector tests (fixtures are in conftest.py)."""

from __future__ import annotations

import itertools

import attrs
from pg_server import PgServer

from liberty.jobs.connectors import ConnectorConfig, PostgresConfig

_tables = itertools.count(1)


def new_table() -> str:
    return f"items_{next(_tables)}"


@attrs.frozen
class SqlTarget:
    """One SQL database to run a test against; `q()` fills in `{t}` (the table) and `{}` (a placeholder)."""

    kind: str
    config: ConnectorConfig
    placeholder: str
    table: str
    server: PgServer | None = None

    @property
    def name(self) -> str:
        return self.config.name

    def q(self, sql: str) -> str:
        return sql.replace("{t}", self.table).replace("{}", self.placeholder)

    def with_config(self, **changes: object) -> SqlTarget:
        return attrs.evolve(self, config=attrs.evolve(self.config, **changes))


def pg_config(server: PgServer, name: str = "db", **changes: object) -> PostgresConfig:
    base = PostgresConfig(
        name=name,
        params=server.params(application_name=f"nomaflow-test:{name}", connect_timeout=5),
        pool_min=0,
        pool_max=2,
        timeout_seconds=10,
        call_timeout_seconds=20,
        secrets=frozenset({server.app_password}),
    )
    return attrs.evolve(base, **changes)
