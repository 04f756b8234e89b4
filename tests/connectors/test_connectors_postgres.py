"""PostgreSQL specifics against the throwaway cluster: pooling, cursors, credentials, errors."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import subprocess
import sys
import uuid
import zoneinfo
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
import pytest
import trio
from connector_helpers import new_table, pg_config
from pg_server import PgServer

from liberty.jobs.connectors import ConnectorRegistry, load_connectors
from liberty.jobs.protocol.values import decode_value, encode_exception, encode_value

pytestmark = pytest.mark.trio

SRC = Path(__file__).resolve().parents[2] / "src"


def admin_scalar(server: PgServer, sql: str, *params: Any) -> Any:
    with server.admin_connect() as conn:
        row = conn.execute(sql, params or None).fetchone()
        return row[0] if row else None


async def wait_until(predicate: Any, seconds: float = 10) -> None:
    with trio.fail_after(seconds):
        while not predicate():
            await trio.sleep(0.05)


async def test_password_env_from_connectors_toml_logs_in(postgres_server: PgServer, tmp_path: Path) -> None:
    srv = postgres_server
    path = tmp_path / "connectors.toml"
    path.write_text(
        f'[reporting]\ntype = "postgres"\nhost = "{srv.host}"\nport = {srv.port}\ndbname = "{srv.dbname}"\n'
        f'user = "{srv.app_user}"\npassword_env = "REPORTING_PASSWORD"\npool_min = 1\npool_max = 2\n'
    )
    configs = load_connectors(path, environ={"REPORTING_PASSWORD": srv.app_password})
    async with ConnectorRegistry(configs) as reg, reg.session("s", ["reporting"]) as s:
        assert await s.call("reporting", "scalar", ["SELECT current_user"], {}) == srv.app_user
        assert reg.secrets == {srv.app_password}


async def test_a_wrong_password_raises_the_drivers_error_without_the_password(postgres_server: PgServer) -> None:
    cfg = pg_config(postgres_server, params={**postgres_server.params(), "password": "wrong-Pa55"}, timeout_seconds=3)
    async with ConnectorRegistry({"db": cfg}) as reg, reg.session("s", ["db"]) as s:
        with pytest.raises(psycopg.OperationalError) as info:
            await s.call("db", "scalar", ["SELECT 1"], {})
    assert "password authentication failed" in str(info.value) and "wrong-Pa55" not in str(info.value)


async def test_an_unreachable_server_fails_within_the_timeout(postgres_server: PgServer) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    cfg = pg_config(postgres_server, params={**postgres_server.params(), "port": closed_port}, timeout_seconds=2)
    async with ConnectorRegistry({"db": cfg}) as reg, reg.session("s", ["db"]) as s:
        with trio.fail_after(15), pytest.raises(psycopg.OperationalError, match=str(closed_port)):
            await s.call("db", "scalar", ["SELECT 1"], {})


async def test_one_pool_is_shared_by_every_session(postgres_server: PgServer) -> None:
    async with ConnectorRegistry({"db": pg_config(postgres_server, pool_max=1)}) as reg:
        async with reg.session("a", ["db"]) as s1:
            pid1 = await s1.call("db", "scalar", ["SELECT pg_backend_pid()"], {})
            backend = await reg.backend("db")
        async with reg.session("b", ["db"]) as s2:
            pid2 = await s2.call("db", "scalar", ["SELECT pg_backend_pid()"], {})
            assert await reg.backend("db") is backend
        assert pid1 == pid2


async def test_concurrent_calls_never_open_more_than_pool_max_connections(postgres_server: PgServer) -> None:
    pids: list[int] = []
    async with ConnectorRegistry({"capped": pg_config(postgres_server, name="capped", pool_max=2)}) as reg:
        async with reg.session("a", ["capped"]) as s, trio.open_nursery() as nursery:
            for _ in range(6):

                async def one() -> None:
                    pids.append(await s.call("capped", "scalar", ["SELECT pg_backend_pid() FROM pg_sleep(0.2)"], {}))

                nursery.start_soon(one)
        count = admin_scalar(
            postgres_server, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", "nomaflow-test:capped"
        )
    assert len(pids) == 6 and len(set(pids)) <= 2 and count <= 2


async def test_leaving_the_registry_closes_the_pool(postgres_server: PgServer) -> None:
    app = "nomaflow-test:closing"
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
    async with ConnectorRegistry({"closing": pg_config(postgres_server, name="closing", pool_min=2)}) as reg:
        async with reg.session("a", ["closing"]) as s:
            await s.call("closing", "scalar", ["SELECT 1"], {})
        assert admin_scalar(postgres_server, query, app) >= 1
    await wait_until(lambda: admin_scalar(postgres_server, query, app) == 0)


async def test_a_transaction_pins_one_connection_while_other_calls_use_others(postgres_server: PgServer) -> None:
    async with ConnectorRegistry({"db": pg_config(postgres_server, pool_max=3)}) as reg, reg.session("a", ["db"]) as s:
        tx = await s.call("db", "begin", [], {})
        inside, outside = set(), set()
        for _ in range(5):
            inside.add(await s.call("db", "scalar", ["SELECT pg_backend_pid()"], {}, tx=tx))
            outside.add(await s.call("db", "scalar", ["SELECT pg_backend_pid()"], {}))
        assert await s.call("db", "scalar", ["SELECT txid_current_if_assigned() IS NULL"], {}, tx=tx) is True
        await s.call("db", "commit", [], {}, tx=tx)
    assert len(inside) == 1 and not inside & outside


async def test_server_side_cursor_exists_while_streaming_and_is_closed_early(postgres_server: PgServer) -> None:
    cursors = "SELECT count(*) FROM pg_cursors WHERE name LIKE 'nomaflow_stream_%'"
    async with ConnectorRegistry({"db": pg_config(postgres_server)}) as reg, reg.session("a", ["db"]) as s:
        tx = await s.call("db", "begin", [], {})
        sid = await s.stream_open("db", "SELECT g FROM generate_series(1, 100000) AS g", [], 100, tx=tx)
        batch = await s.stream_next(sid)
        assert batch is not None and len(batch) == 100
        assert await s.call("db", "scalar", [cursors], {}, tx=tx) == 1
        await s.stream_close(sid)
        assert await s.call("db", "scalar", [cursors], {}, tx=tx) == 0
        await s.call("db", "rollback", [], {}, tx=tx)


async def test_early_close_outside_a_transaction_leaves_no_cursor_or_open_transaction(postgres_server: PgServer) -> None:
    async with ConnectorRegistry({"db": pg_config(postgres_server, pool_max=1)}) as reg, reg.session("a", ["db"]) as s:
        pid = await s.call("db", "scalar", ["SELECT pg_backend_pid()"], {})
        sid = await s.stream_open("db", "SELECT g FROM generate_series(1, 100000) AS g", [], 50)
        assert len(await s.stream_next(sid) or []) == 50
        state = "SELECT state FROM pg_stat_activity WHERE pid = %s"
        assert admin_scalar(postgres_server, state, pid) == "idle in transaction"
        await s.stream_close(sid)
        assert admin_scalar(postgres_server, state, pid) == "idle"
        row = await s.call("db", "fetchrow", ["SELECT pg_backend_pid() AS pid, (SELECT count(*) FROM pg_cursors) AS n"], {})
        assert row == {"pid": pid, "n": 0}


async def test_session_settings_do_not_leak_to_the_next_step(postgres_server: PgServer) -> None:
    async with ConnectorRegistry({"db": pg_config(postgres_server, pool_max=1)}) as reg:
        async with reg.session("a", ["db"]) as s1:
            await s1.call("db", "execute", ["SET search_path TO pg_catalog"], {})
            await s1.call("db", "execute", ["CREATE TEMP TABLE scratch (x int)"], {})
        async with reg.session("b", ["db"]) as s2:
            assert await s2.call("db", "scalar", ["SHOW search_path"], {}) == '"$user", public'
            assert await s2.call("db", "scalar", ["SELECT to_regclass('pg_temp.scratch')"], {}) is None


async def test_commit_after_a_failed_statement_raises_instead_of_silently_rolling_back(postgres_server: PgServer) -> None:
    table = new_table()
    async with ConnectorRegistry({"db": pg_config(postgres_server)}) as reg, reg.session("a", ["db"]) as s:
        await s.call("db", "execute", [f"CREATE TABLE {table} (id int PRIMARY KEY)"], {})
        tx = await s.call("db", "begin", [], {})
        await s.call("db", "execute", [f"INSERT INTO {table} VALUES (1)"], {}, tx=tx)
        with pytest.raises(psycopg.errors.UniqueViolation):
            await s.call("db", "execute", [f"INSERT INTO {table} VALUES (1)"], {}, tx=tx)
        with pytest.raises(psycopg.errors.InFailedSqlTransaction, match="rolled back"):
            await s.call("db", "commit", [], {}, tx=tx)
        assert await s.call("db", "scalar", [f"SELECT count(*) FROM {table}"], {}) == 0


async def test_a_timed_out_query_is_cancelled_on_the_server(postgres_server: PgServer) -> None:
    cfg = pg_config(postgres_server, name="slow", call_timeout_seconds=0.5)
    async with ConnectorRegistry({"slow": cfg}) as reg, reg.session("a", ["slow"]) as s:
        with pytest.raises(TimeoutError, match="'slow'"):
            await s.call("slow", "execute", ["SELECT pg_sleep(60) /* nomaflow-timeout-probe */"], {})
        running = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s AND state = 'active' AND pid <> pg_backend_pid()"
        assert admin_scalar(postgres_server, running, "%nomaflow-timeout-probe%") == 0


async def test_rich_values_survive_the_database_and_the_pipe(postgres_server: PgServer) -> None:
    values = {
        "ts": dt.datetime(2026, 4, 1, 12, 30, 15, 123456, tzinfo=zoneinfo.ZoneInfo("UTC")),
        "d": dt.date(2026, 4, 1),
        "t": dt.time(23, 59, 59, 999999),
        "iv": dt.timedelta(days=3, seconds=5, microseconds=7),
        "n": decimal.Decimal("12345678901234567890.000000001"),
        "b": b"\x00\xffbinary",
        "u": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    }
    sql = "SELECT %s::timestamptz AS ts, %s::date AS d, %s::time AS t, %s::interval AS iv, %s::numeric AS n, %s::bytea AS b, %s::uuid AS u"
    wire_args = json.loads(json.dumps(encode_value([sql, *values.values()])))
    async with ConnectorRegistry({"db": pg_config(postgres_server)}) as reg, reg.session("a", ["db"]) as s:
        row = await s.call("db", "fetchrow", decode_value(wire_args), {})
    back = decode_value(json.loads(json.dumps(encode_value(row))))
    assert back == values


_CHILD = """
import json, sys, psycopg.errors
from liberty.jobs.protocol.values import decode_exception
try:
    raise decode_exception(json.load(sys.stdin))
except psycopg.errors.UniqueViolation as exc:
    json.dump([str(exc), exc.sqlstate, exc.diag.constraint_name, exc.diag.table_name], sys.stdout)
"""


async def test_a_real_unique_violation_is_caught_by_its_class_in_another_interpreter(postgres_server: PgServer) -> None:
    table = new_table()
    async with ConnectorRegistry({"db": pg_config(postgres_server)}) as reg, reg.session("a", ["db"]) as s:
        await s.call("db", "execute", [f"CREATE TABLE {table} (id int PRIMARY KEY)"], {})
        await s.call("db", "execute", [f"INSERT INTO {table} VALUES (1)"], {})
        with pytest.raises(psycopg.errors.UniqueViolation) as info:
            await s.call("db", "execute", [f"INSERT INTO {table} VALUES (1)"], {})
    encoded = encode_exception(info.value)
    assert encoded["pickle"], "psycopg errors must pickle"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=json.dumps(encoded),
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert json.loads(proc.stdout) == [str(info.value), "23505", f"{table}_pkey", table]
