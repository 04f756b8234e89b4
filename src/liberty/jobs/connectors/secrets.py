"""Secrets encrypted at rest with Fernet, keyed by `NOMAFLOW_SECRET_KEY`.

A `*_encrypted` value in `connectors.toml` is safe to commit: without the key
(which lives only in the supervisor's environment) it is useless.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken

from ..errors import ConfigError

SECRET_KEY_ENV = "NOMAFLOW_SECRET_KEY"


def generate_key() -> str:
    """A fresh key to put in `NOMAFLOW_SECRET_KEY`."""
    return Fernet.generate_key().decode("ascii")


def encrypt_secret(plaintext: str, key: str | bytes) -> str:
    """The value to write as `password_encrypted = "..."` (or any `*_encrypted` key)."""
    return _fernet(key).encrypt(plaintext.encode("utf-8")).decode("ascii")


def decrypt_secret(token: str, key: str | bytes) -> str:
    try:
        return _fernet(key).decrypt(token.encode("ascii")).decode("utf-8")
    except (InvalidToken, UnicodeError):
        raise ConfigError(
            f"cannot decrypt: the value was not encrypted with this {SECRET_KEY_ENV}, or it is damaged; "
            "re-create it with `nomaflow connectors encrypt`",
        ) from None


def _fernet(key: str | bytes) -> Fernet:
    try:
        return Fernet(key)
    except (ValueError, TypeError):
        raise ConfigError(
            f"{SECRET_KEY_ENV} is not a valid key (expected 32 url-safe base64-encoded bytes); "
            "generate one with: python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'",
            key=SECRET_KEY_ENV,
        ) from None


__all__ = ["SECRET_KEY_ENV", "decrypt_secret", "encrypt_secret", "generate_key"]
