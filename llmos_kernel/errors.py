"""Typed errors: every failure llmos reports on purpose is one of these.

Errors cross process boundaries (Ray calls, msgpack envelopes, HTTP) as a
small dict ``{"type": name, "message": text}`` and are rebuilt on the other
side as the same class, so a caller can ``except QuotaExceeded`` no matter
where the check ran.
"""

from __future__ import annotations


class LlmosError(Exception):
    """Base class: a failure with a message that says what to fix."""

    def to_wire(self) -> dict:
        return {"type": type(self).__name__, "message": str(self)}

    @staticmethod
    def from_wire(wire: dict) -> LlmosError:
        cls = _REGISTRY.get(str(wire.get("type")), LlmosError)
        return cls(str(wire.get("message", "")))


class InvalidArgument(LlmosError, ValueError):
    """An argument has the wrong type, range or shape."""


class NotFound(LlmosError, LookupError):
    """A named thing (model, file, process, tool, request) does not exist."""


class AlreadyExists(LlmosError):
    """A thing with that name exists already."""


class PermissionDenied(LlmosError, PermissionError):
    """The calling process lacks the capability, grant or approval."""


class QuotaExceeded(LlmosError):
    """A per-process or per-kernel budget would be exceeded."""


class Timeout(LlmosError, TimeoutError):
    """A deadline passed before the operation completed."""


class Cancelled(LlmosError):
    """The operation was cancelled by its owner or by the kernel."""


class Unavailable(LlmosError):
    """A service (kernel, shard, host) is not running or not reachable."""


class SandboxUnavailable(Unavailable):
    """This machine cannot confine a sandboxed process (no Landlock, no libseccomp)."""


class ContextOverflow(InvalidArgument):
    """A prompt or conversation does not fit the model's context window."""


class ModelFormatError(LlmosError):
    """A model file is missing, not GGUF, truncated or otherwise unreadable."""


class UnsupportedModel(ModelFormatError):
    """A well-formed model file uses an architecture or tensor type llmos lacks."""


class NoSuchProcess(NotFound):
    """The pid names no live process."""


class MessageError(InvalidArgument):
    """A message is malformed, of an unknown type, or fails validation."""


class CallFailed(LlmosError):
    """An ``ipc.call`` that will never be answered: the handler raised, the process called
    exited, or the request's deadline passed (the request is a dead letter)."""


class ToolError(LlmosError):
    """A tool ran and failed; the message carries the tool's own error."""


_REGISTRY: dict[str, type[LlmosError]] = {}


def _register(cls: type[LlmosError]) -> None:
    _REGISTRY[cls.__name__] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(LlmosError)


def register_error(cls: type[LlmosError]) -> type[LlmosError]:
    """Make an error class defined elsewhere rebuildable from the wire."""
    _REGISTRY[cls.__name__] = cls
    return cls
