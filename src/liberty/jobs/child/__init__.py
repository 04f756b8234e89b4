"""The child interpreter: runs one step attempt and speaks the protocol on fds 3/4.

Never imports trio or anything from `supervisor/`.
"""

from .context import ChildContext, ChildLog
from .runtime import check_output, main, run_attempt

__all__ = ["ChildContext", "ChildLog", "check_output", "main", "run_attempt"]
