"""The one exception hierarchy of the runner.

Every error the runner raises on purpose derives from `NomaflowError`, so a
caller (the CLI, an embedding application) can tell "the runner refused" from
"the runner broke".  Errors a *plugin* raises are not wrapped: they are
recorded with their own type.
"""

from __future__ import annotations


class NomaflowError(Exception):
    """Base class of every error the runner raises deliberately."""


class ConfigError(NomaflowError):
    """A configuration or job file is unusable.

    Carries the file and the key so the message can tell the operator exactly
    what to fix; the CLI maps it to exit code 2.
    """

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file = file
        self.key = key
        self.message = message
        where = file or "<config>"
        if key:
            where = f"{where}: {key}"
        super().__init__(f"{where}: {message}")


class ProtocolError(NomaflowError):
    """Bytes on the parent/child pipe are not a valid protocol message."""


class RunNotFoundError(NomaflowError):
    """A run id named by the operator does not exist in the history."""


class UsageError(NomaflowError):
    """A request is well-formed but cannot be honoured (bad step reference, bad param)."""
