"""The history database's tables and the version check that guards them.

The version lives in `PRAGMA user_version` so that an older nomaflow opening a
file written by a newer one refuses loudly instead of misreading it.
"""

from __future__ import annotations

import sqlite3

from ..errors import ConfigError

SCHEMA_VERSION = 1

# logs.id is AUTOINCREMENT so ids are never reused even if old runs are pruned:
# `logs --follow` relies on "every new line has a larger id than any line seen".
_DDL = """
CREATE TABLE IF NOT EXISTS runs (
    run_id           TEXT PRIMARY KEY,
    job              TEXT NOT NULL,
    status           TEXT NOT NULL,
    session_user     TEXT NOT NULL,
    params           TEXT NOT NULL,
    created_at       REAL NOT NULL,
    started_at       REAL,
    ended_at         REAL,
    supervisor_pid   INTEGER NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_by_created ON runs (created_at);
CREATE INDEX IF NOT EXISTS runs_by_job ON runs (job, created_at);
CREATE INDEX IF NOT EXISTS runs_active ON runs (status) WHERE status IN ('QUEUED', 'RUNNING');

CREATE TABLE IF NOT EXISTS steps (
    run_id      TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    idx         INTEGER NOT NULL,
    status      TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    output      TEXT,
    error       TEXT,
    wall_s      REAL NOT NULL DEFAULT 0,
    cpu_s       REAL NOT NULL DEFAULT 0,
    peak_rss_mb REAL NOT NULL DEFAULT 0,
    started_at  REAL,
    ended_at    REAL,
    PRIMARY KEY (run_id, name)
);

CREATE TABLE IF NOT EXISTS attempts (
    run_id      TEXT NOT NULL,
    step        TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    status      TEXT NOT NULL,
    reason      TEXT,
    output      TEXT,
    error       TEXT,
    started_at  REAL NOT NULL,
    ended_at    REAL NOT NULL,
    wall_s      REAL NOT NULL,
    cpu_s       REAL NOT NULL,
    peak_rss_mb REAL NOT NULL,
    exit_code   INTEGER,
    usage       TEXT NOT NULL,
    PRIMARY KEY (run_id, step, attempt),
    FOREIGN KEY (run_id, step) REFERENCES steps (run_id, name) ON DELETE CASCADE
);

CREATE TABLE IF NOT EXISTS logs (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id  TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    ts      REAL NOT NULL,
    level   TEXT NOT NULL,
    stream  TEXT NOT NULL,
    message TEXT NOT NULL,
    step    TEXT,
    attempt INTEGER
);
CREATE INDEX IF NOT EXISTS logs_by_run ON logs (run_id, id);
"""


def ensure_schema(conn: sqlite3.Connection, path: str) -> None:
    """Create the tables on a fresh file; refuse a file written by a newer schema.

    Runs under BEGIN IMMEDIATE and re-reads the version inside it, so two
    processes opening a brand-new file at once create the schema exactly once.
    """
    version = _user_version(conn)
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise _too_new(version, path)
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = _user_version(conn)
        if version > SCHEMA_VERSION:
            raise _too_new(version, path)
        if version < SCHEMA_VERSION:
            for statement in _DDL.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _too_new(version: int, path: str) -> ConfigError:
    return ConfigError(
        f"history database has schema version {version}, newer than the {SCHEMA_VERSION} this "
        "nomaflow understands; upgrade nomaflow or point `history` at another file",
        file=path,
    )
