"""Messages the kernel itself sends (sender pid 0): exit notices for links and monitors."""

from __future__ import annotations

from llmos_kernel.messages import Envelope, message, schema_of


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


KINDS = {"ProcessDown": ProcessDown, "ExitSignal": ExitSignal}
SCHEMAS = [schema_of(cls) for cls in KINDS.values()]


def notice(kind: str, fields: dict, to: int) -> Envelope:
    return Envelope.new(KINDS[kind](**fields), sender=0, receiver=to)
