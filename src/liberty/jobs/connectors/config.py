"""`connectors.toml`: one table per connector, loaded strictly, secrets resolved.

Secrets never sit in the file in plain text, because plugins may be able to
read it: `*_env` names an environment variable of the supervisor and
`*_encrypted` holds a Fernet token decrypted with `NOMAFLOW_SECRET_KEY`.
Resolution happens here, once, so a missing variable is reported at start-up
and never in the middle of a run.  Every mistake is a `ConfigError` naming the
file, the connector and the key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import attrs

from .._strict import describe_error, make_strict_converter
from ..config import read_toml
from ..errors import ConfigError
from .secrets import SECRET_KEY_ENV, _decrypt

TYPES = ("sqlite", "postgres", "http")

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_ENV_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_SECRET_HEADER = re.compile(r"authorization|cookie|token|secret|passw|api-?key|apikey", re.IGNORECASE)
_PLAIN_SECRET_KEYS = {"password": "password", "passwd": "password", "dsn": "dsn", "conninfo": "dsn", "token": "token"}


# --- what a resolved connector looks like -----------------------------------


@attrs.frozen(kw_only=True)
class SqliteConfig:
    """An SQLite database file (or `:memory:`, one connection shared by every step)."""

    type: ClassVar[str] = "sqlite"
    kind: ClassVar[str] = "sql"

    name: str
    path: str
    timeout_seconds: float = 5.0
    call_timeout_seconds: float = 30.0
    pool_max: int = 4
    secrets: frozenset[str] = attrs.field(factory=frozenset, repr=False)

    @property
    def summary(self) -> str:
        return f"sqlite {self.path}"


@attrs.frozen(kw_only=True)
class PostgresConfig:
    """A PostgreSQL database; `conninfo` and `params` may hold the password, so never print them."""

    type: ClassVar[str] = "postgres"
    kind: ClassVar[str] = "sql"

    name: str
    conninfo: str = attrs.field(default="", repr=False)
    params: Mapping[str, str | int] = attrs.field(factory=dict, repr=False)
    pool_min: int = 1
    pool_max: int = 5
    timeout_seconds: float = 10.0
    call_timeout_seconds: float = 30.0
    secrets: frozenset[str] = attrs.field(factory=frozenset, repr=False)

    @property
    def summary(self) -> str:
        from psycopg.conninfo import conninfo_to_dict

        facts = conninfo_to_dict(self.conninfo, **self.params)
        where = f"{facts.get('host', 'localhost')}:{facts.get('port', 5432)}/{facts.get('dbname', '')}"
        return f"postgres {facts['user']}@{where}" if facts.get("user") else f"postgres {where}"


@attrs.frozen(kw_only=True)
class HttpConfig:
    """An HTTP API; `headers` include the secret ones, so never print them."""

    type: ClassVar[str] = "http"
    kind: ClassVar[str] = "http"

    name: str
    base_url: str
    headers: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    timeout_seconds: float = 10.0
    call_timeout_seconds: float = 30.0
    max_response_bytes: int = 512 * 1024
    verify: bool | str = True
    secrets: frozenset[str] = attrs.field(factory=frozenset, repr=False)

    @property
    def summary(self) -> str:
        return f"http {self.base_url}"


ConnectorConfig = SqliteConfig | PostgresConfig | HttpConfig


# --- what the file says -----------------------------------------------------


@attrs.frozen(kw_only=True)
class _SqliteEntry:
    type: str
    path: str
    timeout_seconds: float = 5.0
    call_timeout_seconds: float = 30.0
    pool_max: int = 4


@attrs.frozen(kw_only=True)
class _PostgresEntry:
    type: str
    host: str | None = None
    port: int | None = None
    dbname: str | None = None
    user: str | None = None
    password_env: str | None = None
    password_encrypted: str | None = None
    dsn_env: str | None = None
    dsn_encrypted: str | None = None
    options: dict[str, str | int] = attrs.field(factory=dict)
    pool_min: int = 1
    pool_max: int = 5
    timeout_seconds: float = 10.0
    call_timeout_seconds: float = 30.0


@attrs.frozen(kw_only=True)
class _HttpEntry:
    type: str
    base_url: str
    headers: dict[str, str] = attrs.field(factory=dict)
    headers_env: dict[str, str] = attrs.field(factory=dict)
    headers_encrypted: dict[str, str] = attrs.field(factory=dict)
    token_env: str | None = None
    token_encrypted: str | None = None
    timeout_seconds: float = 10.0
    call_timeout_seconds: float = 30.0
    max_response_kb: int = 512
    verify: bool | str = True


_ENTRIES: dict[str, type] = {"sqlite": _SqliteEntry, "postgres": _PostgresEntry, "http": _HttpEntry}


def _exact_union(*kinds: type) -> Any:
    names = " or ".join({bool: "true or false", str: "a string", int: "an integer"}[k] for k in kinds)

    def check(value: Any, _: Any) -> Any:
        if type(value) in kinds:
            return value
        raise TypeError(f"expected {names}, got {type(value).__name__} {value!r:.40}")

    return check


def _make_converter() -> Any:
    conv = make_strict_converter()
    conv.register_structure_hook_func(lambda t: t == bool | str, _exact_union(bool, str))
    conv.register_structure_hook_func(lambda t: t == str | int, _exact_union(str, int))
    return conv


_converter = _make_converter()


# --- loading ----------------------------------------------------------------


def load_connectors(path: Path | str | None, *, environ: Mapping[str, str]) -> dict[str, ConnectorConfig]:
    """Read and resolve `connectors.toml`; `None` means "no connectors configured".

    Relative SQLite paths resolve against the file's folder, like every other
    path in the runner's configuration.
    """
    if path is None:
        return {}
    path = Path(path)
    file = str(path)
    raw = read_toml(path, what="connectors file")
    configs: dict[str, ConnectorConfig] = {}
    for name, table in raw.items():
        configs[name] = _Loader(file, name, environ, path.resolve().parent).load(table)
    return configs


@attrs.define
class _Loader:
    """Turns one `[name]` table into a resolved config; every error says where."""

    file: str
    name: str
    environ: Mapping[str, str]
    base_dir: Path
    secrets: set[str] = attrs.field(factory=set)

    def fail(self, key: str | None, message: str) -> ConfigError:
        where = f"{self.name}.{key}" if key else self.name
        return ConfigError(message, file=self.file, key=where)

    def load(self, table: Any) -> ConnectorConfig:
        if not _NAME.match(self.name):
            raise self.fail(None, "a connector name may use letters, digits, '_', '.' and '-' only")
        if not isinstance(table, dict):
            raise self.fail(None, f'expected a table [{self.name}] with type = "sqlite" | "postgres" | "http"')
        kind = table.get("type")
        if kind not in _ENTRIES:
            raise self.fail("type", f"expected one of {', '.join(repr(t) for t in TYPES)}, got {kind!r}")
        self._refuse_plain_secrets(table)
        entry = self._structure(table, _ENTRIES[kind])
        return getattr(self, f"_{kind}")(entry)

    def _refuse_plain_secrets(self, table: dict[str, Any]) -> None:
        places = [(k, k) for k in table] + [(f"options.{k}", k) for k in table.get("options") or {}]
        for key, bare in places:
            base = _PLAIN_SECRET_KEYS.get(bare.lower())
            if base is not None:
                raise self.fail(
                    key,
                    "plain-text secrets are refused (plugins may be able to read this file); use "
                    f'{base}_env = "ENV_VAR" naming an environment variable that holds it, or '
                    f'{base}_encrypted = "<output of nomaflow connectors encrypt>" with {SECRET_KEY_ENV} set',
                )
        for header in table.get("headers") or {}:
            if isinstance(header, str) and _SECRET_HEADER.search(header):
                raise self.fail(
                    f"headers.{header}",
                    "this header looks secret and plain-text secrets are refused; move it to "
                    f'headers_env = {{ "{header}" = "ENV_VAR" }} (or headers_encrypted, or token_env '
                    "for a bearer token)",
                )

    def _structure(self, table: dict[str, Any], cls: type) -> Any:
        try:
            return _converter.structure(table, cls)
        except Exception as exc:  # cattrs aggregates field errors into exception groups
            problems = describe_error(exc)
            key, message = problems[0]
            if len(problems) > 1:
                message += "; also " + "; ".join(f"{self.name}.{w}: {m}" if w else f"{self.name}: {m}" for w, m in problems[1:])
            raise self.fail(key or None, message) from None

    # --- per type ---------------------------------------------------------

    def _sqlite(self, e: _SqliteEntry) -> SqliteConfig:
        self._common(e)
        if not e.path:
            raise self.fail("path", 'must not be empty; use ":memory:" for an in-memory database')
        path = e.path if e.path == ":memory:" else str(self.base_dir / Path(e.path).expanduser())
        return SqliteConfig(
            name=self.name,
            path=path,
            timeout_seconds=e.timeout_seconds,
            call_timeout_seconds=e.call_timeout_seconds,
            pool_max=e.pool_max,
        )

    def _postgres(self, e: _PostgresEntry) -> PostgresConfig:
        self._common(e)
        if e.pool_min < 0 or e.pool_min > e.pool_max:
            raise self.fail("pool_min", f"must be between 0 and pool_max ({e.pool_max}), got {e.pool_min}")
        if e.port is not None and not 0 < e.port < 65536:
            raise self.fail("port", f"must be a TCP port (1-65535), got {e.port}")
        params: dict[str, str | int] = {"application_name": f"nomaflow:{self.name}"}
        params.update(e.options)
        for key in ("host", "port", "dbname", "user"):
            if getattr(e, key) is not None:
                params[key] = getattr(e, key)
        password = self._secret(e, "password")
        if password is not None:
            params["password"] = password
        conninfo = self._secret(e, "dsn") or ""
        if conninfo:
            self._check_dsn(conninfo, "dsn_env" if e.dsn_env is not None else "dsn_encrypted")
        params["connect_timeout"] = max(2, round(e.timeout_seconds))
        return PostgresConfig(
            name=self.name,
            conninfo=conninfo,
            params=params,
            pool_min=e.pool_min,
            pool_max=e.pool_max,
            timeout_seconds=e.timeout_seconds,
            call_timeout_seconds=e.call_timeout_seconds,
            secrets=frozenset(self.secrets),
        )

    def _check_dsn(self, dsn: str, key: str) -> None:
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict

        try:
            conninfo_to_dict(dsn)
        except ProgrammingError:
            # The parser's message quotes the DSN, password included: say only that it is invalid.
            raise self.fail(key, "is not a valid libpq DSN (connection string)") from None

    def _http(self, e: _HttpEntry) -> HttpConfig:
        self._common(e)
        import httpx

        try:
            url = httpx.URL(e.base_url)
        except httpx.InvalidURL as exc:
            raise self.fail("base_url", f"not a valid URL: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise self.fail("base_url", f"expected an absolute http:// or https:// URL, got {e.base_url!r}")
        verify = e.verify
        if isinstance(verify, str):
            verify = str(self.base_dir / Path(verify).expanduser())
            if not Path(verify).is_file():
                raise self.fail("verify", f"CA bundle {verify} does not exist; give a PEM file, or true / false")
        if e.max_response_kb <= 0:
            raise self.fail("max_response_kb", f"must be > 0, got {e.max_response_kb}")
        headers = dict(e.headers)
        for group in ("headers", "headers_env", "headers_encrypted"):
            for header in getattr(e, group):
                if not _HEADER.match(header):
                    raise self.fail(f"{group}.{header}", "is not a valid HTTP header name")
        for header, var in e.headers_env.items():
            headers[header] = self._from_env(var, f"headers_env.{header}")
        for header, token in e.headers_encrypted.items():
            headers[header] = self._decrypt(token, f"headers_encrypted.{header}")
        token = self._secret(e, "token")
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return HttpConfig(
            name=self.name,
            base_url=e.base_url,
            headers=headers,
            timeout_seconds=e.timeout_seconds,
            call_timeout_seconds=e.call_timeout_seconds,
            max_response_bytes=e.max_response_kb * 1024,
            verify=verify,
            secrets=frozenset(self.secrets),
        )

    def _common(self, e: Any) -> None:
        for key in ("timeout_seconds", "call_timeout_seconds"):
            if getattr(e, key) <= 0:
                raise self.fail(key, f"must be > 0, got {getattr(e, key)}")
        pool_max = getattr(e, "pool_max", 1)
        if pool_max < 1:
            raise self.fail("pool_max", f"must be >= 1, got {pool_max}")

    # --- secrets ----------------------------------------------------------

    def _secret(self, entry: Any, base: str) -> str | None:
        env, encrypted = getattr(entry, f"{base}_env"), getattr(entry, f"{base}_encrypted")
        if env is not None and encrypted is not None:
            raise self.fail(f"{base}_encrypted", f"set either {base}_env or {base}_encrypted, not both")
        if env is not None:
            return self._from_env(env, f"{base}_env")
        if encrypted is not None:
            return self._decrypt(encrypted, f"{base}_encrypted")
        return None

    def _from_env(self, var: str, key: str) -> str:
        if not _ENV_VAR.match(var):
            raise self.fail(key, f"{var!r} is not an environment variable name")
        value = self.environ.get(var)
        if value is None:
            raise self.fail(key, f"environment variable {var} is not set; export it in the supervisor's environment")
        if value == "":
            raise self.fail(key, f"environment variable {var} is empty")
        self.secrets.add(value)
        return value

    def _decrypt(self, token: str, key: str) -> str:
        secret_key = self.environ.get(SECRET_KEY_ENV)
        if not secret_key:
            raise self.fail(
                key,
                f"is encrypted but {SECRET_KEY_ENV} is not set; set it to the key the value was encrypted with",
            )
        try:
            value = _decrypt(token, secret_key)
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None
        self.secrets.add(value)
        return value


__all__ = [
    "TYPES",
    "ConnectorConfig",
    "HttpConfig",
    "PostgresConfig",
    "SqliteConfig",
    "load_connectors",
]
