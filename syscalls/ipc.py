"""ipc: typed messages between processes.

Guarantees: per sender→receiver order; at-least-once delivery with dedup by
message id; a message is persisted before ``send`` returns (or, inside a
handler, together with that handler's completion — see actors.agent_host);
it stays in the receiver's durable mailbox until its handler finishes, across
receiver crashes, host deaths and kernel restarts.
"""

from __future__ import annotations

from typing import Any

from actors.agent_host import Message
from llmos_kernel.messages import UNTYPED, encode, message, new_message_id, schema_of
from syscalls import _context

__all__ = ["Message", "call", "message", "publish", "recv", "reply", "send", "subscribe",
           "unsubscribe"]


def _wire(msg: Any) -> dict:
    """Encode a @message instance (or a plain dict) and name its type and schema."""
    payload = encode(msg)
    if isinstance(msg, dict):
        return {"type": UNTYPED, "payload": payload}
    schema = schema_of(type(msg))
    host = _context.host()
    out = {"type": schema["name"], "payload": payload}
    if schema["name"] not in host.sent_schemas:
        out["schema"] = schema
        host.sent_schemas.add(schema["name"])
    return out


async def send(to: int | str, msg: Any, *, deadline: float | None = None,
               correlation_id: str | None = None) -> str:
    """Send ``msg`` (a @message instance or a dict) to a pid or process name; returns its id."""
    args = {"to": to, "id": new_message_id(), **_wire(msg)}
    if deadline is not None:
        args["deadline"] = deadline
    if correlation_id is not None:
        args["correlation_id"] = correlation_id
    return (await _context.call("ipc.send", **args))["id"]


def _matcher(type: Any, sender: int | None):
    names = None
    if type is not None:
        kinds = type if isinstance(type, tuple) else (type,)
        names = {k if isinstance(k, str) else schema_of(k)["name"] for k in kinds}

    def match(m: Message) -> bool:
        return (names is None or m.type in names) and (sender is None or m.sender == sender)
    return match


async def recv(*, type: Any = None, sender: int | None = None,
               timeout: float | None = None) -> Message:
    """The next message (optionally of a type or from a sender); raises Timeout.

    Asking for the next message also says the previous one is handled.
    """
    return await _context.runtime().next_message(_matcher(type, sender), timeout)


async def call(to: int | str, msg: Any, *, timeout: float = 30.0) -> Message:
    """Send a request and wait for its reply (matched by correlation id)."""
    request_id = new_message_id()
    await _context.call("ipc.send", to=to, id=request_id, reply_to="call", **_wire(msg))
    return await _context.runtime().next_message(
        lambda m: m.correlation_id == request_id, timeout, handle=False)


async def reply(request: Message, response: Any) -> str:
    """Answer a request received from ``call``."""
    return await send(request.sender, response, correlation_id=request.id)


async def publish(topic: str, msg: Any) -> list[int]:
    """Send to every process subscribed to ``topic``; returns the pids reached."""
    result = await _context.call("ipc.publish", topic=topic, id=new_message_id(), **_wire(msg))
    return result["subscribers"]


async def subscribe(topic: str) -> None:
    await _context.call("ipc.subscribe", topic=topic)


async def unsubscribe(topic: str) -> None:
    await _context.call("ipc.unsubscribe", topic=topic)
