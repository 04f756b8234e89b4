"""Connectors end to end: real Supervisor, real child interpreters, real SQLite, PostgreSQL and HTTP.

Every step here runs sandboxed in its own child; the connections, pools and
credentials live in this (the supervisor's) process.  The PostgreSQL cluster
is the shared throwaway one of `tests/pg_server.py`; the HTTP server is a
thread of this process that records what it receives.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import os
import secrets
import sqlite3
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import psutil
import psycopg
import pytest
import trio

from liberty.jobs.supervisor import AttemptSession
from liberty.jobs.child.connectors import STREAM_CREDIT
from liberty.jobs import Job, Limits, Step, Supervisor
from liberty.jobs.history import LogLine, RunView

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:  # pg_server.py lives in tests/
    sys.path.insert(0, _TESTS)

from pg_server import PgServer, postgres_server  # noqa: E402, F401  (the shared session fixture)

pytestmark = [pytest.mark.trio, pytest.mark.timeout(120)]

SPEC_PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
_names = itertools.count(1)


def unique(prefix: str) -> str:
    """A table or sequence name no other test (in this session's shared cluster) uses."""
    return f"{prefix}_{os.getpid()}_{next(_names)}"


# --- the plugin module the tests run (written into a temp plugins directory) ----------

E2E_PLUGIN = '''
import asyncio
import datetime as dt
import decimal
import os
import socket
import resource
import sqlite3
import uuid

import psycopg


def _q(sql, table, ph):
    return sql.replace("{t}", table).replace("{}", ph)


async def sql_methods(ctx, *, conn, table, ph, **_):
    t = ctx.get_connector(conn)
    await t.execute(_q("CREATE TABLE {t} (id INTEGER PRIMARY KEY, name TEXT NOT NULL)", table, ph))
    inserted = await t.executemany(_q("INSERT INTO {t} (id, name) VALUES ({}, {})", table, ph), [(1, "a"), (2, "b"), [3, "c"]])
    updated = await t.execute(_q("UPDATE {t} SET name = name || {} WHERE id >= {}", table, ph), "!", 2)
    deleted = await t.execute(_q("DELETE FROM {t} WHERE id = {}", table, ph), 99)
    return {
        "executemany": inserted,
        "execute_update": updated,
        "execute_nothing": deleted,
        "scalar": await t.scalar(_q("SELECT count(*) FROM {t}", table, ph)),
        "scalar_none": await t.scalar(_q("SELECT name FROM {t} WHERE id = {}", table, ph), 99),
        "fetch": await t.fetch(_q("SELECT id, name FROM {t} ORDER BY id", table, ph)),
        "fetch_empty": await t.fetch(_q("SELECT id FROM {t} WHERE id > {}", table, ph), 10),
        "fetchrow": await t.fetchrow(_q("SELECT id, name FROM {t} WHERE id = {}", table, ph), 2),
        "fetchrow_none": await t.fetchrow(_q("SELECT id, name FROM {t} WHERE id = {}", table, ph), 99),
    }


async def duplicate_key(ctx, *, conn, table, kind, catch, **_):
    t = ctx.get_connector(conn)
    await t.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY)")
    await t.execute(f"INSERT INTO {table} (id) VALUES (1)")
    wanted = sqlite3.IntegrityError if kind == "sqlite" else psycopg.errors.UniqueViolation
    if not catch:
        await t.execute(f"INSERT INTO {table} (id) VALUES (1)")
    try:
        await t.execute(f"INSERT INTO {table} (id) VALUES (1)")
    except wanted as exc:
        return {
            "caught": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "message": str(exc),
            "sqlstate": getattr(exc, "sqlstate", None),
            "is_integrity_error": isinstance(exc, (sqlite3.IntegrityError, psycopg.IntegrityError)),
        }
    return {"caught": None}


async def use_connector(ctx, *, conn, **_):
    t = ctx.get_connector(conn)
    return {"value": await t.scalar("SELECT 1")}


async def tx_create(ctx, *, conn, table, **_):
    await ctx.get_connector(conn).execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, note TEXT)")
    return {}


async def tx_commit(ctx, *, conn, table, ph, **_):
    t = ctx.get_connector(conn)
    async with t.transaction() as tx:
        await tx.execute(_q("INSERT INTO {t} (id, note) VALUES ({}, {})", table, ph), 1, "committed")
        await tx.executemany(_q("INSERT INTO {t} (id, note) VALUES ({}, {})", table, ph), [(2, "committed")])
        inside = await tx.scalar(f"SELECT count(*) FROM {table}")
    return {"inside": inside}


async def tx_rollback(ctx, *, conn, table, ph, **_):
    t = ctx.get_connector(conn)
    seen = {}
    try:
        async with t.transaction() as tx:
            await tx.execute(_q("INSERT INTO {t} (id, note) VALUES ({}, {})", table, ph), 3, "rolled back")
            seen["inside"] = await tx.scalar(f"SELECT count(*) FROM {table}")
            seen["outside"] = await t.scalar(f"SELECT count(*) FROM {table}")  # another connection
            raise ValueError("abandon the transaction")
    except ValueError as exc:
        seen["error"] = str(exc)
    return seen


async def read_ids(ctx, *, conn, table, **_):
    rows = await ctx.get_connector(conn).fetch(f"SELECT id FROM {table} ORDER BY id")
    return {"ids": [r["id"] for r in rows]}


async def stream_rows(ctx, *, conn, sql, batch_size, stop_after=0, delay=0.0, then=(), trace=False, **_):
    t = ctx.get_connector(conn)
    n = first = last = 0
    if trace:
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async for row in t.stream(sql, batch_size=batch_size):
        n += 1
        if n == 1:
            first = row["i"]
        last = row["i"]
        if delay:
            await asyncio.sleep(delay)
        if stop_after and n >= stop_after:
            break
    after = [await t.scalar(s) for s in then]
    out = {"rows": n, "first": first, "last": last, "after": after}
    if trace:
        out["peak_growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    return out


async def exact_batches(ctx, *, conn, **_):
    t = ctx.get_connector(conn)
    total = 0
    async for row in t.stream("SELECT 1 AS i UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4", batch_size=2):
        total += row["i"]
        await asyncio.sleep(0.05)  # slower than the supervisor: the end-of-stream marker is sent meanwhile
    return {"total": total}


async def late_break(ctx, *, conn, **_):
    t = ctx.get_connector(conn)
    async for row in t.stream("SELECT 1 AS i UNION ALL SELECT 2", batch_size=5):
        await asyncio.sleep(0.05)  # meanwhile the supervisor sends the end marker and forgets the stream
        break
    return {"first": row["i"], "after": await t.scalar("SELECT 3")}


_WIDE = ("WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 5000) "
         "SELECT i, printf('%0400d', i) AS pad FROM s")


async def oversize_fetch(ctx, *, conn, **_):
    t = ctx.get_connector(conn)
    try:
        rows = await t.fetch(_WIDE)  # ~2 MB of rows: over the pipe's 1 MiB line cap
        return {"rows": len(rows)}
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc), "after": await t.scalar("SELECT 1")}


async def oversize_stream_batch(ctx, *, conn, **_):
    t = ctx.get_connector(conn)
    n = 0
    try:
        async for row in t.stream(_WIDE, batch_size=5000):
            n += 1
        return {"rows": n}
    except Exception as exc:
        return {"rows": n, "error": type(exc).__name__, "message": str(exc)}


async def hog_stream_credit(ctx, *, conn, sql, seconds, **_):
    # A hostile child: it opens a stream itself with all the credit there is, then keeps its
    # reader thread from running (no switch to it for 100 s), so nothing it is sent gets read.
    import json, sys, time
    channel = ctx.get_connector(conn)._channel
    received = []
    channel.expect_rows(10**9, received.append)
    line = {"t": "stream_open", "id": 10**9, "connector": conn, "sql": sql, "params": [],
            "batch_size": 1000, "credit": 10**9, "tx": None}
    sys.setswitchinterval(100.0)
    os.write(4, json.dumps(line).encode() + b"\\n")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    sys.setswitchinterval(0.005)
    await asyncio.sleep(0.5)  # the reader thread catches up
    return {"batches": len(received)}


async def write_per_streamed_row(ctx, *, conn, n, **_):
    t = ctx.get_connector(conn)
    await t.execute("CREATE TABLE IF NOT EXISTS seen (i INTEGER)")
    started = asyncio.get_running_loop().time()
    async with t.transaction() as tx:
        async for row in tx.stream(f"WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n}) SELECT i FROM s", batch_size=1):
            await tx.execute("INSERT INTO seen VALUES (?)", row["i"])
    return {"seen": await t.scalar("SELECT count(*) FROM seen"), "seconds": asyncio.get_running_loop().time() - started}


async def concurrent_calls(ctx, *, conn, sql, n, **_):
    t = ctx.get_connector(conn)
    started = asyncio.get_running_loop().time()
    values = await asyncio.gather(*(t.scalar(sql) for _ in range(n)))
    return {"values": len(values), "seconds": asyncio.get_running_loop().time() - started}


async def long_query(ctx, *, conn, **_):
    await ctx.get_connector(conn).execute("SELECT pg_sleep(60)")
    return {}


async def write_after(ctx, *, conn, sql, **_):
    return {"rowcount": await ctx.get_connector(conn).execute(sql)}


def _sent_values():
    return {
        "ts": dt.datetime(2026, 4, 30, 23, 59, 58, 123456, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
        "d": dt.date(2026, 2, 28),
        "tm": dt.time(13, 14, 15, 161718),
        "num": decimal.Decimal("-12345678901234567890.123456789012345678"),
        "raw": bytes(range(256)),
        "u": uuid.UUID("8d5c0a6e-3f0e-4b8c-9a55-0c1d2e3f4a5b"),
    }


def _compare(got, sent):
    out = {}
    for key, value in sent.items():
        g = got[key]
        out[key] = {
            "equal": g == value,
            "same_type": type(g) is type(value),
            "same_offset": getattr(g, "utcoffset", lambda: None)() == getattr(value, "utcoffset", lambda: None)(),
            "repr": repr(g),
        }
    return out


async def pg_values(ctx, *, conn, table, **_):
    t = ctx.get_connector(conn)
    sent = _sent_values()
    echoed = await t.fetchrow(
        "SELECT %s::timestamptz AS ts, %s::date AS d, %s::time AS tm, %s::numeric AS num, %s::bytea AS raw, %s::uuid AS u",
        *sent.values(),
    )
    await t.execute(
        f"CREATE TABLE {table} (ts timestamptz, d date, tm time, num numeric, raw bytea, u uuid)"
    )
    await t.executemany(f"INSERT INTO {table} VALUES (%s, %s, %s, %s, %s, %s)", [tuple(sent.values())])
    async with t.transaction() as tx:
        await tx.execute("SET LOCAL TimeZone = 'Asia/Kolkata'")  # so the stored instant comes back in +05:30
        stored = await tx.fetchrow(f"SELECT * FROM {table}")
        zone = repr(stored["ts"].tzinfo)
    streamed = [row async for row in t.stream(f"SELECT * FROM {table}", batch_size=1)]
    by_param = await t.scalar(f"SELECT count(*) FROM {table} WHERE ts = %s AND num = %s AND raw = %s AND u = %s",
                              sent["ts"], sent["num"], sent["raw"], sent["u"])
    return {
        "echoed": _compare(echoed, sent),
        "stored": _compare(stored, sent),
        "streamed": _compare(streamed[0], sent),
        "zone": zone,
        "matched_by_param": by_param,
    }


async def sqlite_values(ctx, *, conn, **_):
    t = ctx.get_connector(conn)
    sent = {"raw": bytes(range(256)), "f": 0.1 + 0.2, "big": 2**62 + 7, "text": "ünïcødé ☃ \\u00e9\\n\\t", "nul": None,
            "inf": float("inf")}
    got = await t.fetchrow("SELECT ? AS raw, ? AS f, ? AS big, ? AS text, ? AS nul, ? AS inf", *sent.values())
    return {k: {"equal": got[k] == v, "same_type": type(got[k]) is type(v)} for k, v in sent.items()}


async def http_calls(ctx, *, conn, **_):
    api = ctx.get_connector(conn)
    got = await api.get("/items", params={"q": "blue widgets", "page": 2}, headers={"X-Trace": "trace-1"})
    posted = await api.post("/items", json={"name": "widget", "price": 9.5, "tags": ["a", "b"]})
    put = await api.put("/items/7", json={"name": "renamed"})
    patched = await api.patch("/items/7", json={"price": 1})
    deleted = await api.delete("/items/7")
    other = await api.request("GET", "/health")
    return {
        "get": [got.status_code, got.json(), got.headers.get("x-server")],
        "post": [posted.status_code, posted.json()],
        "put": put.json()["method"],
        "patch": patched.json()["method"],
        "delete": [deleted.status_code, deleted.json()["method"]],
        "request": other.json()["path"],
        "text_is_json": got.text.startswith("{"),
    }


async def network_probe(ctx, *, conn, port, **_):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=3).close()
        direct = "connected"
    except OSError as exc:
        direct = type(exc).__name__
    response = await ctx.get_connector(conn).get("/through-the-supervisor")
    return {"direct": direct, "via_connector": response.status_code}


async def leak_probe(ctx, *, supervisor_pid, **_):
    pg, api = ctx.get_connector("pg"), ctx.get_connector("api")
    dsn, down = ctx.get_connector("pgdsn"), ctx.get_connector("api_down")
    errors = []
    for call in (
        lambda: pg.execute("SELECT * FROM no_such_table"),
        lambda: dsn.execute("SELECT 1/0"),
        lambda: down.get("/anything"),
    ):
        try:
            await call()
        except Exception as exc:
            errors.append(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}")
    response = await api.get("/whoami")
    try:
        with open(f"/proc/{supervisor_pid}/environ", "rb") as f:
            parent_environ = f.read().decode("utf-8", "replace")
    except OSError as exc:
        parent_environ = f"unreadable: {type(exc).__name__}"
    with open("/proc/self/environ", "rb") as f:
        own_environ = f.read().decode("utf-8", "replace")
    return {
        "scalar": await dsn.scalar("SELECT current_user"),
        "errors": errors,
        "http": [response.status_code, response.text, dict(response.headers)],
        "environ": dict(os.environ),
        "proc_self_environ": own_environ,
        "parent_environ": parent_environ,
        "connectors": [repr(c) for c in (pg, api, dsn, down)],
        "info": [str(c._info) for c in (pg, api, dsn, down)],
    }


async def logged_calls(ctx, *, lite, api, marker, **_):
    t, h = ctx.get_connector(lite), ctx.get_connector(api)
    await t.execute("CREATE TABLE logged (id INTEGER PRIMARY KEY, secret_note TEXT)")
    await t.execute("INSERT INTO logged (id, secret_note) VALUES (?, ?)", 1, marker)
    await t.executemany("INSERT INTO logged (id, secret_note) VALUES (?, ?)", [(2, marker), (3, marker)])
    n = await t.scalar("SELECT count(*) FROM logged WHERE secret_note = ?", marker)
    rows = await t.fetch("SELECT id FROM logged WHERE secret_note = ?", marker)
    one = await t.fetchrow("SELECT id FROM logged WHERE secret_note = ? LIMIT 1", marker)
    streamed = [r async for r in t.stream("SELECT id FROM logged WHERE secret_note = ?", marker, batch_size=2)]
    await h.post("/notes", json={"note": marker}, params={"who": marker})
    return {"n": n, "rows": len(rows), "one": one["id"], "streamed": len(streamed)}
'''


# --- servers and files ----------------------------------------------------------------


@attrs.define
class HttpServer:
    url: str
    port: int
    token: str
    api_key: str
    received: list[dict[str, Any]]


def _handler(received: list[dict[str, Any]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        """Answers with what it parsed, never with the headers it got (they hold the secrets)."""

        protocol_version = "HTTP/1.1"

        def _handle(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            received.append(
                {"method": self.command, "path": url.path, "query": parse_qs(url.query),
                 "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body.decode()}
            )
            payload = json.dumps(
                {"method": self.command, "path": url.path, "query": parse_qs(url.query),
                 "json": json.loads(body) if body else None}
            ).encode()
            self.send_response(201 if self.command == "POST" else 200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("X-Server", "e2e")
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def http_server() -> Iterator[HttpServer]:
    received: list[dict[str, Any]] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(received))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    yield HttpServer(f"http://127.0.0.1:{port}", port, "tok-" + secrets.token_hex(16), "key-" + secrets.token_hex(16), received)
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class World:
    """One test's plugins directory, connectors.toml and secrets (in this process's environment)."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp = tmp_path
        self.monkeypatch = monkeypatch
        self.plugins = tmp_path / "plugins"
        self.plugins.mkdir()
        (self.plugins / "e2e.py").write_text(E2E_PLUGIN)
        self.sqlite_path = tmp_path / "lite.db"
        self.sections = [
            '[lite]\ntype = "sqlite"\npath = "lite.db"\ntimeout_seconds = 1\n',
            '[mem]\ntype = "sqlite"\npath = ":memory:"\n',
        ]
        self.secrets: dict[str, str] = {}

    def add(self, section: str) -> None:
        self.sections.append(textwrap.dedent(section))

    def secret(self, var: str, value: str) -> None:
        self.secrets[var] = value
        self.monkeypatch.setenv(var, value)

    def add_postgres(self, pg: PgServer, name: str = "pg", *, pool_max: int = 2, call_timeout: float = 20) -> None:
        self.secret("E2E_PG_PASSWORD", pg.app_password)
        self.add(
            f"""
            [{name}]
            type = "postgres"
            host = "{pg.host}"
            port = {pg.port}
            dbname = "{pg.dbname}"
            user = "{pg.app_user}"
            password_env = "E2E_PG_PASSWORD"
            pool_min = 0
            pool_max = {pool_max}
            call_timeout_seconds = {call_timeout}
            """
        )

    def add_http(self, server: HttpServer, name: str = "api") -> None:
        self.secret("E2E_API_TOKEN", server.token)
        self.secret("E2E_API_KEY", server.api_key)
        self.add(
            f"""
            [{name}]
            type = "http"
            base_url = "{server.url}"
            token_env = "E2E_API_TOKEN"
            headers = {{ "X-Client" = "nomaflow-e2e" }}
            headers_env = {{ "X-Api-Key" = "E2E_API_KEY" }}
            timeout_seconds = 5
            """
        )

    def connectors_file(self) -> Path:
        path = self.tmp / "connectors.toml"
        path.write_text("\n".join(self.sections))
        return path

    def supervisor(self, plugins: Path | None = None, **kwargs: Any) -> Supervisor:
        return Supervisor(plugins=plugins or self.plugins, history=":memory:", connectors=self.connectors_file(), **kwargs)

    async def run(self, *steps: Step, plugins: Path | None = None, **job_kwargs: Any) -> tuple[RunView, list[LogLine]]:
        async with self.supervisor(plugins) as sup:
            run = await sup.run(Job(name=job_kwargs.pop("name", "e2e"), steps=list(steps), **job_kwargs))
            return run, sup.store.logs(run.run_id)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    return World(tmp_path, monkeypatch)


@pytest.fixture
def pg_world(world: World, postgres_server: PgServer) -> World:
    world.add_postgres(postgres_server)
    return world


def step(python: str, name: str = "s", *, connectors: list[str] | None = None, **kwargs: Any) -> Step:
    kwargs.setdefault("timeout_seconds", 30)
    kwargs.setdefault("cancel_grace_seconds", 2)
    return Step(name=name, python=python, connectors=connectors or [], **kwargs)


def succeeded(run: RunView) -> list[Any]:
    assert run.status == "SUCCEEDED", [(s.name, s.status, s.error) for s in run.steps]
    return [s.output for s in run.steps]


# SQLite file, SQLite :memory: and PostgreSQL: (connector, placeholder, driver kind)
SQL_TARGETS = pytest.mark.parametrize(
    "target", [("lite", "?", "sqlite"), ("mem", "?", "sqlite"), ("pg", "%s", "postgres")], ids=["sqlite", "memory", "pg"]
)


def _prepare(request: pytest.FixtureRequest, world: World, target: tuple[str, str, str]) -> tuple[str, str, str]:
    if target[2] == "postgres":
        world.add_postgres(request.getfixturevalue("postgres_server"))
    return target


# --- the spec's examples ---------------------------------------------------------------


async def test_spec_refresh_view_counts_the_refreshed_materialized_view(world: World, postgres_server: PgServer) -> None:
    world.add_postgres(postgres_server)
    with psycopg.connect(**postgres_server.params(), autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS reporting CASCADE")
        conn.execute("CREATE SCHEMA reporting")
        conn.execute("CREATE TABLE reporting.orders (id serial PRIMARY KEY, day date NOT NULL, amount numeric)")
        conn.execute(
            "CREATE MATERIALIZED VIEW reporting.daily_summary AS "
            "SELECT day, count(*) AS orders, sum(amount) AS total FROM reporting.orders GROUP BY day WITH NO DATA"
        )
        conn.execute(
            "INSERT INTO reporting.orders (day, amount) "
            "SELECT DATE '2026-04-01' + (i % 7), i FROM generate_series(1, 200) AS i"
        )
    run, logs = await world.run(
        step("examples.connectors_demo:refresh_view", name="refresh", connectors=["pg"], op_kwargs={"target_connector": "pg"}),
        plugins=SPEC_PLUGINS,
    )
    assert succeeded(run) == [{"rows_after_refresh": 7}]
    assert "refreshed view · 7 rows" in [line.message for line in logs if line.stream == "log"]
    with postgres_server.admin_connect() as conn:
        assert conn.execute("SELECT count(*) FROM reporting.daily_summary").fetchone() == (7,)


def _orders(path: Path, n: int) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, amount REAL)")
        db.executemany("INSERT INTO orders (amount) VALUES (?)", [(i * 1.5,) for i in range(n)])
    db.close()


async def test_spec_shared_helper_asserts_the_row_count_on_sqlite(world: World) -> None:
    world.add('[reporting]\ntype = "sqlite"\npath = "reporting.db"\n')
    _orders(world.tmp / "reporting.db", 150)
    run, logs = await world.run(
        step("reports.orders_summary:generate_monthly", connectors=["reporting"]), plugins=SPEC_PLUGINS, params={"period": "2026-04"}
    )
    assert succeeded(run) == [{"period": "2026-04", "orders": 150}]


async def test_spec_shared_helper_fails_below_the_floor(world: World) -> None:
    world.add('[reporting]\ntype = "sqlite"\npath = "reporting.db"\n')
    _orders(world.tmp / "reporting.db", 42)
    run, _ = await world.run(
        step("reports.orders_summary:generate_monthly", connectors=["reporting"]), plugins=SPEC_PLUGINS, params={"period": "2026-04"}
    )
    assert run.status == "FAILED"
    assert run.steps[0].error["type"] == "RuntimeError"
    assert run.steps[0].error["message"] == "row count 42 below floor 100"


# --- the SQL surface --------------------------------------------------------------------


@SQL_TARGETS
async def test_every_sql_method_works_from_a_plugin(request: pytest.FixtureRequest, world: World, target: tuple[str, str, str]) -> None:
    conn, ph, _ = _prepare(request, world, target)
    table = unique("methods")
    run, _ = await world.run(step("e2e:sql_methods", connectors=[conn], op_kwargs={"conn": conn, "table": table, "ph": ph}))
    (out,) = succeeded(run)
    assert out == {
        "executemany": 3,
        "execute_update": 2,
        "execute_nothing": 0,
        "scalar": 3,
        "scalar_none": None,
        "fetch": [{"id": 1, "name": "a"}, {"id": 2, "name": "b!"}, {"id": 3, "name": "c!"}],
        "fetch_empty": [],
        "fetchrow": {"id": 2, "name": "b!"},
        "fetchrow_none": None,
    }


def _direct_duplicate_message(kind: str, world: World, pg: PgServer | None, table: str) -> str:
    """The message the driver itself gives for the same duplicate insert, in this process."""
    if kind == "sqlite":
        with sqlite3.connect(world.sqlite_path) as db:
            try:
                db.execute(f"INSERT INTO {table} (id) VALUES (1)")
            except sqlite3.IntegrityError as exc:
                return str(exc)
    else:
        assert pg is not None
        with psycopg.connect(**pg.params(), autocommit=True) as db:
            try:
                db.execute(f"INSERT INTO {table} (id) VALUES (1)")
            except psycopg.errors.UniqueViolation as exc:
                return str(exc)
    raise AssertionError("the direct insert did not fail")


@pytest.mark.parametrize("target", [("lite", "sqlite"), ("pg", "postgres")], ids=["sqlite", "pg"])
async def test_plugin_catches_the_drivers_own_integrity_error(
    request: pytest.FixtureRequest, world: World, target: tuple[str, str]
) -> None:
    conn, kind = target
    pg = request.getfixturevalue("postgres_server") if kind == "postgres" else None
    if pg:
        world.add_postgres(pg)
    table = unique("dup")
    run, _ = await world.run(
        step("e2e:duplicate_key", connectors=[conn], op_kwargs={"conn": conn, "table": table, "kind": kind, "catch": True})
    )
    (out,) = succeeded(run)
    expected = {"sqlite": "sqlite3.IntegrityError", "postgres": "psycopg.errors.UniqueViolation"}[kind]
    assert out["caught"] == expected
    assert out["is_integrity_error"] is True
    assert out["message"] == _direct_duplicate_message(kind, world, pg, table)
    if pg:
        assert out["sqlstate"] == "23505"


@pytest.mark.parametrize("target", [("lite", "sqlite"), ("pg", "postgres")], ids=["sqlite", "pg"])
async def test_uncaught_driver_error_is_the_steps_error_type(
    request: pytest.FixtureRequest, world: World, target: tuple[str, str]
) -> None:
    conn, kind = target
    pg = request.getfixturevalue("postgres_server") if kind == "postgres" else None
    if pg:
        world.add_postgres(pg)
    table = unique("dup")
    run, _ = await world.run(
        step("e2e:duplicate_key", connectors=[conn], op_kwargs={"conn": conn, "table": table, "kind": kind, "catch": False})
    )
    assert run.status == "FAILED"
    error = run.steps[0].error
    assert error["reason"] == "exception"
    assert error["type"] == {"sqlite": "sqlite3.IntegrityError", "postgres": "psycopg.errors.UniqueViolation"}[kind]
    assert error["message"] == _direct_duplicate_message(kind, world, pg, table)
    assert "duplicate_key" in error["traceback"]


async def test_connector_not_listed_by_the_step_is_a_permission_error(world: World) -> None:
    run, _ = await world.run(step("e2e:use_connector", name="sneaky", connectors=["mem"], op_kwargs={"conn": "lite"}))
    error = run.steps[0].error
    assert run.status == "FAILED" and error["type"] == "PermissionError"
    assert "'sneaky'" in error["message"] and "'lite'" in error["message"]


async def test_unknown_connector_is_a_lookup_error(world: World) -> None:
    run, _ = await world.run(step("e2e:use_connector", connectors=["lite"], op_kwargs={"conn": "warehouse"}))
    error = run.steps[0].error
    assert run.status == "FAILED" and error["type"] == "LookupError"
    assert "'warehouse'" in error["message"]


@pytest.mark.parametrize("target", [("lite", "?"), ("pg", "%s")], ids=["sqlite", "pg"])
async def test_transaction_commits_and_rolls_back_as_later_steps_see(
    request: pytest.FixtureRequest, world: World, target: tuple[str, str]
) -> None:
    conn, ph = target
    if conn == "pg":
        world.add_postgres(request.getfixturevalue("postgres_server"))
    table = unique("tx")
    kw = {"conn": conn, "table": table, "ph": ph}
    run, _ = await world.run(
        step("e2e:tx_create", "create", connectors=[conn], op_kwargs=kw),
        step("e2e:tx_commit", "commit", connectors=[conn], op_kwargs=kw),
        step("e2e:tx_rollback", "rollback", connectors=[conn], op_kwargs=kw),
        step("e2e:read_ids", "read", connectors=[conn], op_kwargs=kw),
    )
    _, committed, rolled_back, read = succeeded(run)
    assert committed == {"inside": 2}
    assert rolled_back == {"inside": 3, "outside": 2, "error": "abandon the transaction"}
    assert read == {"ids": [1, 2]}


async def test_concurrent_calls_of_one_step_share_the_postgres_pool(world: World, postgres_server: PgServer) -> None:
    world.add_postgres(postgres_server, "pgpool", pool_max=4)
    run, _ = await world.run(
        step("e2e:concurrent_calls", connectors=["pgpool"], op_kwargs={"conn": "pgpool", "sql": "SELECT pg_sleep(0.5)", "n": 4})
    )
    (out,) = succeeded(run)
    assert out["values"] == 4
    assert out["seconds"] < 1.5, f"4 x 0.5 s queries on a pool of 4 took {out['seconds']:.2f} s: they ran one by one"


async def test_a_step_timing_out_mid_query_cancels_the_query_on_the_server(world: World, postgres_server: PgServer) -> None:
    world.add_postgres(postgres_server, "pgslow", pool_max=1)
    async with world.supervisor() as sup:
        started = trio.current_time()
        run = await sup.run(Job(name="slow", steps=[
            step("e2e:long_query", connectors=["pgslow"], timeout_seconds=1, cancel_grace_seconds=1, op_kwargs={"conn": "pgslow"})
        ]))
        assert run.status == "TIMED_OUT"
        assert trio.current_time() - started < 15
        with postgres_server.admin_connect() as admin:
            active = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'nomaflow:pgslow' AND query LIKE '%pg_sleep(60)%' "
                "AND state = 'active'"
            ).fetchone()[0]
        assert active == 0, "the query still runs on the server"
        again = await sup.run(Job(name="again", steps=[step("e2e:use_connector", connectors=["pgslow"], op_kwargs={"conn": "pgslow"})]))
        assert succeeded(again) == [{"value": 1}]


# --- streaming ----------------------------------------------------------------------------

_SQLITE_SERIES = (
    "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n}) "
    "SELECT i, printf('%0200d', i) AS pad FROM s"
)
_PG_SERIES = "SELECT i, lpad(i::text, 200, '0') AS pad FROM generate_series(1, {n}) AS i"


async def _rss_growth_while(run: Any) -> tuple[Any, int]:
    """Run `run()` while sampling this (the supervisor's) process RSS; returns (result, peak growth)."""
    me = psutil.Process()
    base = peak = me.memory_info().rss
    result: list[Any] = []

    async with trio.open_nursery() as nursery:

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, me.memory_info().rss)
                await trio.sleep(0.01)

        nursery.start_soon(sample)
        result.append(await run())
        nursery.cancel_scope.cancel()
    return result[0], peak - base


@pytest.mark.parametrize("target", [("lite", _SQLITE_SERIES), ("mem", _SQLITE_SERIES), ("pg", _PG_SERIES)], ids=["sqlite", "memory", "pg"])
async def test_stream_of_100k_rows_in_small_batches_keeps_the_supervisors_memory_flat(
    request: pytest.FixtureRequest, world: World, target: tuple[str, str]
) -> None:
    conn, series = target
    if conn == "pg":
        world.add_postgres(request.getfixturevalue("postgres_server"))
    n = 100_000
    kw = {"conn": conn, "sql": series.format(n=n), "batch_size": 500, "trace": True}
    stream = step("e2e:stream_rows", connectors=[conn], op_kwargs=kw)
    warm_up = attrs.evolve(stream, op_kwargs={**kw, "sql": series.format(n=2000)})
    async with world.supervisor() as sup:
        succeeded(await sup.run(Job(name="warm-up", steps=[warm_up])))  # imports, pools, caches: not measured
        run, growth = await _rss_growth_while(lambda: sup.run(Job(name="stream", steps=[stream])))
    (out,) = succeeded(run)
    assert {k: out[k] for k in ("rows", "first", "last")} == {"rows": n, "first": 1, "last": n}
    # 100k rows of ~220 bytes are ~50 MB as Python objects if buffered anywhere; two 500-row batches ~0.5 MB.
    assert growth < 8 * 1024 * 1024, f"supervisor RSS grew {growth / 2**20:.1f} MiB while streaming"
    assert out["peak_growth_mib"] < 6, f"the child's peak RSS grew {out['peak_growth_mib']:.1f} MiB while streaming"


async def test_a_child_that_grants_credit_but_reads_nothing_cannot_make_the_supervisor_buffer_the_table(
    world: World,
) -> None:
    # 300k rows of ~210 bytes: ~90 MB of `rows` lines if the supervisor encoded them all.
    kw = {"conn": "mem", "sql": _SQLITE_SERIES.format(n=300_000), "seconds": 3.0}
    hog = step("e2e:hog_stream_credit", connectors=["mem"], op_kwargs=kw)
    warm_up = attrs.evolve(hog, op_kwargs={**kw, "sql": _SQLITE_SERIES.format(n=5000), "seconds": 0.2})
    async with world.supervisor() as sup:
        succeeded(await sup.run(Job(name="warm-up", steps=[warm_up])))
        run, growth = await _rss_growth_while(lambda: sup.run(Job(name="hog", steps=[hog])))
    (out,) = succeeded(run)
    assert out["batches"] >= 1  # it was streaming
    assert growth < 16 * 1024 * 1024, f"supervisor RSS grew {growth / 2**20:.1f} MiB for a child reading nothing"


async def test_calls_inside_a_transaction_interleave_with_its_stream_without_stalls(world: World) -> None:
    # The stream and the calls share the transaction's connection: the stream must not hold it waiting for credit.
    run, _ = await world.run(step("e2e:write_per_streamed_row", connectors=["lite"], op_kwargs={"conn": "lite", "n": 300}))
    (out,) = succeeded(run)
    assert out["seen"] == 300
    assert out["seconds"] < 5, out  # 300 one-row batches: a 50 ms stall per credit grant would be 7.5 s


async def test_a_slow_reader_of_a_stream_ending_on_a_batch_boundary_finishes(world: World) -> None:
    # The supervisor sends the last full batch and then, on the credit it still holds, the end marker;
    # the child, still reading, grants credit for a stream the supervisor has already finished.
    run, _ = await world.run(step("e2e:exact_batches", connectors=["lite"], op_kwargs={"conn": "lite"}))
    assert succeeded(run) == [{"total": 10}]


async def test_breaking_out_after_the_supervisor_finished_the_stream_is_fine(world: World) -> None:
    run, _ = await world.run(step("e2e:late_break", connectors=["lite"], op_kwargs={"conn": "lite"}))
    assert succeeded(run) == [{"first": 1, "after": 3}]


async def test_break_out_of_a_postgres_stream_closes_the_server_cursor(world: World, postgres_server: PgServer) -> None:
    world.add_postgres(postgres_server, "pgone", pool_max=1, call_timeout=10)
    seq = unique("fetched")
    with postgres_server.admin_connect() as admin:
        admin.execute(f"CREATE SEQUENCE {seq}")
        admin.execute(f"GRANT USAGE, SELECT, UPDATE ON SEQUENCE {seq} TO {postgres_server.app_user}")
    sql = f"SELECT i, nextval('{seq}') AS fetched FROM generate_series(1, 100000) AS i"
    run, _ = await world.run(
        step(
            "e2e:stream_rows",
            connectors=["pgone"],
            op_kwargs={
                "conn": "pgone", "sql": sql, "batch_size": 100, "stop_after": 250,
                # One pooled connection: these run on the connection that held the cursor.
                "then": ["SELECT count(*) FROM pg_cursors", "SELECT 'reusable'"],
            },
        )
    )
    (out,) = succeeded(run)
    assert out == {"rows": 250, "first": 1, "last": 250, "after": [0, "reusable"]}
    with postgres_server.admin_connect() as admin:
        fetched = admin.execute(f"SELECT last_value FROM {seq}").fetchone()[0]
    # The server produced only what was fetched: the batches consumed plus at most the credit in flight
    # (the initial credit, one more for each of the two batches finished, one batch of slack).
    assert 250 <= fetched <= 100 * (STREAM_CREDIT + 3), fetched


async def test_break_out_of_a_sqlite_stream_releases_the_read_lock(world: World) -> None:
    with sqlite3.connect(world.sqlite_path) as db:
        db.execute("CREATE TABLE big (i INTEGER PRIMARY KEY)")
        db.execute(
            "INSERT INTO big (i) WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 100000) SELECT i FROM s"
        )
    db.close()
    run, _ = await world.run(
        step("e2e:stream_rows", "stream", connectors=["lite"],
             op_kwargs={"conn": "lite", "sql": "SELECT i FROM big ORDER BY i", "batch_size": 100, "stop_after": 150}),
        # An open read cursor would make this write fail with "database is locked" (timeout_seconds = 1).
        step("e2e:write_after", "write", connectors=["lite"], op_kwargs={"conn": "lite", "sql": "DELETE FROM big WHERE i > 10"}),
    )
    streamed, wrote = succeeded(run)
    assert streamed["rows"] == 150 and streamed["last"] == 150
    assert wrote == {"rowcount": 100_000 - 10}


async def test_cancelled_postgres_stream_leaves_no_transaction_open(world: World, postgres_server: PgServer) -> None:
    world.add_postgres(postgres_server, "pgone", pool_max=1, call_timeout=10)
    seq = unique("fetched")
    with postgres_server.admin_connect() as admin:
        admin.execute(f"CREATE SEQUENCE {seq}")
        admin.execute(f"GRANT USAGE, SELECT, UPDATE ON SEQUENCE {seq} TO {postgres_server.app_user}")
    sql = f"SELECT i, nextval('{seq}') AS fetched FROM generate_series(1, 1000000) AS i"
    async with world.supervisor() as sup:
        slow = await sup.run(Job(name="slow", steps=[
            step("e2e:stream_rows", connectors=["pgone"], timeout_seconds=1.5, cancel_grace_seconds=1,
                 op_kwargs={"conn": "pgone", "sql": sql, "batch_size": 50, "delay": 0.001}),
        ]))
        assert slow.status == "TIMED_OUT"
        with postgres_server.admin_connect() as admin:
            states = admin.execute(
                "SELECT state FROM pg_stat_activity WHERE application_name = 'nomaflow:pgone'"
            ).fetchall()
            fetched = admin.execute(f"SELECT last_value FROM {seq}").fetchone()[0]
        assert ("idle in transaction",) not in states and ("active",) not in states, states
        assert fetched < 1_000_000
        again = await sup.run(Job(name="again", steps=[step("e2e:use_connector", connectors=["pgone"], op_kwargs={"conn": "pgone"})]))
        assert succeeded(again) == [{"value": 1}]


async def test_a_result_over_the_line_cap_fails_the_call_not_the_supervisor(world: World) -> None:
    run, _ = await world.run(step("e2e:oversize_fetch", connectors=["mem"], op_kwargs={"conn": "mem"}))
    (out,) = succeeded(run)
    assert "error" in out, out
    assert "stream" in out["message"], out  # tells the plugin author what to do instead
    assert out["after"] == 1


async def test_a_stream_batch_over_the_line_cap_is_not_blamed_on_the_child(world: World) -> None:
    run, _ = await world.run(step("e2e:oversize_stream_batch", connectors=["mem"], op_kwargs={"conn": "mem"}))
    (out,) = succeeded(run)
    # Either the supervisor splits the batch, or the plugin gets an error it can act on.
    assert out["rows"] == 5000 or "batch_size" in out.get("message", ""), out


# --- values across the pipe ----------------------------------------------------------------

_EXACT = {"equal": True, "same_type": True, "same_offset": True}


async def test_typed_values_round_trip_exactly_through_postgres(pg_world: World) -> None:
    run, _ = await pg_world.run(step("e2e:pg_values", connectors=["pg"], op_kwargs={"conn": "pg", "table": unique("vals")}))
    (out,) = succeeded(run)
    for way in ("echoed", "stored", "streamed"):
        for key, check in out[way].items():
            if key == "ts" and way != "stored":
                # Outside the SET LOCAL transaction the instant comes back in the server's zone: equal, other offset.
                assert check["equal"] and check["same_type"], (way, key, check)
                continue
            assert {k: check[k] for k in _EXACT} == _EXACT, (way, key, check)
    assert "Asia/Kolkata" in out["zone"]
    assert out["matched_by_param"] == 1


async def test_plain_values_round_trip_exactly_through_sqlite(world: World) -> None:
    run, _ = await world.run(step("e2e:sqlite_values", connectors=["lite"], op_kwargs={"conn": "lite"}))
    (out,) = succeeded(run)
    assert all(v == {"equal": True, "same_type": True} for v in out.values()), out


# --- HTTP ---------------------------------------------------------------------------------


async def test_http_methods_send_json_and_the_secret_headers_from_env(world: World, http_server: HttpServer) -> None:
    world.add_http(http_server)
    run, _ = await world.run(step("e2e:http_calls", connectors=["api"], op_kwargs={"conn": "api"}))
    (out,) = succeeded(run)
    assert out["get"] == [200, {"method": "GET", "path": "/items", "query": {"q": ["blue widgets"], "page": ["2"]}, "json": None}, "e2e"]
    assert out["post"] == [201, {"method": "POST", "path": "/items", "query": {}, "json": {"name": "widget", "price": 9.5, "tags": ["a", "b"]}}]
    assert (out["put"], out["patch"], out["delete"], out["request"]) == ("PUT", "PATCH", [200, "DELETE"], "/health")
    assert out["text_is_json"] is True
    assert [r["method"] for r in http_server.received] == ["GET", "POST", "PUT", "PATCH", "DELETE", "GET"]
    for request in http_server.received:
        assert request["headers"]["authorization"] == f"Bearer {http_server.token}"
        assert request["headers"]["x-api-key"] == http_server.api_key
        assert request["headers"]["x-client"] == "nomaflow-e2e"
    assert http_server.received[0]["headers"]["x-trace"] == "trace-1"
    assert json.loads(http_server.received[1]["body"]) == {"name": "widget", "price": 9.5, "tags": ["a", "b"]}


async def test_network_false_child_cannot_reach_the_server_but_its_connector_can(world: World, http_server: HttpServer) -> None:
    world.add_http(http_server)
    kw = {"conn": "api", "port": http_server.port}
    run, _ = await world.run(
        step("e2e:network_probe", "open", connectors=["api"], op_kwargs=kw),
        step("e2e:network_probe", "closed", connectors=["api"], op_kwargs=kw, limits=Limits(network=False)),
    )
    open_, closed = succeeded(run)
    assert open_ == {"direct": "connected", "via_connector": 200}
    assert closed["direct"] in ("ConnectionRefusedError", "OSError") and closed["via_connector"] == 200


# --- security -------------------------------------------------------------------------------


def _readable_forms(data: bytes) -> Iterator[bytes]:
    """The bytes themselves plus every base64 string inside them decoded (pickled exceptions travel so)."""
    yield data
    for line in data.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        stack = [message]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
            elif isinstance(item, str) and len(item) >= 16:
                try:
                    yield base64.b64decode(item, validate=True)
                except (binascii.Error, ValueError):
                    pass


@pytest.mark.parametrize("start_mode", ["zygote", "spawn"])
async def test_secrets_never_reach_the_child(
    world: World, postgres_server: PgServer, http_server: HttpServer, monkeypatch: pytest.MonkeyPatch, start_mode: str
) -> None:
    world.add_postgres(postgres_server)
    world.add_http(http_server)
    dsn = postgres_server.dsn()
    world.secret("E2E_PG_DSN", dsn)
    world.secret("E2E_DOWN_TOKEN", "down-" + secrets.token_hex(16))
    world.add('[pgdsn]\ntype = "postgres"\ndsn_env = "E2E_PG_DSN"\npool_min = 0\n')
    world.add(f'[api_down]\ntype = "http"\nbase_url = "http://127.0.0.1:{_closed_port()}"\ntoken_env = "E2E_DOWN_TOKEN"\n')
    sent: list[bytes] = []
    original = AttemptSession._send_bytes  # every byte the supervisor writes to a child's protocol pipe

    async def recording_send_bytes(self: AttemptSession, data: bytes, **kwargs: Any) -> None:
        sent.append(bytes(data))
        await original(self, data, **kwargs)

    monkeypatch.setattr(AttemptSession, "_send_bytes", recording_send_bytes)
    async with world.supervisor(start_mode=start_mode) as sup:
        run = await sup.run(
            Job(name="leak", log_level="DEBUG", steps=[
                step("e2e:leak_probe", connectors=["pg", "api", "pgdsn", "api_down"], op_kwargs={"supervisor_pid": os.getpid()})
            ])
        )
        logs = sup.store.logs(run.run_id)
    (out,) = succeeded(run)
    # The probe really used every connector, so every secret was in play.
    assert out["scalar"] == postgres_server.app_user
    assert len(out["errors"]) == 3 and out["http"][0] == 200
    assert http_server.received[-1]["headers"]["authorization"] == f"Bearer {http_server.token}"
    wire = b"".join(sent)
    assert b'"t":"start"' in wire.replace(b" ", b"") and b'"t":"reply"' in wire.replace(b" ", b"")
    values = {
        "pg password": postgres_server.app_password,
        "dsn": dsn,
        "token": http_server.token,
        "api key": http_server.api_key,
        "down token": world.secrets["E2E_DOWN_TOKEN"],
    }
    for var, value in world.secrets.items():
        assert os.environ[var] == value  # the supervisor holds it ...
    readable = list(_readable_forms(wire))
    child_side = json.dumps(out)
    for what, value in values.items():
        assert not any(value.encode() in chunk for chunk in readable), f"{what} was sent to the child"
        assert value not in child_side, f"{what} reached the child's output"
        assert not any(value in line.message for line in logs), f"{what} is in the run log"
    assert not set(world.secrets) & set(out["environ"]), "a secret variable is in the child's environment"
    assert out["parent_environ"].startswith("unreadable"), "the child could read the supervisor's environment"


async def test_connector_calls_are_logged_at_debug_with_sql_but_never_parameters(world: World, http_server: HttpServer) -> None:
    world.add_http(http_server)
    marker = "param-" + secrets.token_hex(8)
    run, logs = await world.run(
        step("e2e:logged_calls", connectors=["lite", "api"], op_kwargs={"lite": "lite", "api": "api", "marker": marker}),
        log_level="DEBUG",
    )
    assert succeeded(run) == [{"n": 3, "rows": 3, "one": 1, "streamed": 3}]
    calls = [(line.level, line.message) for line in logs if line.message.startswith("connector ")]
    assert ("DEBUG", "connector lite.execute: INSERT INTO logged (id, secret_note) VALUES (?, ?)") in calls
    assert ("DEBUG", "connector lite.executemany: INSERT INTO logged (id, secret_note) VALUES (?, ?)") in calls
    assert ("DEBUG", "connector lite.scalar: SELECT count(*) FROM logged WHERE secret_note = ?") in calls
    assert ("DEBUG", "connector lite.stream: SELECT id FROM logged WHERE secret_note = ?") in calls
    assert ("DEBUG", "connector api.post: POST /notes") in calls
    assert {line.stream for line in logs if line.message.startswith("connector ")} == {"system"}
    assert not [line.message for line in logs if marker in line.message]
    assert http_server.received[-1]["query"] == {"who": [marker]}  # the parameters did travel
