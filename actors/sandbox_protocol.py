"""What crosses the socket between a host and its sandboxed child, declared once.

Each frame is a 4-byte big-endian length and one msgpack-encoded message: the host sends
``ToChild`` (``Start`` first, then ``Answer`` s and the kernel's own ``wire`` items for the
process: ``Deliver``, ``TokenDelta``, ``ToolCall``, ``Kill``), the child sends ``ToParent``
(``Ready`` once its restrictions are on, then ``Call``, ``Ack``, ``Output``, ``ToolResult``
and one ``Exit``). Both unions are tagged msgspec structs, so the receiving side validates
every frame against the declared types before acting on it: a frame that does not decode,
or is longer than ``MAX_FRAME``, is a protocol violation, never an exception in a handler.

The child never holds a capability: nothing here carries one. The host adds the process's
capability to each ``Call`` it forwards, as it does for the agents it runs in-process.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from llmos_kernel import wire

MAX_FRAME = 64 << 20  # bytes in one frame: the largest file or prompt a syscall carries
HEADER = struct.Struct(">I")
EXIT_UNCONFINED = 78  # the child's exit status when it could not restrict itself (EX_CONFIG)


class Policy(msgspec.Struct, array_like=True):
    """What the child may reach, decided by the host (see ``actors.sandbox_policy``)."""

    read: list[str]  # files and directory trees it may read (the runtime, its code)
    modules: dict[str, str]  # top-level module -> its file or package dir (the program's code)
    import_paths: list[str]  # extra sys.path entries (also in ``read``)
    scratch: str | None  # a directory it may write in (its cwd), or None: it writes nowhere
    memory_bytes: int | None  # RLIMIT_AS
    cpu_s: int | None  # RLIMIT_CPU (soft; SIGKILL one second later)
    open_files: int  # RLIMIT_NOFILE
    file_bytes: int  # RLIMIT_FSIZE


# -- host to child -----------------------------------------------------------------------


class Start(msgspec.Struct, tag="start", array_like=True):
    """The first frame: what to run, as which pid, under which policy."""

    pid: int
    name: str | None
    program: wire.Program
    args: dict[str, Any]
    mailbox: int
    host_id: str
    policy: Policy


class Answer(msgspec.Struct, tag="answer", array_like=True):
    call: int
    result: msgspec.Raw  # an encoded wire.Result (see wire.encode_result)


ToChild = Start | Answer | wire.Deliver | wire.TokenDelta | wire.ToolCall | wire.Kill


# -- child to host -----------------------------------------------------------------------


class Ready(msgspec.Struct, tag="ready", array_like=True):
    """Every restriction is in force; program code may now run."""


class Call(msgspec.Struct, tag="call", array_like=True):
    """One syscall of the program, answered by an ``Answer`` with the same ``call``."""

    call: int
    name: str
    args: msgspec.Raw  # an encoded dict (wire.encode_args), decoded by the host
    handling: str | None = None


class Ack(msgspec.Struct, tag="ack", array_like=True):
    """The program handled message ``id``; ``reply`` answers an ``ipc.call``."""

    id: str
    reply: dict[str, Any] | None = None


class Output(msgspec.Struct, tag="output", array_like=True):
    text: str


class ToolResult(msgspec.Struct, tag="toolresult", array_like=True):
    call: str  # the wire.ToolCall's call id
    result: msgspec.Raw  # an encoded wire.Result


class Exit(msgspec.Struct, tag="exit", array_like=True):
    report: wire.ExitReport


ToParent = Ready | Call | Ack | Output | ToolResult | Exit

# -- framing -----------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
_to_child = msgspec.msgpack.Decoder(ToChild)
_to_parent = msgspec.msgpack.Decoder(ToParent)


class ProtocolError(Exception):
    """A frame that is too long or does not decode as the declared messages."""


def frame(msg: Any) -> bytes:
    payload = _encoder.encode(msg)
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"a {type(msg).__name__} of {len(payload)} bytes is over the "
                            f"{MAX_FRAME}-byte frame limit")
    return HEADER.pack(len(payload)) + payload


def length(header: bytes) -> int:
    (n,) = HEADER.unpack(header)
    if n > MAX_FRAME:
        raise ProtocolError(f"a frame of {n} bytes is over the {MAX_FRAME}-byte limit")
    return n


def decode_to_child(payload: bytes) -> ToChild:
    try:
        return _to_child.decode(payload)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"malformed frame from the host: {e}") from None


def decode_to_parent(payload: bytes) -> ToParent:
    try:
        return _to_parent.decode(payload)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"malformed frame from the child: {e}") from None
