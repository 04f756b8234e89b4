"""Every message that crosses the parent/child pipes.

Frozen attrs classes; the wire form is one JSON object per line with a `"t"`
tag (see `codec`).  Values that are plugin data (`params`, `output`, connector
arguments and rows) are typed `Any` here and validated as plain JSON by the
codec; richer values (datetime, Decimal, bytes, UUID) travel inside them in the
tagged form of `protocol.values`.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import attrs

PROTOCOL_VERSION = 3  # 3: `prepare.code` and `prepared.compiled`
# The child finds its protocol pipe ends ("IN,OUT" fd numbers) in this variable.
PROTOCOL_FDS_ENV = "NOMAFLOW_PROTOCOL_FDS"

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
FailureKind = Literal["exception", "cancelled", "output"]
CancelStage = Literal["flag", "task"]


def _frozen(cls: type) -> type:
    return attrs.frozen(kw_only=True)(cls)


# --- child -> parent -------------------------------------------------------


@_frozen
class CompiledSource:
    """A plugin module's code object, marshalled (base64), compiled by an attempt from the
    source whose `source_digest` is `digest`: what a spare reports in `prepared` and the
    supervisor hands to later spares in `prepare`, which use it only for source of that digest."""

    path: str
    digest: str
    code: str


def source_digest(source: bytes) -> str:
    """BLAKE2b-256, hex: hashlib's own C code, where sha256 goes through OpenSSL, whose
    per-call lookups write to (so copy) pages of the zygote's memory in every attempt."""
    return hashlib.blake2b(source, digest_size=32).hexdigest()


@_frozen
class Ready:
    """A child's first line, written together with `prepared`: it runs and speaks this protocol version."""

    version: int
    pid: int


@_frozen
class Prepared:
    """Answer to `prepare`: the sandbox the child applied to itself ({measure: {applied, detail}};
    None when none was asked).  The child now waits for `start`."""

    report: dict[str, dict[str, Any]] | None = None
    # The module of `prepare.expect` as this child compiled it, when the supervisor had no code
    # for that source; nothing of the plugin has run when this is sent.
    compiled: CompiledSource | None = None


@_frozen
class Log:
    level: LogLevel
    message: str


@_frozen
class Call:
    """A connector call; answered by exactly one `Reply` with the same id.

    `method` is checked by the parent against the connector's surface;
    `tx` names a transaction opened by an earlier `begin` call.
    """

    id: int
    connector: str
    method: str
    args: list[Any] = attrs.field(factory=list)
    kwargs: dict[str, Any] = attrs.field(factory=dict)
    tx: int | None = None


@_frozen
class StreamOpen:
    """Start streaming a query; the parent sends at most `credit` `Rows` batches."""

    id: int
    connector: str
    sql: str
    params: list[Any] = attrs.field(factory=list)
    batch_size: int = 1000
    credit: int = 2
    tx: int | None = None


@_frozen
class StreamMore:
    """The child consumed batches and grants `credit` more."""

    id: int
    credit: int = 1


@_frozen
class StreamClose:
    """The child stops reading early; the parent closes the cursor."""

    id: int


@_frozen
class Done:
    output: Any = None


@_frozen
class Failed:
    kind: FailureKind
    type: str
    message: str
    traceback: str = ""


# --- parent -> child -------------------------------------------------------


@_frozen
class Prepare:
    """Everything a child does before its step is known: seal the sandbox, set up the plugins path.

    The first message, sent as soon as the child is started, so that an attempt
    can be prepared ahead of the request that will use it; `start` follows when
    the step is chosen (at once, on a cold start).
    """

    plugins: str
    sandbox: dict[str, Any] | None = None
    # The step this child will most likely run ("module:function", the last one started):
    # a hint only.  The child compiles that module's source ahead and keeps the code for
    # an import of the very same bytes; nothing of the plugin is executed before `start`.
    expect: str | None = None
    # That module as an earlier attempt compiled it (see `CompiledSource`), if the supervisor has it.
    code: CompiledSource | None = None
    # Whether `start` may be a while coming (a spare): then the child walks the start path
    # meanwhile, taking its page copies off it.  A cold attempt's `start` follows at once.
    rehearse: bool = False


@_frozen
class Start:
    version: int
    run_id: str
    job_id: str
    step: str
    attempt: int
    function: str
    params: dict[str, Any] = attrs.field(factory=dict)
    session_user: str = "cli"
    log_level: Literal["INFO", "DEBUG"] = "INFO"
    previous_steps: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    connectors: list[str] = attrs.field(factory=list)
    max_output_bytes: int = 64 * 1024


@_frozen
class Reply:
    """Answer to a `Call`.  `error` is an encoded exception (`protocol.values`)."""

    id: int
    ok: bool
    value: Any = None
    error: dict[str, Any] | None = None


@_frozen
class Rows:
    """One batch of a stream; `done` marks the last one, `error` a failed stream.

    Column names travel once per batch and each row as a list of values
    (`protocol.values.pack_rows`): half the bytes of a list of objects.  A
    batch whose values are all None/bool/int/float/str/bytes travels as `blob`
    instead (`protocol.values.pack_blob`, marshal): no JSON to write or parse.
    """

    id: int
    columns: list[str] = attrs.field(factory=list)
    rows: list[Any] = attrs.field(factory=list)
    tagged: bool = False  # some value is in `protocol.values`' tagged form: decode them
    blob: str = ""  # the rows, when sent as `protocol.values.pack_blob` (then `rows` is empty)
    done: bool = False
    error: dict[str, Any] | None = None


@_frozen
class Cancel:
    """`flag` sets `ctx.is_cancelled()`; `task` cancels the step's asyncio task."""

    stage: CancelStage = "flag"


ChildMessage = Ready | Prepared | Log | Call | StreamOpen | StreamMore | StreamClose | Done | Failed
ParentMessage = Prepare | Start | Reply | Rows | Cancel

CHILD_MESSAGES: tuple[type, ...] = (Ready, Prepared, Log, Call, StreamOpen, StreamMore, StreamClose, Done, Failed)
PARENT_MESSAGES: tuple[type, ...] = (Prepare, Start, Reply, Rows, Cancel)

TAGS: dict[type, str] = {
    Ready: "ready",
    Prepared: "prepared",
    Log: "log",
    Call: "call",
    StreamOpen: "stream_open",
    StreamMore: "stream_more",
    StreamClose: "stream_close",
    Done: "done",
    Failed: "failed",
    Prepare: "prepare",
    Start: "start",
    Reply: "reply",
    Rows: "rows",
    Cancel: "cancel",
}
