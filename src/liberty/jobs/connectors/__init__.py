"""Real connectors, parent side only: SQLite, PostgreSQL and HTTP behind one session API.

Credentials and connections live here, in the supervisor; a child reaches a
connector only through a `ConnectorSession`, one per step attempt, which
enforces the step's `connectors` list.
"""

from .config import TYPES, ConnectorConfig, HttpConfig, PostgresConfig, SqliteConfig, load_connectors
from .registry import ConnectorRegistry
from .secrets import SECRET_KEY_ENV, decrypt_secret, encrypt_secret, generate_key
from .session import HTTP_METHODS, MAX_BATCH_SIZE, SQL_METHODS, ConnectorSession

__all__ = [
    "HTTP_METHODS",
    "MAX_BATCH_SIZE",
    "SECRET_KEY_ENV",
    "SQL_METHODS",
    "TYPES",
    "ConnectorConfig",
    "ConnectorRegistry",
    "ConnectorSession",
    "HttpConfig",
    "PostgresConfig",
    "SqliteConfig",
    "decrypt_secret",
    "encrypt_secret",
    "generate_key",
    "load_connectors",
]
