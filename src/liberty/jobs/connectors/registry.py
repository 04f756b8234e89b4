"""Every configured connector, opened lazily, shared by all steps, closed once.

Lives as long as the supervisor: the first call to a connector opens its pool
(or client); later sessions reuse it; leaving the `async with` closes them all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import trio

from ._sql import SqlBackend
from .config import ConnectorConfig, HttpConfig, PostgresConfig, SqliteConfig
from .http_client import HttpBackend
from .session import ConnectorSession

if TYPE_CHECKING:
    from types import TracebackType

Backend = SqlBackend | HttpBackend


class ConnectorRegistry:
    """`async with ConnectorRegistry(load_connectors(...)) as registry:` under trio."""

    def __init__(self, configs: Mapping[str, ConnectorConfig]) -> None:
        for key, cfg in configs.items():
            if key != cfg.name:
                raise ValueError(f"connector config {cfg.name!r} is registered under another name, {key!r}")
        self.configs: dict[str, ConnectorConfig] = dict(configs)
        self._backends: dict[str, Backend] = {}
        self._opening: dict[str, trio.Lock] = {}
        self._closed = False

    async def __aenter__(self) -> ConnectorRegistry:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def config(self, name: str) -> ConnectorConfig:
        return self.configs[name]

    def session(
        self, step: str, allowed: Sequence[str], *, on_call: Callable[[str], None] | None = None
    ) -> ConnectorSession:
        """One per step attempt; the step may use only the connectors in `allowed`."""
        return ConnectorSession(self, step, allowed, on_call=on_call)

    @property
    def secrets(self) -> frozenset[str]:
        """Every secret value the connectors hold, e.g. to check nothing leaks to a child."""
        return frozenset().union(*(c.secrets for c in self.configs.values()))

    def opened(self, name: str) -> Backend | None:
        """The connector's pool or client if it is already open (no waiting)."""
        return None if self._closed else self._backends.get(name)

    async def backend(self, name: str) -> Backend:
        """The connector's pool or client, opened on first use."""
        if self._closed:
            raise RuntimeError("the connector registry is closed")
        backend = self._backends.get(name)
        if backend is not None:
            return backend
        async with self._opening.setdefault(name, trio.Lock()):
            backend = self._backends.get(name)
            if backend is None:
                backend = _make_backend(self.configs[name])
                await backend.open()
                self._backends[name] = backend
        return backend

    async def check(self, name: str) -> str:
        """A connectivity check for `nomaflow connectors test`; the result names no secret."""
        cfg = self.configs[name]
        started = time.perf_counter()
        async with self.session("connectors test", [name]) as session:
            if cfg.kind == "sql":
                await session.call(name, "scalar", ["SELECT 1"], {})
                outcome = "SELECT 1 ok"
            else:
                response = await session.call(name, "get", [""], {})
                outcome = f"HTTP {response['status_code']}"
        return f"{cfg.summary}: {outcome} in {(time.perf_counter() - started) * 1000:.0f} ms"

    async def aclose(self) -> None:
        """Close every pool and client; waits for them even if the caller is being cancelled."""
        self._closed = True
        backends, self._backends = list(self._backends.values()), {}
        with trio.CancelScope(shield=True):
            for backend in backends:
                await backend.aclose()


def _make_backend(cfg: ConnectorConfig) -> Backend:
    if isinstance(cfg, SqliteConfig):
        from .sqlite import SqliteBackend

        return SqliteBackend(cfg)
    if isinstance(cfg, PostgresConfig):
        from .postgres import PostgresBackend

        return PostgresBackend(cfg)
    if isinstance(cfg, HttpConfig):
        return HttpBackend(cfg)
    raise TypeError(f"not a connector config: {type(cfg).__name__}")


__all__ = ["ConnectorRegistry"]


