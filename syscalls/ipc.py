"""ipc: typed messages between processes.

Guarantees:

- order: messages from one sender to one receiver arrive in the order sent;
- durability: ``send`` returns once the message is validated and committed to
  the receiver's mailbox on disk (the kernel's store; for a receiver on the
  sender's own agent host, that host's journal, which the kernel takes over if
  the host dies) — or, inside a handler,
  staged it to be committed together with that handler's completion (the
  acknowledgement of the message being handled), so a crash keeps both or
  neither; the message stays in the mailbox until the receiver's handler for it
  finishes, across receiver crashes, host deaths and kernel restarts;
- at least once, deduplicated: a message is delivered again only if its
  handler did not finish because its host or the kernel died; a send retried
  with the same ``id`` is kept once;
- a message whose handler raises is not delivered again (it would crash every
  restart of its receiver): it becomes a dead letter that records the error;
- a ``call`` that becomes a dead letter (its handler raised, the process called
  exited for good, its deadline passed) fails at once with CallFailed, saying why,
  instead of waiting out its timeout; so does one the process took and ended without
  answering.

Errors: MessageError (malformed message, unknown or mismatched type),
NoSuchProcess (no such receiver, or it exited for good), QuotaExceeded (the
receiver's mailbox is full: back off and retry; the quota bounds the messages
waiting in the kernel and, separately, those from the receiver's own host),
Timeout (``recv``/``call``), CallFailed (``call``: no answer will come).
"""

from __future__ import annotations

from typing import Any

from actors.runtime import Message
from llmos_kernel.errors import CallFailed
from llmos_kernel.messages import message, message_type, new_message_id
from llmos_kernel.notices import NoReply
from syscalls import _context

__all__ = ["Message", "call", "done", "message", "publish", "recv", "reply", "send",
           "subscribe", "unsubscribe"]


async def send(to: int | str, msg: Any, *, id: str | None = None, deadline: float | None = None,
               correlation_id: str | None = None) -> str:
    """Send ``msg`` (a @message instance or a dict) to a pid or process name; returns its id.

    ``id`` makes the send idempotent: sending again with the same id (say, after an error
    that left you unsure) delivers the message once. ``deadline`` (epoch seconds) turns an
    undelivered message into a dead letter when it passes.
    """
    args = {"to": to, **_context.host().encode_message(msg)}
    for key, value in (("id", id), ("deadline", deadline), ("correlation_id", correlation_id)):
        if value is not None:
            args[key] = value
    return (await _context.call("ipc.send", **args))["id"]


def _matcher(type: Any, sender: int | None):
    names = None
    if type is not None:
        kinds = type if isinstance(type, tuple) else (type,)
        names = {k if isinstance(k, str) else message_type(k) for k in kinds}

    def match(m: Message) -> bool:
        return (names is None or m.type in names) and (sender is None or m.sender == sender)
    return match


async def recv(*, type: Any = None, sender: int | None = None,
               timeout: float | None = None) -> Message:
    """The next message (optionally of a type or from a sender); raises Timeout.

    Asking for the next message also says the previous one is handled: until then, what
    you send is held back, to go out together with that acknowledgement (call ``done()``
    to finish sooner). In a driver script (``syscalls.attach``) a message is handled
    as soon as it is received.
    """
    return await _context.runtime().next_message(_matcher(type, sender), timeout)


def done() -> None:
    """The message last received is handled: acknowledge it and release what was sent
    while handling it, without waiting for the next ``recv``."""
    _context.runtime().finish_message()


async def call(to: int | str, msg: Any, *, timeout: float = 30.0) -> Message:
    """Send a request and wait for its reply (matched by correlation id).

    The request leaves at once, even inside a handler (a handler that waits for a
    reply cannot hold its request back until it finishes).
    """
    sent = await _context.call("ipc.send", to=to, reply_to="call",
                               **_context.host().encode_message(msg))
    agent = _context.runtime()
    try:  # the host marked the id as awaited: no receive of this agent takes the reply
        answer = await agent.next_message(lambda m: m.correlation_id == sent["id"], timeout,
                                          handle=False)
    finally:
        agent.awaiting.discard(sent["id"])
    if answer.sender == 0 and isinstance(answer.body, NoReply):  # only the kernel sends as 0
        raise CallFailed(f"process {answer.body.pid} will not answer this call: "
                         f"{answer.body.reason}")
    return answer


async def reply(request: Message, response: Any) -> str:
    """Answer a request received from ``call`` (a behaviour can just return the answer)."""
    return await send(request.sender, response, correlation_id=request.id)


async def publish(topic: str, msg: Any) -> list[int]:
    """Send to every process subscribed to ``topic``; returns the pids reached."""
    result = await _context.call("ipc.publish", topic=topic, id=new_message_id(),
                                 **_context.host().encode_message(msg))
    return result["subscribers"]


async def subscribe(topic: str) -> None:
    await _context.call("ipc.subscribe", topic=topic)


async def unsubscribe(topic: str) -> None:
    await _context.call("ipc.unsubscribe", topic=topic)
