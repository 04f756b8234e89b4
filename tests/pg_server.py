"""A throwaway PostgreSQL 15 cluster for the tests: started once per test session.

Usage, from a conftest.py (the tests directory must be importable):

    from pg_server import postgres_server  # noqa: F401  (the session fixture)

    def test_x(postgres_server):  # a PgServer
        postgres_server.app_password, postgres_server.params(), postgres_server.admin_connect()

The cluster lives in a temp dir, listens on 127.0.0.1 on a free port, uses
password (scram) authentication, and is stopped and deleted at the end of the
session.  As root, initdb/pg_ctl run as the `postgres` OS user.  It never
skips: if PostgreSQL cannot start, the fixture raises with the server log.

Importing the fixture into several conftests is harmless: they share one
cluster per process.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

PG_BIN = Path(os.environ.get("NOMAFLOW_PG_BIN", "/usr/lib/postgresql/15/bin"))
_START_TIMEOUT = 60


@attrs.frozen(kw_only=True)
class PgServer:
    host: str
    port: int
    dbname: str
    app_user: str
    app_password: str
    admin_user: str
    admin_password: str
    datadir: Path

    def params(self, **extra: Any) -> dict[str, Any]:
        """libpq keywords for the application role (password included)."""
        return {
            "host": self.host,
            "port": self.port,
            "dbname": self.dbname,
            "user": self.app_user,
            "password": self.app_password,
            **extra,
        }

    def dsn(self) -> str:
        return (
            f"host={self.host} port={self.port} dbname={self.dbname} "
            f"user={self.app_user} password={self.app_password}"
        )

    def admin_connect(self, dbname: str | None = None) -> Any:
        """An autocommit superuser connection (psycopg), for setup and inspection."""
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            dbname=dbname or self.dbname,
            user=self.admin_user,
            password=self.admin_password,
            autocommit=True,
        )


class _Cluster:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="nomaflow-pg-"))
        self.datadir = self.root / "data"
        self.log = self.root / "server.log"
        self.running = False
        self.as_postgres = os.geteuid() == 0

    def _run(self, *argv: str, timeout: float = _START_TIMEOUT) -> subprocess.CompletedProcess[str]:
        cmd = [str(PG_BIN / argv[0]), *argv[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=self.root)

    def _check(self, proc: subprocess.CompletedProcess[str], what: str) -> None:
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else "(no server log)"
            raise RuntimeError(
                f"PostgreSQL test cluster: {what} failed (exit {proc.returncode})\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}\nserver log:\n{log}"
            )

    def start(self) -> PgServer:
        admin_password = secrets.token_urlsafe(16)
        pwfile = self.root / "pwfile"
        pwfile.write_text(admin_password + "\n")
        if self.as_postgres:
            shutil.chown(self.root, "postgres")
            shutil.chown(pwfile, "postgres")
        self._check(
            self._run(
                "initdb", "-D", str(self.datadir), "-U", "postgres", "--pwfile", str(pwfile),
                "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync",
            ),
            "initdb",
        )
        pwfile.unlink()
        for _attempt in range(3):
            port = _free_port()
            opts = (
                f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={self.root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=60"
            )
            proc = self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.log), "-o", opts,
                             "-w", "-t", str(_START_TIMEOUT), "start")
            if proc.returncode == 0:
                break
            if "could not bind" not in (self.log.read_text(errors="replace") if self.log.exists() else ""):
                self._check(proc, "pg_ctl start")
        else:
            self._check(proc, "pg_ctl start (no free port after 3 tries)")
        self.running = True
        server = PgServer(
            host="127.0.0.1",
            port=port,
            dbname="nomaflow_test",
            app_user="nomaflow_app",
            app_password=secrets.token_urlsafe(16),
            admin_user="postgres",
            admin_password=admin_password,
            datadir=self.datadir,
        )
        _wait_ready(server)
        with server.admin_connect(dbname="postgres") as conn:
            conn.execute(f"CREATE ROLE {server.app_user} LOGIN PASSWORD '{server.app_password}'")
            conn.execute(f"CREATE DATABASE {server.dbname} OWNER {server.app_user}")
        return server

    def stop(self) -> None:
        if self.running:
            self.running = False
            self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(server: PgServer) -> None:
    import psycopg

    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        try:
            server.admin_connect(dbname="postgres").close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


_SERVER: PgServer | None = None
_CLUSTER: _Cluster | None = None


def _shared_server() -> PgServer:
    global _SERVER, _CLUSTER
    if _SERVER is None:
        cluster = _Cluster()
        atexit.register(cluster.stop)
        try:
            _SERVER = cluster.start()
        except BaseException:
            cluster.stop()
            raise
        _CLUSTER = cluster
    return _SERVER


@pytest.fixture(scope="session")
def postgres_server(request: pytest.FixtureRequest) -> Iterator[PgServer]:
    """The session's PostgreSQL cluster; stopped and deleted when pytest ends."""
    server = _shared_server()
    request.config.add_cleanup(_stop_shared)
    yield server


def _stop_shared() -> None:
    global _SERVER, _CLUSTER
    if _CLUSTER is not None:
        _CLUSTER.stop()
    _SERVER = _CLUSTER = None


__all__ = ["PgServer", "postgres_server"]
