"""Every message that crosses a process boundary between a host and the kernel, declared once.

A host sends the kernel ``HostBatch``s (its agents' ``Syscall`` s, ``ExitReport`` s and
output) and long-polls for ``Chunk`` s of ``Item`` s: ``Reply`` (a late syscall result),
``Deliver`` (a message for an agent), ``TokenDelta`` (LLM output), ``Spawn``, ``Kill`` and
``ToolCall`` (run a tool an agent registered). Every answer is a ``Result`` (a value, a
typed error, or "pending"), rebuilt as the same typed error on the other side by
``unwrap``. The engine's step plan and output (kernel to model shard) are
declared beside the runner that executes them (``llmos_kernel.engine.runner``).

Why msgspec: its Structs are declared like dataclasses, and its msgpack codec encodes a
whole batch in one call and validates what it decodes against the declared types, so a
malformed or forged batch is refused as data with a typed error before any handler sees
it. Ray carries the encoded bytes as one opaque object instead of pickling every field.
A syscall's arguments and a result are encoded apart (``msgspec.Raw``), so one argument
that cannot be encoded fails that call alone, at the caller, and not its whole batch.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import msgspec

from llmos_kernel.errors import InvalidArgument, LlmosError

log = logging.getLogger("llmos.wire")

# -- results -------------------------------------------------------------------------


class ErrorInfo(msgspec.Struct, frozen=True):
    """A typed error as data: the class name and the message that says what to fix."""

    type: str
    message: str

    def exception(self) -> LlmosError:
        return LlmosError.from_wire({"type": self.type, "message": self.message})


class Result(msgspec.Struct, array_like=True):
    """The answer to any call: a value, a typed error, or (a slow syscall) "later"."""

    ok: Any = None
    error: ErrorInfo | None = None
    pending: bool = False


PENDING = Result(pending=True)


def ok(value: Any = None) -> Result:
    return Result(ok=value)


def failure(error: LlmosError | ErrorInfo) -> Result:
    if isinstance(error, LlmosError):
        error = ErrorInfo(type(error).__name__, str(error))
    return Result(error=error)


def internal_error(where: str, e: BaseException) -> Result:
    """A bug, reported to the caller as data."""
    return Result(error=ErrorInfo("LlmosError",
                                  f"internal error in {where}: {type(e).__name__}: {e}"))


def unwrap(result: Result) -> Any:
    """A result's value, or its typed error raised."""
    if result.error is not None:
        raise result.error.exception()
    return result.ok


# -- host to kernel ------------------------------------------------------------------


class Syscall(msgspec.Struct, array_like=True):
    """One call an agent (or the host itself, with no capability) made."""

    call: str  # the host's id for the answer; "" when nobody waits (a plain ack)
    capability: Any  # the calling process's (a str); "" for the host's own calls. Any type
    # decodes, so a forged one is refused as what it is (PermissionDenied), not as a shape
    name: str  # "ipc.send", "fs.read", ...
    args: msgspec.Raw  # an encoded dict, decoded per call (see decode_args)
    handling: str | None = None  # the message the caller is handling (its sends are held)


MAX_UNANSWERED = 1024  # unanswered calls of one process an exit report carries


class ExitReport(msgspec.Struct, array_like=True):
    """An agent's task ended."""

    pid: int
    reason: Literal["normal", "error", "killed", "shutdown"]
    result: Any = None
    error: dict[str, Any] | None = None  # type, message, traceback (reason "error")
    handling: str | None = None  # the message whose handler raised
    # calls it acknowledged without answering, (caller pid, call id): set by its host, at
    # most MAX_UNANSWERED (the host keeps no more; the kernel reads no more)
    unanswered: list[tuple[int, str]] | None = None


class HostBatch(msgspec.Struct, array_like=True):
    """A host's calls since its previous batch, numbered per kernel instance (``epoch``)."""

    epoch: str
    seq: int
    ops: list[msgspec.Raw]  # each an encoded Syscall, decoded alone (see decode_syscall)
    exits: list[ExitReport] = []
    logs: dict[int, str] = {}


# -- kernel to host --------------------------------------------------------------------


class Program(msgspec.Struct, omit_defaults=True):
    """What a process runs: a module attribute, a source file, a pickled callable, or
    (``attached``) a driver script that runs its own code."""

    kind: Literal["module", "source", "pickle", "attached"]
    ref: str | None = None  # "package.module:attr" (module)
    code: str | None = None  # the file's text (source)
    filename: str | None = None
    attr: str | None = None  # the entry point in a source file (default main / Agent)
    data: bytes | None = None  # cloudpickle (pickle)
    label: str | None = None  # what ps shows

    def name(self) -> str:
        return self.label or self.kind


class Reply(msgspec.Struct, tag="reply", array_like=True):
    call: str
    result: msgspec.Raw  # an encoded Result


class Deliver(msgspec.Struct, tag="msg", array_like=True):
    pid: int
    envelope: list  # messages.Envelope.to_wire(), checked by Envelope.from_wire


class Usage(msgspec.Struct):
    """A request's account, filled in by the engine as it runs (see engine.LLMEngine)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float = 0.0
    ttft_s: float = 0.0
    steps_waited: int = 0  # steps that started after it arrived and before it first ran
    total_s: float = 0.0
    preemptions: int = 0


class TokenDelta(msgspec.Struct, tag="delta", array_like=True):
    """What one engine step produced for one request (tokens new since the last delta)."""

    pid: int  # the process (0 for a driver client) the request belongs to
    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list[float] | None = None
    context_id: str | None = None
    error: ErrorInfo | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token, best first
    prompt_logprobs: list[float] | None = None  # asked for: prompt tokens 1..n-1, once


class Spawn(msgspec.Struct, tag="spawn", array_like=True):
    pid: int
    capability: str
    name: str | None
    program: Program
    args: dict[str, Any]
    mailbox: int  # unhandled messages it may hold
    backlog: dict[int, str]  # sender -> newest message id waiting in the kernel for it
    sandbox: bool = False  # run it in a sandboxed child process (actors.sandbox)
    scratch: bool = False  # with a private writable dir (its cwd) in that sandbox
    limits: dict[str, Any] | None = None  # its sandbox's rlimits (sandbox_policy.Limits)


class Kill(msgspec.Struct, tag="kill", array_like=True):
    pid: int
    grace_s: float = 5.0


class ToolCall(msgspec.Struct, tag="tool", array_like=True):
    call: str
    pid: int  # the process that registered the tool, which runs it
    name: str
    args: dict[str, Any]


Item = Reply | Deliver | TokenDelta | Spawn | Kill | ToolCall


class Chunk(msgspec.Struct, array_like=True):
    """Items for one host, numbered so that it applies those of its two channels in order."""

    epoch: str
    start: int
    items: list[Item]


class Answer(msgspec.Struct, array_like=True):
    """The kernel's answer on either host channel: to a batch, results by call id (slow
    calls answer later, as a ``Reply``) and the host's next items, or ``resync``
    (renumber from zero and send again); to a poll, the next items; or an error that
    refused the whole call (a bad secret, a malformed batch)."""

    results: dict[str, msgspec.Raw] = {}
    out: Chunk | None = None
    resync: str | None = None
    error: ErrorInfo | None = None


# -- the codec -------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
_batch = msgspec.msgpack.Decoder(HostBatch)
_answer = msgspec.msgpack.Decoder(Answer)
_result = msgspec.msgpack.Decoder(Result)
_args = msgspec.msgpack.Decoder(dict[str, Any])
_syscall = msgspec.msgpack.Decoder(Syscall)
_any = msgspec.msgpack.Decoder()
encode = _encoder.encode


def encode_args(args: dict) -> msgspec.Raw:
    """A call's arguments, encoded now so that a value msgpack cannot carry fails this call."""
    try:
        return msgspec.Raw(_encoder.encode(args))
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidArgument(f"cannot send these arguments: {e} (only str in UTF-8, int up "
                              "to 64 bits, float, bool, None, bytes, lists, dicts and "
                              "dataclasses cross)") from None


def encode_result(result: Result) -> msgspec.Raw:
    """A result encoded on its own, so one that cannot be encoded spoils only itself."""
    try:
        return msgspec.Raw(_encoder.encode(result))
    except (TypeError, ValueError, OverflowError) as e:
        log.warning("a result could not be encoded: %s: %s", type(e).__name__, e)
        return msgspec.Raw(_encoder.encode(internal_error("encoding a result", e)))


def _decode(decoder: msgspec.msgpack.Decoder, data: Any, what: str) -> Any:
    if not isinstance(data, bytes | msgspec.Raw | memoryview):
        raise InvalidArgument(f"{what} must be msgpack bytes, got {type(data).__name__}")
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as e:
        raise InvalidArgument(f"malformed {what}: {e}") from None


def decode_batch(data: Any) -> HostBatch:
    return _decode(_batch, data, "host batch")


def decode_syscall(raw: msgspec.Raw) -> Syscall:
    """One call of a batch; a malformed one is refused alone (see call_id_of)."""
    return _decode(_syscall, raw, "syscall")


def call_id_of(raw: msgspec.Raw) -> str | None:
    """The call id of a malformed syscall, if it has one to answer to."""
    try:
        value = _any.decode(raw)
    except msgspec.DecodeError:
        return None
    return value[0] if isinstance(value, list) and value and isinstance(value[0], str) \
        else None


def decode_args(raw: msgspec.Raw) -> dict[str, Any]:
    return _decode(_args, raw, "syscall arguments")


def decode_answer(data: bytes) -> Answer:
    return _decode(_answer, data, "answer")


def decode_result(raw: msgspec.Raw | bytes) -> Result:
    """One result; a malformed one becomes its own typed error, spoiling no other call."""
    try:
        return _decode(_result, raw, "result")
    except InvalidArgument as e:
        return failure(e)


def to_builtins(value: Any) -> Any:
    """Plain dicts and lists (for JSON, SQLite, printing)."""
    return msgspec.to_builtins(value, builtin_types=(bytes,))


def convert(value: Any, type_: type) -> Any:
    """A declared struct from its plain form, checked; InvalidArgument when it does not fit."""
    try:
        return msgspec.convert(value, type_)
    except msgspec.ValidationError as e:
        raise InvalidArgument(f"malformed {type_.__name__}: {e}") from None
