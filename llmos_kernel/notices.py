"""Messages the kernel itself sends (sender pid 0): exit notices for links and monitors,
and the answer to a call that will get no other (``NoReply``, which ``ipc.call`` raises as
CallFailed). No program can send as pid 0, so a program can trust these."""

from __future__ import annotations

from llmos_kernel.messages import Envelope, message, message_type, schema_of


@message(name="llmos.ProcessDown")
class ProcessDown:
    """A monitored (or linked, trapping) process exited."""

    pid: int
    reason: str


@message(name="llmos.ExitSignal")
class ExitSignal:
    """A linked process exited abnormally and this process traps exits."""

    pid: int
    reason: str


@message(name="llmos.NoReply")
class NoReply:
    """A call became a dead letter (its handler raised, its receiver exited for good, or
    its deadline passed): it will never be answered. Carries the call's id as its
    correlation id."""

    pid: int  # the process called
    reason: str


NO_REPLY = message_type(NoReply)  # a runtime drops one whose call no longer waits
KINDS = {"ProcessDown": ProcessDown, "ExitSignal": ExitSignal, "NoReply": NoReply}
SCHEMAS = [schema_of(cls) for cls in KINDS.values()]


def notice(kind: str, fields: dict, to: int, correlation_id: str | None = None) -> Envelope:
    return Envelope.new(KINDS[kind](**fields), sender=0, receiver=to,
                        correlation_id=correlation_id)
