"""A session enforces the step's connectors list and logs calls without their parameters."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio

from liberty.jobs.connectors import ConnectorRegistry, ConnectorSession, HttpConfig, SqliteConfig
from liberty.jobs.errors import ProtocolError

pytestmark = pytest.mark.trio

CONFIGS = {
    "reporting": SqliteConfig(name="reporting", path=":memory:"),
    "crm": SqliteConfig(name="crm", path=":memory:"),
    "api": HttpConfig(name="api", base_url="http://127.0.0.1:9", headers={"Authorization": "Bearer s3cr3t"}),
}


async def test_describe_tells_the_child_the_kind_and_methods() -> None:
    async with ConnectorRegistry(CONFIGS) as reg, reg.session("load", ["reporting", "api"]) as s:
        sql = s.describe("reporting")
        assert (sql["name"], sql["type"], sql["kind"]) == ("reporting", "sqlite", "sql")
        assert {"execute", "scalar", "fetch", "stream", "begin"} <= set(sql["methods"])
        assert s.describe("api")["kind"] == "http" and "post" in s.describe("api")["methods"]
        assert await s.call("reporting", "describe", [], {}) == sql


async def test_describe_never_carries_a_secret() -> None:
    async with ConnectorRegistry(CONFIGS) as reg, reg.session("load", ["api"]) as s:
        assert "s3cr3t" not in repr(s.describe("api")) and "127.0.0.1" not in repr(s.describe("api"))


async def test_an_unlisted_connector_is_a_permission_error_naming_step_and_connector() -> None:
    async with ConnectorRegistry(CONFIGS) as reg, reg.session("load", ["reporting"]) as s:
        for attempt in (
            lambda: s.call("crm", "scalar", ["SELECT 1"], {}),
            lambda: s.stream_open("crm", "SELECT 1", [], 10),
        ):
            with pytest.raises(PermissionError) as info:
                await attempt()
            message = str(info.value)
            assert "step 'load'" in message and "connector 'crm'" in message
            assert 'connectors = ["crm"]' in message
        with pytest.raises(PermissionError):
            s.describe("crm")


async def test_an_unknown_connector_is_a_lookup_error_listing_the_known_ones() -> None:
    async with ConnectorRegistry(CONFIGS) as reg, reg.session("load", ["reporting", "nope"]) as s:
        with pytest.raises(LookupError, match=r"connector 'nope' is not configured; known: api, crm, reporting"):
            await s.call("nope", "scalar", ["SELECT 1"], {})
        with pytest.raises(LookupError):
            s.describe("nope")


async def test_a_stream_on_an_http_connector_is_refused() -> None:
    async with ConnectorRegistry(CONFIGS) as reg, reg.session("load", ["api"]) as s:
        with pytest.raises(AttributeError, match="only SQL connectors can stream"):
            await s.stream_open("api", "SELECT 1", [], 10)


async def test_calls_are_logged_with_sql_text_and_never_parameters() -> None:
    lines: list[str] = []
    async with ConnectorRegistry(CONFIGS) as reg, reg.session("load", ["reporting"], on_call=lines.append) as s:
        await s.call("reporting", "execute", ["CREATE TABLE t (\n  secret TEXT\n)"], {})
        await s.call("reporting", "execute", ["INSERT INTO t VALUES (?)", "hunter2-param"], {})
        tx = await s.call("reporting", "begin", [], {})
        await s.call("reporting", "commit", [], {}, tx=tx)
        sid = await s.stream_open("reporting", "SELECT * FROM t WHERE secret = ?", ["hunter2-param"], 10)
        await s.stream_close(sid)
    assert lines == [
        "connector reporting.execute: CREATE TABLE t ( secret TEXT )",
        "connector reporting.execute: INSERT INTO t VALUES (?)",
        "connector reporting.begin",
        "connector reporting.commit",
        "connector reporting.stream: SELECT * FROM t WHERE secret = ?",
    ]


async def test_a_transaction_id_of_another_connector_is_a_protocol_error() -> None:
    async with ConnectorRegistry(CONFIGS) as reg, reg.session("load", ["reporting", "crm"]) as s:
        tx = await s.call("reporting", "begin", [], {})
        with pytest.raises(ProtocolError, match="belongs to connector 'reporting'"):
            await s.call("crm", "scalar", ["SELECT 1"], {}, tx=tx)
        with pytest.raises(ProtocolError, match="without a transaction id"):
            await s.call("crm", "commit", [], {})


async def test_a_closed_session_refuses_calls() -> None:
    async with ConnectorRegistry(CONFIGS) as reg:
        async with reg.session("load", ["reporting"]) as s:
            pass
        with pytest.raises(RuntimeError, match="closed"):
            await s.call("reporting", "scalar", ["SELECT 1"], {})


async def test_a_closed_registry_refuses_calls() -> None:
    async with ConnectorRegistry(CONFIGS) as reg:
        pass
    async with reg.session("load", ["reporting"]) as s:
        with pytest.raises(RuntimeError, match="registry is closed"):
            await s.call("reporting", "scalar", ["SELECT 1"], {})


async def test_the_memory_database_is_shared_by_sessions_but_a_transaction_holds_it() -> None:
    cfg = {"m": SqliteConfig(name="m", path=":memory:", call_timeout_seconds=0.5)}
    async with ConnectorRegistry(cfg) as reg:
        async with reg.session("a", ["m"]) as s1, reg.session("b", ["m"]) as s2:
            await s1.call("m", "execute", ["CREATE TABLE t (x)"], {})
            assert await s2.call("m", "scalar", ["SELECT count(*) FROM t"], {}) == 0
            tx = await s1.call("m", "begin", [], {})
            with pytest.raises(TimeoutError, match="'m': scalar did not finish within 0.5 s"):
                await s2.call("m", "scalar", ["SELECT count(*) FROM t"], {})
            await s1.call("m", "rollback", [], {}, tx=tx)
            assert await s2.call("m", "scalar", ["SELECT count(*) FROM t"], {}) == 0


async def test_concurrent_calls_on_one_transaction_are_serialised() -> None:
    cfg = {"m": SqliteConfig(name="m", path=":memory:")}
    async with ConnectorRegistry(cfg) as reg, reg.session("a", ["m"]) as s:
        await s.call("m", "execute", ["CREATE TABLE t (x)"], {})
        tx = await s.call("m", "begin", [], {})
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(s.call, "m", "execute", ["INSERT INTO t VALUES (?)", i], {}, tx)
        await s.call("m", "commit", [], {}, tx=tx)
        assert await s.call("m", "scalar", ["SELECT count(*) FROM t"], {}) == 20


async def test_registry_check_reports_without_secrets() -> None:
    cfg = {"reporting": SqliteConfig(name="reporting", path=":memory:")}
    async with ConnectorRegistry(cfg) as reg:
        report = await reg.check("reporting")
    assert report.startswith("sqlite :memory:: SELECT 1 ok in ")


async def test_a_config_registered_under_another_name_is_refused() -> None:
    with pytest.raises(ValueError, match="registered under another name"):
        ConnectorRegistry({"other": CONFIGS["crm"]})


async def test_call_now_answers_an_in_memory_statement_without_waiting() -> None:
    async with ConnectorRegistry(CONFIGS) as reg, reg.session("load", ["reporting"]) as s:
        await s.call("reporting", "scalar", ["SELECT 1"], {})  # opens the backend
        assert s.call_now("reporting", "scalar", ["SELECT 41 + ?", 1], {}) == 42
        assert s.call_now("reporting", "fetch", ["SELECT 1 AS a UNION ALL SELECT 2"], {}) == [{"a": 1}, {"a": 2}]
        with pytest.raises(sqlite3.OperationalError, match="syntax error"):
            s.call_now("reporting", "execute", ["SELEC 1"], {})
        with pytest.raises(PermissionError):
            s.call_now("crm", "scalar", ["SELECT 1"], {})


async def test_call_now_leaves_undone_what_has_to_wait(tmp_path: Path) -> None:
    cfg = {"m": SqliteConfig(name="m", path=":memory:"), "f": SqliteConfig(name="f", path=str(tmp_path / "f.db"))}
    not_now = ConnectorSession.NOT_NOW
    async with ConnectorRegistry(cfg) as reg, reg.session("a", ["m", "f"]) as s, reg.session("b", ["m"]) as other:
        assert s.call_now("m", "scalar", ["SELECT 1"], {}) is not_now  # not opened yet: opening may wait
        await s.call("m", "execute", ["CREATE TABLE t (x)"], {})
        await s.call("f", "execute", ["CREATE TABLE t (x)"], {})
        assert s.call_now("f", "scalar", ["SELECT count(*) FROM t"], {}) is not_now  # a file: I/O and locks
        assert s.call_now("m", "begin", [], {}) is not_now
        tx = await other.call("m", "begin", [], {})
        assert s.call_now("m", "execute", ["INSERT INTO t VALUES (1)"], {}) is not_now  # the transaction holds it
        assert other.call_now("m", "execute", ["INSERT INTO t VALUES (1)"], {}, tx=tx) is not_now
        await other.call("m", "rollback", [], {}, tx=tx)
        assert await s.call("m", "scalar", ["SELECT count(*) FROM t"], {}) == 0


_MANY = "INSERT INTO t SELECT x FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300000) SELECT x FROM c)"


async def test_a_statement_over_the_inline_budget_is_undone_and_run_once_on_a_thread() -> None:
    cfg = {"m": SqliteConfig(name="m", path=":memory:")}
    async with ConnectorRegistry(cfg) as reg, reg.session("a", ["m"]) as s:
        await s.call("m", "execute", ["CREATE TABLE t (x)"], {})
        assert s.call_now("m", "execute", [_MANY], {}) is ConnectorSession.NOT_NOW
        assert await s.call("m", "scalar", ["SELECT count(*) FROM t"], {}) == 0
        assert await s.call("m", "execute", [_MANY], {}) == 300000
        assert await s.call("m", "scalar", ["SELECT count(*) FROM t"], {}) == 300000
