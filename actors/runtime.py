"""What the syscall layer sees of a running agent: its runtime record and its messages.

``current`` names the process the running asyncio task belongs to (its host sets it
for each agent task, and tasks an agent starts inherit it); a driver script that
attached itself acts as ``attached[0]`` outside any agent. ``AgentRuntime`` is one
agent as its host sees it: mailbox, the message being handled, LLM streams, tools and
output. Everything here is plain data plus the few host calls it needs, so
``syscalls/`` depends on this small module and never on the host actor.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack

from llmos_kernel.errors import MessageError, Timeout
from llmos_kernel.messages import DEFAULT_REGISTRY, Envelope, RawMessage, decode
from llmos_kernel.notices import NO_REPLY
from llmos_kernel.wire import MAX_UNANSWERED

SEEN_LIMIT = 10_000  # message ids an agent remembers, to drop redeliveries

# The process the running task belongs to; the syscall layer reads it (syscalls._context).
current: contextvars.ContextVar[AgentRuntime | None] = contextvars.ContextVar(
    "llmos_process", default=None)
# In a driver script that attached itself, tasks outside any agent act as that process.
attached: list[AgentRuntime] = []


class Host(Protocol):
    """What an agent needs of the host it runs on (actors.agent_host.AgentHost)."""

    host_id: str

    async def syscall(self, agent: AgentRuntime, name: str, args: dict) -> Any: ...

    def queue_ack(self, agent: AgentRuntime, msg_id: str, reply: dict | None = None) -> None: ...

    def logged(self, agent: AgentRuntime) -> None: ...

    def encode_message(self, msg: Any) -> dict: ...


@dataclass
class Message:
    """A received message: ``body`` is the decoded typed message (or a dict)."""

    id: str
    sender: int
    type: str
    body: Any
    correlation_id: str | None = None
    topic: str | None = None
    expects_reply: bool = False
    timestamp: float = 0.0

    @classmethod
    def arrived(cls, wire: list) -> Message:
        """From an envelope's wire form; the body stays encoded until it is received, when
        the receiving program has declared its message types."""
        return cls.of(Envelope(*wire))

    @classmethod
    def of(cls, env: Envelope) -> Message:
        return cls(env.id, env.sender, env.type, env.payload, env.correlation_id, env.topic,
                   expects_reply=env.reply_to == "call", timestamp=env.timestamp)

    def decoded(self) -> Message:
        """The kernel validated the payload; a type this process has no class for stays a
        RawMessage."""
        if type(self.body) is bytes:
            try:
                self.body = decode(self.body, registry=DEFAULT_REGISTRY)
            except MessageError:
                raw = msgpack.unpackb(self.body, raw=False)
                self.body = RawMessage(raw["t"], raw["v"], raw["f"])
        return self


@dataclass(eq=False)
class AgentRuntime:
    """One agent process as its host sees it."""

    host: Host
    pid: int
    capability: str
    name: str | None = None
    mailbox: dict[str, Message] = field(default_factory=dict)  # by id, in arrival order
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    handling: str | None = None  # id of the message being handled (its sends are held)
    seen: dict[str, None] = field(default_factory=dict)  # recently delivered ids, oldest first
    task: asyncio.Task | None = None
    killing: bool = False
    tools: dict[str, Callable] = field(default_factory=dict)
    streams: dict[str, asyncio.Queue] = field(default_factory=dict)  # LLM request id -> deltas
    log_buffer: list[str] = field(default_factory=list)
    behaviour: Any = None  # the instance, for a program written as a behaviour class
    handles: bool = True  # False for a driver script: what it receives is acked at once
    mailbox_quota: int = 10_000  # unhandled messages from agents of this host it may hold
    awaiting: set[str] = field(default_factory=set)  # ids of its ipc.calls awaiting a reply
    # kept by its host: calls it was given and has not settled (id -> caller), and those it
    # acknowledged without an answer and has not answered since (reported at its exit)
    calls_taken: dict[str, int] = field(default_factory=dict)
    unanswered: dict[str, int] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        """Handling messages now: not a driver, not being killed, its task not ended."""
        return self.handles and not self.killing and self.task is not None \
            and not self.task.done()

    def took(self, msg: Message) -> None:
        """Its host hands it ``msg``: a call among them is open until answered."""
        if msg.expects_reply and msg.sender:
            self.calls_taken[msg.id] = msg.sender

    def settled(self, msg_id: str, answered: bool) -> None:
        """Its host acknowledged ``msg_id`` for it, with an answer or without one."""
        caller = self.calls_taken.pop(msg_id, None)
        if caller is not None and not answered:
            self.unanswered[msg_id] = caller
            if len(self.unanswered) > MAX_UNANSWERED:
                del self.unanswered[next(iter(self.unanswered))]

    def answered(self, call_id: str) -> None:
        """It sent an answer to ``call_id`` (a send with that correlation id)."""
        self.calls_taken.pop(call_id, None)
        self.unanswered.pop(call_id, None)

    def deliver(self, msg: Message) -> None:
        if msg.sender == 0 and msg.type == NO_REPLY and msg.correlation_id not in self.awaiting:
            self.host.queue_ack(self, msg.id)  # for a call that gave up waiting: no one's
            return
        if msg.id in self.seen or msg.id in self.mailbox:
            if msg.id != self.handling and msg.id not in self.mailbox:
                self.host.queue_ack(self, msg.id)  # handled already; its ack was lost
            return
        self.seen[msg.id] = None
        if len(self.seen) > SEEN_LIMIT:
            del self.seen[next(iter(self.seen))]
        self.mailbox[msg.id] = msg
        self.arrived.set()

    async def next_message(self, match: Callable[[Message], bool] | None = None,
                           timeout: float | None = None, *, handle: bool = True) -> Message:
        """The first message in arrival order that ``match`` accepts.

        With ``handle`` (a receive), the previous message counts as handled and this one
        becomes the message being handled; without it (a call's reply), it is acknowledged
        at once.
        """
        receive = handle  # a receive never takes the reply one of this agent's calls awaits
        handle = handle and self.handles
        if handle:
            self.finish_message()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        timer = None if deadline is None else loop.call_at(deadline, self.arrived.set)
        try:
            while True:
                for msg_id, msg in self.mailbox.items():
                    if receive and msg.correlation_id in self.awaiting:
                        continue
                    if match is None or match(msg):
                        del self.mailbox[msg_id]
                        if handle:
                            self.handling = msg_id
                        else:
                            self.host.queue_ack(self, msg_id)
                        return msg.decoded()
                if deadline is not None and loop.time() >= deadline:
                    raise Timeout(f"no matching message within {timeout} s")
                self.arrived.clear()
                await self.arrived.wait()
        finally:
            if timer is not None:
                timer.cancel()

    def finish_message(self, reply: dict | None = None) -> None:
        """The current handler is done: acknowledge its message (releasing its held sends),
        with ``reply`` (an encoded message) as its answer to a call."""
        if self.handling is not None:
            msg_id, self.handling = self.handling, None
            self.host.queue_ack(self, msg_id, reply)

    def log(self, text: str) -> None:
        self.log_buffer.append(text)
        self.host.logged(self)
