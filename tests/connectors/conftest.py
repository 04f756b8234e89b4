"""Fixtures for the connector tests: the shared PostgreSQL cluster and a local HTTP server."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:  # pg_server.py lives in tests/
    sys.path.insert(0, _TESTS)

from connector_helpers import SqlTarget, new_table, pg_config  # noqa: E402
from pg_server import postgres_server  # noqa: E402, F401  (the shared session fixture)

from liberty.jobs.connectors import SqliteConfig  # noqa: E402


class _Handler(BaseHTTPRequestHandler):
    """Echoes the request as JSON; a few paths misbehave on purpose."""

    protocol_version = "HTTP/1.1"

    def _reply(self, status: int, body: bytes, content_type: str = "application/json", extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if url.path.endswith("/slow"):
            time.sleep(3)
        if url.path.endswith("/big"):
            self._reply(200, b"x" * (2 * 1024 * 1024), "text/plain")
            return
        if url.path.endswith("/redirect"):
            self._reply(302, b"", extra={"Location": "http://127.0.0.2:1/stolen"})
            return
        echo = {
            "method": self.command,
            "path": url.path,
            "query": parse_qs(url.query),
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body.decode("utf-8", errors="replace"),
        }
        self._reply(201 if self.command == "POST" else 200, json.dumps(echo).encode(), extra={"X-Echo": "yes"})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def http_server() -> Iterator[str]:
    """Base URL of a JSON echo server on 127.0.0.1 (a thread of this process)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# --- SQL targets: every SQL behaviour is checked on SQLite (file and :memory:) and PostgreSQL ---


@pytest.fixture(params=["sqlite", "memory", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> SqlTarget:
    table = new_table()
    if request.param == "sqlite":
        cfg = SqliteConfig(name="db", path=str(tmp_path / "test.db"), timeout_seconds=1, call_timeout_seconds=20)
        return SqlTarget("sqlite", cfg, "?", table)
    if request.param == "memory":
        return SqlTarget("sqlite", SqliteConfig(name="db", path=":memory:", call_timeout_seconds=20), "?", table)
    server = request.getfixturevalue("postgres_server")
    return SqlTarget("postgres", pg_config(server), "%s", table, server)
