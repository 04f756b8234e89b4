"""The fork server's framing, between the supervisor and its zygote (a SOCK_SEQPACKET socket).

A request is `REQUEST_HEADER` (its id) then a JSON object (the attempt's `env`
and `cwd`), with the attempt's four descriptors (protocol in, protocol out,
stdout, stderr) passed by SCM_RIGHTS.  Only the new attempt reads the JSON:
everything the zygote itself touches between two forks is copied (it shares its
pages with every attempt still running), so it reads the id and nothing else.
A reply is `REPLY` (the request's id and the new pid), or the id and -1
followed by the reason as UTF-8 text.
"""

from __future__ import annotations

import struct

ZYGOTE_FD_ENV = "NOMAFLOW_ZYGOTE_FD"
MAX_REQUEST = 1024 * 1024
REQUEST_FDS = 4
REQUEST_HEADER = struct.Struct("<Q")
REPLY = struct.Struct("<Qq")

__all__ = ["MAX_REQUEST", "REPLY", "REQUEST_FDS", "REQUEST_HEADER", "ZYGOTE_FD_ENV"]
