"""The SQL surface, identical on SQLite (file and :memory:) and PostgreSQL, against real databases."""

from __future__ import annotations

import math
import sqlite3
from typing import Any

import psycopg.errors
import pytest
import trio
from connector_helpers import SqlTarget

from liberty.jobs.connectors import ConnectorRegistry, ConnectorSession
from liberty.jobs.errors import ProtocolError

pytestmark = pytest.mark.trio


async def make_table(s: ConnectorSession, t: SqlTarget) -> None:
    await s.call(t.name, "execute", [t.q("CREATE TABLE {t} (id INTEGER PRIMARY KEY, name TEXT UNIQUE, qty INTEGER)")], {})


async def insert(s: ConnectorSession, t: SqlTarget, *rows: tuple[Any, ...], tx: int | None = None) -> int:
    return await s.call(t.name, "executemany", [t.q("INSERT INTO {t} VALUES ({}, {}, {})"), list(rows)], {}, tx=tx)


def integrity_error(t: SqlTarget) -> type[Exception]:
    return psycopg.errors.UniqueViolation if t.kind == "postgres" else sqlite3.IntegrityError


async def test_execute_returns_the_row_count(target: SqlTarget) -> None:
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        await make_table(s, target)
        assert await s.call("db", "execute", [target.q("INSERT INTO {t} VALUES ({}, {}, {})"), 1, "a", 5], {}) == 1
        await insert(s, target, (2, "b", 5), (3, "c", 7))
        assert await s.call("db", "execute", [target.q("UPDATE {t} SET qty = qty + 1 WHERE qty = {}"), 5], {}) == 2


async def test_executemany_inserts_every_row_and_counts_them(target: SqlTarget) -> None:
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        await make_table(s, target)
        assert await insert(s, target, *[(i, f"n{i}", i) for i in range(50)]) == 50
        assert await s.call("db", "scalar", [target.q("SELECT count(*) FROM {t}")], {}) == 50


async def test_executemany_outside_a_transaction_is_all_or_nothing(target: SqlTarget) -> None:
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        await make_table(s, target)
        with pytest.raises(integrity_error(target)):
            await insert(s, target, (1, "a", 1), (2, "b", 2), (3, "a", 3))
        assert await s.call("db", "scalar", [target.q("SELECT count(*) FROM {t}")], {}) == 0


async def test_scalar_is_the_first_column_of_the_first_row_or_none(target: SqlTarget) -> None:
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        await make_table(s, target)
        await insert(s, target, (1, "a", 10), (2, "b", 20))
        assert await s.call("db", "scalar", [target.q("SELECT qty, name FROM {t} ORDER BY id")], {}) == 10
        assert await s.call("db", "scalar", [target.q("SELECT qty FROM {t} WHERE id = {}"), 99], {}) is None


async def test_fetch_returns_dict_rows(target: SqlTarget) -> None:
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        await make_table(s, target)
        await insert(s, target, (1, "a", 10), (2, "b", 20), (3, "c", 30))
        rows = await s.call("db", "fetch", [target.q("SELECT id, name FROM {t} WHERE qty >= {} ORDER BY id"), 20], {})
        assert rows == [{"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
        assert await s.call("db", "fetch", [target.q("SELECT id FROM {t} WHERE id > 100")], {}) == []


async def test_fetchrow_returns_one_dict_or_none(target: SqlTarget) -> None:
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        await make_table(s, target)
        await insert(s, target, (1, "a", 10))
        assert await s.call("db", "fetchrow", [target.q("SELECT name, qty FROM {t} WHERE id = {}"), 1], {}) == {
            "name": "a",
            "qty": 10,
        }
        assert await s.call("db", "fetchrow", [target.q("SELECT name FROM {t} WHERE id = {}"), 2], {}) is None


async def test_a_single_mapping_argument_binds_named_parameters(target: SqlTarget) -> None:
    named = "%(qty)s" if target.kind == "postgres" else ":qty"
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        await make_table(s, target)
        await insert(s, target, (1, "a", 10), (2, "b", 20))
        sql = target.q(f"SELECT name FROM {{t}} WHERE qty = {named}")
        assert await s.call("db", "scalar", [sql, {"qty": 20}], {}) == "b"


async def test_duplicate_key_raises_the_drivers_own_integrity_error(target: SqlTarget) -> None:
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        await make_table(s, target)
        await insert(s, target, (1, "a", 10))
        with pytest.raises(integrity_error(target)) as info:
            await s.call("db", "execute", [target.q("INSERT INTO {t} VALUES ({}, {}, {})"), 2, "a", 1], {})
        assert "unique" in str(info.value).lower()
        assert await s.call("db", "scalar", ["SELECT 1"], {}) == 1  # the connection is still good


async def test_commit_makes_a_transactions_writes_visible(target: SqlTarget) -> None:
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        await make_table(s, target)
        tx = await s.call("db", "begin", [], {})
        await insert(s, target, (1, "a", 1), tx=tx)
        await s.call("db", "execute", [target.q("UPDATE {t} SET qty = 2")], {}, tx=tx)
        assert await s.call("db", "commit", [], {}, tx=tx) is None
        assert await s.call("db", "fetch", [target.q("SELECT qty FROM {t}")], {}) == [{"qty": 2}]


async def test_rollback_discards_a_transactions_writes(target: SqlTarget) -> None:
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        await make_table(s, target)
        await insert(s, target, (1, "a", 1))
        tx = await s.call("db", "begin", [], {})
        await s.call("db", "execute", [target.q("DELETE FROM {t}")], {}, tx=tx)
        assert await s.call("db", "scalar", [target.q("SELECT count(*) FROM {t}")], {}, tx=tx) == 0
        await s.call("db", "rollback", [], {}, tx=tx)
        assert await s.call("db", "scalar", [target.q("SELECT count(*) FROM {t}")], {}) == 1


async def test_leaving_the_session_rolls_back_an_open_transaction(target: SqlTarget) -> None:
    async with ConnectorRegistry({"db": target.config}) as reg:
        async with reg.session("s", ["db"]) as s:
            await make_table(s, target)
            tx = await s.call("db", "begin", [], {})
            await insert(s, target, (1, "a", 1), tx=tx)
        async with reg.session("s2", ["db"]) as s2:
            assert await s2.call("db", "scalar", [target.q("SELECT count(*) FROM {t}")], {}) == 0


async def test_a_finished_transaction_id_cannot_be_reused(target: SqlTarget) -> None:
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        tx = await s.call("db", "begin", [], {})
        await s.call("db", "commit", [], {}, tx=tx)
        with pytest.raises(RuntimeError, match=f"transaction {tx} is already finished"):
            await s.call("db", "scalar", ["SELECT 1"], {}, tx=tx)
        with pytest.raises(ProtocolError, match="unknown transaction id 99"):
            await s.call("db", "scalar", ["SELECT 1"], {}, tx=99)


async def test_nested_begin_is_refused(target: SqlTarget) -> None:
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        tx = await s.call("db", "begin", [], {})
        with pytest.raises(RuntimeError, match="nested transactions are not supported"):
            await s.call("db", "begin", [], {}, tx=tx)


async def test_stream_delivers_every_row_in_bounded_batches(target: SqlTarget) -> None:
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        await make_table(s, target)
        await insert(s, target, *[(i, f"n{i}", i % 7) for i in range(10_000)])
        sid = await s.stream_open("db", target.q("SELECT id, qty FROM {t} WHERE id >= {} ORDER BY id"), [0], 512)
        sizes, ids = [], []
        while (batch := await s.stream_next(sid)) is not None:
            sizes.append(len(batch))
            ids.extend(row["id"] for row in batch)
        assert ids == list(range(10_000))
        assert max(sizes) == 512 and len(sizes) == 20
        assert await s.stream_next(sid) is None
        await s.stream_close(sid)  # closing a finished stream is harmless


class _Ids:
    """A stream sink that makes each batch the list of its ids."""

    def __init__(self, value_types: frozenset[type] | None) -> None:
        self.ids: list[int] = []

    def add(self, rows: list[tuple[Any, ...]]) -> None:
        self.ids.extend(row[0] for row in rows)

    def finish(self, columns: list[str]) -> list[int]:
        assert columns == ["id", "qty"]
        return self.ids


async def test_stream_pump_sends_batches_in_order_while_credit_lasts(target: SqlTarget) -> None:
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        await make_table(s, target)
        await insert(s, target, *[(i, f"n{i}", i % 7) for i in range(2000)])
        sid = await s.stream_open("db", target.q("SELECT id, qty FROM {t} ORDER BY id"), [], 600)
        batches: list[list[int]] = []
        credit = iter([True, True])
        assert not await s.stream_pump(sid, _Ids, lambda: next(credit, False), batches.append)
        assert [len(b) for b in batches] == [600, 600]
        assert await s.stream_pump(sid, _Ids, lambda: True, batches.append)
        assert [len(b) for b in batches] == [600, 600, 600, 200]
        assert [i for b in batches for i in b] == list(range(2000))
        assert await s.stream_pump(sid, _Ids, lambda: True, batches.append)  # finished: nothing more
        assert len(batches) == 4


async def test_stream_of_an_empty_result_ends_at_once(target: SqlTarget) -> None:
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        await make_table(s, target)
        sid = await s.stream_open("db", target.q("SELECT * FROM {t}"), [], 10)
        assert await s.stream_next(sid) is None


async def test_stream_inside_a_transaction_sees_its_uncommitted_rows(target: SqlTarget) -> None:
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        await make_table(s, target)
        tx = await s.call("db", "begin", [], {})
        await insert(s, target, *[(i, f"n{i}", i) for i in range(25)], tx=tx)
        sid = await s.stream_open("db", target.q("SELECT id FROM {t} ORDER BY id"), [], 10, tx=tx)
        first = await s.stream_next(sid)
        assert [r["id"] for r in first or []] == list(range(10))
        await s.stream_close(sid)
        await s.call("db", "rollback", [], {}, tx=tx)


async def test_early_close_frees_the_connection_for_the_next_call(target: SqlTarget) -> None:
    target = target.with_config(pool_max=1, call_timeout_seconds=5)
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        await make_table(s, target)
        await insert(s, target, *[(i, f"n{i}", i) for i in range(100)])
        sid = await s.stream_open("db", target.q("SELECT id FROM {t}"), [], 10)
        assert len(await s.stream_next(sid) or []) == 10
        await s.stream_close(sid)
        assert await s.call("db", "execute", [target.q("DELETE FROM {t}")], {}) == 100
        with pytest.raises(ProtocolError):
            await s.stream_next(12345)


async def test_leaving_the_session_closes_open_streams(target: SqlTarget) -> None:
    target = target.with_config(pool_max=1, call_timeout_seconds=5)
    async with ConnectorRegistry({"db": target.config}) as reg:
        async with reg.session("s", ["db"]) as s:
            await make_table(s, target)
            await insert(s, target, *[(i, f"n{i}", i) for i in range(30)])
            sid = await s.stream_open("db", target.q("SELECT id FROM {t}"), [], 10)
            await s.stream_next(sid)
        async with reg.session("s2", ["db"]) as s2:
            assert await s2.call("db", "execute", [target.q("DELETE FROM {t}")], {}) == 30


async def test_a_failing_stream_query_raises_the_driver_error_and_leaks_nothing(target: SqlTarget) -> None:
    target = target.with_config(pool_max=1, call_timeout_seconds=5)
    error = psycopg.errors.UndefinedTable if target.kind == "postgres" else sqlite3.OperationalError
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        with pytest.raises(error):
            await s.stream_open("db", "SELECT * FROM no_such_table", [], 10)
        assert await s.call("db", "scalar", ["SELECT 1"], {}) == 1


async def test_a_slow_statement_hits_the_call_timeout_and_is_interrupted(target: SqlTarget) -> None:
    target = target.with_config(call_timeout_seconds=1, pool_max=1)
    if target.kind == "postgres":
        slow = "SELECT pg_sleep(30)"
    else:
        slow = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        started = trio.current_time()
        with pytest.raises(TimeoutError, match=r"connector 'db': scalar did not finish within 1 s"):
            await s.call("db", "scalar", [slow], {})
        assert trio.current_time() - started < 15  # interrupted, not waited out
        assert await s.call("db", "scalar", ["SELECT 2"], {}) == 2


async def test_cancelling_a_call_interrupts_the_statement_and_returns_the_connection(target: SqlTarget) -> None:
    target = target.with_config(pool_max=1)
    slow = (
        "SELECT pg_sleep(30)"
        if target.kind == "postgres"
        else "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    )
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        with trio.move_on_after(0.5) as scope:
            await s.call("db", "scalar", [slow], {})
        assert scope.cancelled_caught
        with trio.fail_after(10):
            assert await s.call("db", "scalar", ["SELECT 3"], {}) == 3


async def test_bad_arguments_are_type_errors_naming_the_method(target: SqlTarget) -> None:
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        with pytest.raises(TypeError, match=r"'db'.execute\(\) missing the SQL text"):
            await s.call("db", "execute", [], {})
        with pytest.raises(TypeError, match="SQL text must be a string"):
            await s.call("db", "scalar", [42], {})
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            await s.call("db", "fetch", ["SELECT 1"], {"timeout": 3})
        with pytest.raises(TypeError, match="rows must be one list of rows"):
            await s.call("db", "executemany", ["SELECT 1", 1, 2], {})
        with pytest.raises(AttributeError, match=r"has no method 'drop_everything'; valid: execute"):
            await s.call("db", "drop_everything", [], {})
        with pytest.raises(ValueError, match="batch_size"):
            await s.stream_open("db", "SELECT 1", [], 0)


async def test_stream_pump_whose_consumer_is_gone_stops_without_breaking_the_event_loop(target: SqlTarget) -> None:
    # The channel the batches go to is closed while the worker thread still fetches: a batch
    # delivered after that must not raise inside trio's callback (which ends the whole run).
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        await make_table(s, target)
        await insert(s, target, *[(i, f"n{i}", i % 7) for i in range(2000)])
        sid = await s.stream_open("db", target.q("SELECT id, qty FROM {t} ORDER BY id"), [], 100)
        send, receive = trio.open_memory_channel[list[int]](math.inf)
        received: list[list[int]] = []

        def deliver(batch: list[int]) -> None:
            send.send_nowait(batch)
            received.append(batch)
            receive.close()  # the consumer goes away after the first batch

        await s.stream_pump(sid, _Ids, lambda: True, deliver)  # the thread may have fetched them all by then
        assert [len(b) for b in received] == [100]
        await s.stream_close(sid)
        assert await s.call("db", "scalar", [target.q("SELECT count(*) FROM {t}")], {}) == 2000  # the connection is free again


async def test_an_error_from_the_consumer_is_raised_by_stream_pump(target: SqlTarget) -> None:
    async with ConnectorRegistry({"db": target.config}) as reg, reg.session("s", ["db"]) as s:
        await make_table(s, target)
        await insert(s, target, *[(i, f"n{i}", i % 7) for i in range(50)])
        sid = await s.stream_open("db", target.q("SELECT id, qty FROM {t} ORDER BY id"), [], 10)

        def deliver(batch: list[int]) -> None:
            raise ValueError("the consumer failed")

        with pytest.raises(ValueError, match="the consumer failed"):
            await s.stream_pump(sid, _Ids, lambda: True, deliver)
