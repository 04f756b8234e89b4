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
    try:
        return _fernet(key).encrypt(plaintext.encode("utf-8")).decode("ascii")
    except ValueError as exc:
        raise ConfigError(str(exc), key=SECRET_KEY_ENV) from None


def decrypt_secret(token: str, key: str | bytes) -> str:
    try:
        return _decrypt(token, key)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _decrypt(token: str, key: str | bytes) -> str:
    """Like `decrypt_secret` but with a bare ValueError, for callers that add their own context."""
    fernet = _fernet(key)
    try:
        return fernet.decrypt(token.encode("ascii")).decode("utf-8")
    except (InvalidToken, UnicodeError):
        raise ValueError(
            f"cannot decrypt: the value was not encrypted with this {SECRET_KEY_ENV}, or it is damaged; "
            "re-create it with `nomaflow connectors encrypt`"
        ) from None


def _fernet(key: str | bytes) -> Fernet:
    try:
        return Fernet(key)
    except (ValueError, TypeError):
        raise ValueError(
            f"{SECRET_KEY_ENV} is not a valid key (expected 32 url-safe base64-encoded bytes); generate one with: "
            "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"
        ) from None


__all__ = ["SECRET_KEY_ENV", "decrypt_secret", "encrypt_secret", "generate_key"]
