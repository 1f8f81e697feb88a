"""AgentHost: one Ray actor (or one driver process) running many agent processes.

Agents are asyncio tasks, not actors: a Ray actor costs ~0.5 s and ~100 MB,
an agent here costs a task, a mailbox and a few kilobytes. The host talks to
the kernel over two channels:

- ``host_batch``: every syscall its agents made since the last batch (sends,
  acks, LLM requests, file operations...), answered per call. Calls that take
  long (an LLM generation, a wait) are answered "pending" and finished later.
  Two numbered batches may be in flight; the kernel runs them in order.
- ``host_poll``: a long-poll for whatever the kernel has for this host.

What the kernel has for a host (orders to spawn or kill, delivered messages,
LLM tokens, late syscall results) comes back on whichever channel answers
first, in numbered chunks the host applies in order. If the kernel dies
mid-batch, the host of a driver script (which outlives it) sends the batch's
idempotent calls (sends and acks, which carry their message ids) again once
the kernel is back, in their order, and fails the others with Unavailable.

Delivery is at least once; a message counts as handled when its handler
finishes (``on_message`` returns, or the program asks for its next message,
calls ``ipc.done()``, or exits). Messages a handler sends are committed
together with that acknowledgement, so a handler that finished is never
re-run for the same message and its messages are never sent twice; if the
host or the kernel dies first, the message is delivered again. A driver
script is no handler: what it receives is acknowledged at once.

Local delivery: a host on the kernel's node keeps messages between its own
agents in a journal of its own (llmos_kernel.journal, in the kernel's state
dir) instead of sending them through the kernel: committed there before the
sender hears "ok", delivered from memory, deleted with the handler's
acknowledgement (together with what the handler sent to agents here). The
guarantees stay those of the kernel path, so the kernel takes over whatever
could break them: a message whose handler sends beyond this host (with what
the handler sent so far, so its ack and those sends still commit together),
a sender's earlier direct messages to a receiver it now reaches through the
kernel (its later direct ones wait until that one arrives: order per
sender), an exiting agent's unhandled messages, and a dead host's journal.
Sends with a deadline, an id of the sender's choosing, to a topic or from a
driver script always go through the kernel.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import hashlib
import importlib
import inspect
import itertools
import logging
import os
import sys
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import ray

from llmos_kernel.errors import (
    InvalidArgument,
    LlmosError,
    MessageError,
    QuotaExceeded,
    Timeout,
    Unavailable,
)
from llmos_kernel.journal import HostJournal
from llmos_kernel.messages import (
    DEFAULT_REGISTRY,
    MAX_MESSAGE_BYTES,
    UNTYPED,
    Envelope,
    RawMessage,
    check,
    decode,
    encode,
    message_type,
    new_message_id,
    schema_of,
)

log = logging.getLogger("llmos.host")

POLL_TIMEOUT_S = 5.0
KERNEL_RESTART_WAIT_S = 60.0  # how long a driver's host retries a kernel that went away
RETRY_DELAY_S = 0.5
BATCHES_IN_FLIGHT = 2
SEEN_LIMIT = 10_000  # message ids an agent remembers, to drop redeliveries
RETRYABLE = frozenset({"ipc.send", "ipc.publish", "ipc.ack", "ipc.subscribe", "ipc.unsubscribe",
                       "ipc.adopt"})
_LOCAL_ARGS = frozenset({"to", "id", "type", "payload", "schema", "correlation_id", "reply_to"})

# The process the running task belongs to; the syscall layer reads it (syscalls._context).
current: contextvars.ContextVar[AgentRuntime | None] = contextvars.ContextVar(
    "llmos_process", default=None)
# In a driver script that attached itself, tasks outside any agent act as that process.
attached: list[AgentRuntime] = []


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

    host: AgentHost
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

    def deliver(self, msg: Message) -> None:
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
        handle = handle and self.handles
        if handle:
            self.finish_message()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        timer = None if deadline is None else loop.call_at(deadline, self.arrived.set)
        try:
            while True:
                for msg_id, msg in self.mailbox.items():
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
        self.host.logging.add(self)
        self.host.wake()


@dataclass
class _Batch:
    """One host_batch call's cargo: syscalls, exit reports, output by pid."""

    ops: list[list]
    exits: list[dict]
    logs: dict[int, str]
    error: Exception | None = None  # why it failed in flight (None: refused, not run)


class _Capture:
    """sys.stdout/sys.stderr stand-in that files each agent's output under its pid."""

    def __init__(self, real, stream: str):
        self.real, self.stream = real, stream

    def write(self, text: str) -> int:
        agent = current.get()
        if agent is None:
            return self.real.write(text)
        agent.log(text if self.stream == "stdout" else f"[stderr] {text}")
        return len(text)

    def flush(self) -> None:
        self.real.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class AgentHost:
    def __init__(self, kernel: Any, host_id: str, *, token: str | None = None):
        self.kernel = ray.get_actor(kernel, namespace="llmos") if isinstance(kernel, str) else kernel
        self.host_id = host_id
        self.token = token  # the kernel's root token (driver host) or this host's secret
        self.agents: dict[int, AgentRuntime] = {}
        self.ops: list[list] = []
        self.futures: dict[str, asyncio.Future] = {}
        self.exits: list[dict] = []
        self.logging: set[AgentRuntime] = set()  # agents with output to send
        self.sent_schemas: set[str] = set()  # message types this host has declared to the kernel
        self._schemas: dict[str, dict] = {}  # their schemas, by name
        self._wired: tuple[bytes, str] | None = None  # the payload wire() made last (valid)
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._inbound: tuple[str, int] = ("", 0)  # kernel epoch, next chunk start expected
        self._early: dict[int, list] = {}  # chunks that arrived before their predecessors
        self._epoch = ""  # the kernel instance our batches are numbered for
        self._seq = 0  # the next batch's number
        self._in_flight: set[int] = set()
        self._setback: dict[int, _Batch] = {}  # batches to send again, by number
        self._unsent_logs: dict[int, str] = {}  # output of batches that must go again
        self._down_since: float | None = None
        self.started_at = time.time()
        # Messages between this host's agents (see "Local delivery" above).
        self.journal: HostJournal | None = None
        self.names: dict[str, AgentRuntime] = {}
        self.local_adds: list[tuple[Envelope, asyncio.Future | None]] = []  # to commit
        self.local_removes: list[str] = []  # handled: to delete with the next commit
        self.local_inflight: dict[str, Envelope] = {}  # committed, not yet handled
        self.local_pending: collections.Counter[int] = collections.Counter()  # per receiver
        self.held_local: dict[str, list[Envelope]] = {}  # handled msg id -> what it sent
        self.gates: dict[tuple[int, int], str] = {}  # (sender, receiver) -> id on its way

    # -- lifecycle ------------------------------------------------------------
    async def start(self, journal: str | None = None, node: str | None = None) -> dict:
        """Start serving; with ``journal`` (a path on the kernel's node ``node``), messages
        between agents of this host are kept there instead of going through the kernel."""
        if journal and self.journal is None and node == ray.get_runtime_context().get_node_id():
            try:
                self.journal = HostJournal(Path(journal))
            except LlmosError as e:
                log.error("host %s delivers every message through the kernel: %s",
                          self.host_id, e)
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._flush_loop()), loop.create_task(self._poll_loop())]
            if not isinstance(sys.stdout, _Capture):
                sys.stdout, sys.stderr = _Capture(sys.stdout, "stdout"), _Capture(sys.stderr, "stderr")
        return self.info()

    async def lifetime(self) -> None:
        """Never returns: the kernel awaits it to learn when this host dies."""
        await asyncio.Event().wait()

    def info(self) -> dict:
        rss = 0
        try:
            with open(f"/proc/{os.getpid()}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
        return {"host": self.host_id, "pid": os.getpid(), "agents": len(self.agents),
                "rss_bytes": rss, "uptime_s": time.time() - self.started_at}

    async def stop(self) -> None:
        for agent in list(self.agents.values()):
            if agent.task:
                agent.task.cancel()
        for task in self._tasks:
            task.cancel()

    def wake(self) -> None:
        self._wake.set()

    # -- syscalls -------------------------------------------------------------
    def wire(self, msg: Any) -> dict:
        """A message's type and msgpack payload; with its schema the first time this host
        sends that type, so the kernel can validate types only agent programs define."""
        payload = encode(msg)
        if isinstance(msg, dict):
            self._wired = (payload, UNTYPED)
            return {"type": UNTYPED, "payload": payload}
        name = message_type(msg)
        self._wired = (payload, name)
        if name in self.sent_schemas:
            return {"type": name, "payload": payload}
        self.sent_schemas.add(name)
        schema = self._schemas.get(name)
        if schema is None:
            schema = self._schemas[name] = schema_of(type(msg))
        return {"type": name, "payload": payload, "schema": schema}

    async def syscall(self, agent: AgentRuntime, name: str, args: dict) -> Any:
        gate = None
        if name == "ipc.send":
            explicit = "id" in args
            if not explicit:
                args["id"] = new_message_id()
            if self.journal is not None:
                local = self._send_local(agent, args, explicit)
                if isinstance(local, dict):  # held until the handler finishes
                    return local
                if local is not None:
                    reply = await local
                    if "error" in reply:
                        raise LlmosError.from_wire(reply["error"])
                    return reply["ok"]
                gate = self._before_kernel_send(agent, args)
        call_id = f"{self.host_id}:{next(self._ids)}"
        future = asyncio.get_running_loop().create_future()
        self.futures[call_id] = future
        self.ops.append([call_id, agent.capability, name, args, agent.handling])
        self._wake.set()
        reply = await future
        if "error" in reply:
            if gate is not None and self.gates.get(gate) == f"{agent.pid}:{args['id']}":
                del self.gates[gate]  # it never arrives
            raise LlmosError.from_wire(reply["error"])
        return reply.get("ok")

    def queue_ack(self, agent: AgentRuntime, msg_id: str, reply: dict | None = None) -> None:
        """Acknowledge a message without waiting; a failed reply is noted in the agent's log."""
        if reply is not None:
            reply = {**reply, "id": new_message_id()}
        if msg_id in self.local_inflight:
            try:
                env = None if reply is None else self._local_envelope(agent, reply)
            except QuotaExceeded as e:  # as through the kernel: handled, the reply refused
                _log_failure(agent, "reply", {"error": e.to_wire()})
                reply = None
                env = None
            if reply is None or env is not None:
                self._finish_local(msg_id, [] if env is None else [env])
                return
            self._adopt_handled(agent, msg_id)  # the reply leaves through the kernel
        args: dict[str, Any] = {"id": msg_id}
        if reply is not None:
            receiver = self._local_agent(reply.get("to"))
            if receiver is not None and self.journal is not None:
                self._route_via_kernel(agent.pid, receiver.pid, f"{agent.pid}:{reply['id']}")
            args["reply"] = reply
            call_id = f"{self.host_id}:{next(self._ids)}"
            future = asyncio.get_running_loop().create_future()
            future.add_done_callback(lambda f: _log_failure(agent, "reply", f.result()))
            self.futures[call_id] = future
        else:
            call_id = ""  # nobody waits for a plain ack
        self.ops.append([call_id, agent.capability, "ipc.ack", args, None])
        self._wake.set()

    # -- local delivery ---------------------------------------------------------
    def _local_agent(self, to: Any) -> AgentRuntime | None:
        """The running agent of this host that ``to`` (a pid or a name) is, if any."""
        agent = self.agents.get(to) if type(to) is int else \
            self.names.get(to) if type(to) is str else None
        if agent is None or not agent.handles or agent.killing or agent.task is None or \
                agent.task.done():
            return None
        return agent

    def _local_envelope(self, agent: AgentRuntime, args: dict) -> Envelope | None:
        """The envelope of a send that may stay on this host, else None (the kernel takes it:
        a receiver elsewhere, a deadline, a message this host cannot vouch for...)."""
        if not agent.handles or not args.keys() <= _LOCAL_ARGS:
            return None
        receiver = self._local_agent(args.get("to"))
        if receiver is None or (agent.pid, receiver.pid) in self.gates:
            return None
        payload, type_ = args.get("payload"), args.get("type")
        if type(payload) is not bytes or len(payload) > MAX_MESSAGE_BYTES:
            return None
        wired = self._wired
        try:  # what wire() just encoded from a declared message is valid by construction
            if not (wired is not None and wired[0] is payload and wired[1] == type_) and \
                    check(payload, registry=DEFAULT_REGISTRY) != type_:
                return None
            env = Envelope.from_wire([f"{agent.pid}:{args['id']}", agent.pid, receiver.pid,
                                      type_, payload, args.get("correlation_id"),
                                      args.get("reply_to"), None, time.time(), None])
        except MessageError:
            return None
        if self.local_pending[receiver.pid] >= receiver.mailbox_quota:
            raise QuotaExceeded(f"the mailbox of process {receiver.pid} is full "
                                f"({receiver.mailbox_quota} pending messages); retry later")
        if "schema" in args:
            self.sent_schemas.discard(type_)  # the kernel has not seen it yet
        return env

    def _send_local(self, agent: AgentRuntime, args: dict, explicit: bool
                    ) -> dict | asyncio.Future | None:
        """Keep a send on this host when it may; None when the kernel must take it.

        A send with an id of the caller's choosing goes through the kernel, which remembers
        ids for deduplication across restarts."""
        handling = agent.handling if args.get("reply_to") != "call" else None
        if explicit or (handling is not None and handling not in self.local_inflight):
            return None
        env = self._local_envelope(agent, args)
        if env is None:
            return None
        self.local_pending[env.receiver] += 1
        if handling is not None:  # goes out with the handler's acknowledgement
            self.held_local.setdefault(handling, []).append(env)
            return {"id": env.id, "to": env.receiver}
        future = asyncio.get_running_loop().create_future()
        self.local_adds.append((env, future))
        self._wake.set()
        return future

    def _commit_local(self) -> None:
        """Commit what was sent and handled here since the last commit, then deliver."""
        if not (self.local_adds or self.local_removes):
            return
        adds, removes = self.local_adds, self.local_removes
        self.local_adds, self.local_removes = [], []
        try:
            self.journal.commit([env for env, _ in adds], removes)
        except Exception as e:
            log.exception("host %s: journal commit failed", self.host_id)
            error = Unavailable(f"could not persist: {e}").to_wire()
            for env, future in adds:
                self.local_pending[env.receiver] -= 1
                if future is not None and not future.done():
                    future.set_result({"error": error})
            return
        orphans = []
        for env, future in adds:
            self.local_inflight[env.id] = env
            receiver = self.agents.get(env.receiver)
            if receiver is not None:
                receiver.deliver(Message.of(env))
            else:  # it exited meanwhile: its next incarnation gets it from the kernel
                orphans.append(env)
            if future is not None and not future.done():
                future.set_result({"ok": {"id": env.id, "to": env.receiver}})
        if orphans:
            self._adopt(orphans)

    def _finish_local(self, msg_id: str, replies: list[Envelope]) -> None:
        """A handler finished a local message: its sends and its deletion commit together."""
        env = self.local_inflight.pop(msg_id)
        self.local_pending[env.receiver] -= 1
        for reply in replies:
            self.local_pending[reply.receiver] += 1
        sent = self.held_local.pop(msg_id, []) + replies
        self.local_adds.extend((e, None) for e in sent)
        self.local_removes.append(msg_id)
        self._wake.set()

    def _adopt(self, envs: list[Envelope]) -> None:
        """Hand unhandled local messages to the kernel (in order); the journal forgets them
        once the kernel has committed them."""
        for env in envs:
            self.local_inflight.pop(env.id, None)
            self.local_pending[env.receiver] -= 1
        ids = [env.id for env in envs]

        def adopted(future: asyncio.Future) -> None:
            if "error" in future.result():  # kept here: the kernel takes them when we die
                log.error("host %s could not hand %d messages to the kernel: %s",
                          self.host_id, len(ids), future.result()["error"])
                return
            self.local_removes.extend(ids)
            self._wake.set()

        call_id = f"{self.host_id}:{next(self._ids)}"
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(adopted)
        self.futures[call_id] = future
        self.ops.append([call_id, "", "ipc.adopt",
                         {"envelopes": [env.to_wire() for env in envs]}, None])
        self._wake.set()

    def _route_via_kernel(self, sender: int, receiver: int, msg_id: str) -> None:
        """``sender`` sends to ``receiver`` (here) through the kernel: what it sent directly
        before goes to the kernel first, and later direct sends wait until ``msg_id``
        arrives, so its messages keep their order, also when redelivered after a crash."""
        self._commit_local()
        earlier = [e for e in self.local_inflight.values()
                   if e.sender == sender and e.receiver == receiver]
        if earlier:
            self._adopt(earlier)
        self.gates[(sender, receiver)] = msg_id

    def _before_kernel_send(self, agent: AgentRuntime, args: dict) -> tuple[int, int] | None:
        """A send that goes through the kernel; returns its gate, if it set one."""
        handling = agent.handling if args.get("reply_to") != "call" else None
        if handling is not None and handling in self.local_inflight:
            self._adopt_handled(agent, handling)  # it must commit with the handler's ack
        receiver = self._local_agent(args.get("to"))
        if receiver is None:
            return None
        self._route_via_kernel(agent.pid, receiver.pid, f"{agent.pid}:{args['id']}")
        return (agent.pid, receiver.pid)

    def _adopt_handled(self, agent: AgentRuntime, msg_id: str) -> None:
        """The handler of local message ``msg_id`` sends beyond this host: the message and
        what the handler sent so far become the kernel's, to commit with its ack there."""
        self._adopt([self.local_inflight[msg_id]])
        for env in self.held_local.pop(msg_id, []):
            self.local_pending[env.receiver] -= 1
            args: dict[str, Any] = {"to": env.receiver, "id": env.id.split(":", 1)[1],
                                    "type": env.type, "payload": env.payload}
            for key in ("correlation_id", "reply_to"):
                if getattr(env, key) is not None:
                    args[key] = getattr(env, key)
            if env.type != UNTYPED and env.type not in self.sent_schemas:
                args["schema"] = schema_of(env.type, registry=DEFAULT_REGISTRY)
                self.sent_schemas.add(env.type)
            if self._local_agent(env.receiver) is not None:
                self._route_via_kernel(agent.pid, env.receiver, env.id)
            call_id = f"{self.host_id}:{next(self._ids)}"
            future = asyncio.get_running_loop().create_future()
            future.add_done_callback(lambda f: _log_failure(agent, "send", f.result()))
            self.futures[call_id] = future
            self.ops.append([call_id, agent.capability, "ipc.send", args, msg_id])

    def _hand_over(self, agent: AgentRuntime) -> None:
        """An agent exited: its unhandled local messages go to the kernel, which delivers them
        to its next incarnation or makes them dead letters (before its exit report)."""
        for env in self.held_local.pop(agent.handling, []) if agent.handling else []:
            self.local_pending[env.receiver] -= 1  # its handler did not finish
        self._commit_local()
        mine = [e for e in self.local_inflight.values() if e.receiver == agent.pid]
        if mine:
            self._adopt(mine)

    async def _flush_loop(self) -> None:
        """Send what agents asked for, up to BATCHES_IN_FLIGHT numbered batches at a time (the
        kernel runs a host's batches in their order), so the kernel works on one batch while
        this host works on the answers to the one before."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.journal is not None:
                self._commit_local()
            if self._setback or len(self._in_flight) >= BATCHES_IN_FLIGHT or not (
                    self.ops or self.exits or self.logging or self._unsent_logs):
                continue
            batch = _Batch(self.ops, self.exits, self._unsent_logs)
            self.ops, self.exits, self._unsent_logs = [], [], {}
            for agent in self.logging:
                batch.logs[agent.pid] = batch.logs.get(agent.pid, "") + "".join(agent.log_buffer)
                agent.log_buffer.clear()
            self.logging.clear()
            seq, self._seq = self._seq, self._seq + 1
            self._in_flight.add(seq)
            asyncio.get_running_loop().create_task(self._send(seq, batch))

    async def _send(self, seq: int, batch: _Batch) -> None:
        try:
            reply = await self.kernel.host_batch.remote(self.host_id, self._epoch, seq, batch.ops,
                                                        batch.exits, batch.logs, self.token)
        except ray.exceptions.RayError as e:
            batch.error = e
            self._setback[seq] = batch
        except Exception as e:  # noqa: BLE001 - e.g. an argument Ray cannot serialize
            self._fail(batch.ops, InvalidArgument(f"cannot send these calls: {e}"))
        else:
            if "error" in reply:
                self._fail(batch.ops, LlmosError.from_wire(reply["error"]))
            elif "resync" in reply["ok"]:  # a new kernel, or a batch went missing: renumber
                self._epoch = reply["ok"]["resync"]
                self._setback[seq] = batch
            else:
                self._down_since = None
                self._receive(reply["ok"]["out"])
                for call_id, result in reply["ok"]["results"].items():
                    if "pending" not in result:
                        self._resolve(call_id, result)
        finally:
            self._in_flight.discard(seq)
            if self._setback and not self._in_flight:
                await self._send_again()
            self._wake.set()

    async def _send_again(self) -> None:
        """Queue what batches that failed or were refused carried, in their order, ahead of
        anything newer; a batch lost with the kernel keeps only its idempotent calls."""
        batches = [self._setback[seq] for seq in sorted(self._setback)]
        errors = [b.error for b in batches if b.error is not None]
        again: list[list] = []
        self.exits[:0] = [report for b in batches for report in b.exits]
        for b in reversed(batches):
            for pid, text in b.logs.items():
                self._unsent_logs[pid] = text + self._unsent_logs.get(pid, "")
        for b in batches:
            if b.error is None:
                again += b.ops
                continue
            again += [op for op in b.ops if op[2] in RETRYABLE]
            self._fail([op for op in b.ops if op[2] not in RETRYABLE], Unavailable(
                f"the kernel went away during this call (it may or may not have happened): "
                f"{b.error}"))
        if errors:
            now = time.monotonic()
            self._down_since = self._down_since or now
            if now - self._down_since > KERNEL_RESTART_WAIT_S:
                self._fail(again, Unavailable(f"kernel unreachable for "
                                              f"{KERNEL_RESTART_WAIT_S:.0f} s: {errors[-1]}"))
                again = []
            await asyncio.sleep(RETRY_DELAY_S)
        self.ops[:0] = again
        self._epoch, self._seq = ("" if errors else self._epoch), 0
        self._setback.clear()

    def _fail(self, ops: list[list], error: LlmosError) -> None:
        for op in ops:
            self._resolve(op[0], {"error": error.to_wire()})

    def _resolve(self, call_id: str, result: dict) -> None:
        future = self.futures.pop(call_id, None)
        if future is not None and not future.done():
            future.set_result(result)

    async def _poll_loop(self) -> None:
        while True:
            try:
                reply = await self.kernel.host_poll.remote(self.host_id, POLL_TIMEOUT_S, self.token)
            except ray.exceptions.RayError as e:
                log.warning("host %s lost the kernel: %s", self.host_id, e)
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            if "error" in reply:
                log.error("host %s poll refused: %s", self.host_id, reply["error"])
                await asyncio.sleep(1.0)
                continue
            self._receive(reply["ok"])

    def _receive(self, chunk: list) -> None:
        """Apply a numbered chunk of kernel items, in order across both channels."""
        epoch, start, items = chunk
        if epoch != self._inbound[0]:  # a new kernel (restarted): it numbers from zero
            self._inbound, self._early = (epoch, 0), {}
        if not items:
            return
        self._early[start] = items
        while self._inbound[1] in self._early:
            items = self._early.pop(self._inbound[1])
            self._inbound = (epoch, self._inbound[1] + len(items))
            for item in items:
                try:
                    self._dispatch(item)
                except Exception:
                    log.exception("host %s could not handle %s", self.host_id, item.get("kind"))

    def _dispatch(self, item: dict) -> None:
        kind = item["kind"]
        if kind == "reply":
            self._resolve(item["call"], item["reply"])
        elif kind == "msg":
            agent = self.agents.get(item["pid"])
            if agent is not None:
                msg = Message.arrived(item["env"])
                if self.gates and self.gates.get((msg.sender, agent.pid)) == msg.id:
                    del self.gates[(msg.sender, agent.pid)]  # later ones may go directly
                agent.deliver(msg)
        elif kind == "delta":
            agent = self.agents.get(item["pid"])
            queue = agent.streams.get(item["delta"]["request_id"]) if agent else None
            if queue is not None:
                queue.put_nowait(item["delta"])
        elif kind == "spawn":
            self._spawn(item)
        elif kind == "kill":
            agent = self.agents.get(item["pid"])
            if agent is not None:
                asyncio.get_running_loop().create_task(self._kill(agent, item.get("grace_s", 5.0)))
        elif kind == "tool":
            asyncio.get_running_loop().create_task(self._run_tool(item))
        else:
            log.error("host %s: unknown item kind %r", self.host_id, kind)

    # -- processes ------------------------------------------------------------
    def attach(self, pid: int, capability: str, name: str | None = None, *,
               default: bool = True) -> AgentRuntime:
        """Let a driver script act as process ``pid``: in every task outside an agent when
        ``default``, else only where ``current`` is set to the returned runtime. A script
        is not a message handler: a message it receives is acknowledged at once."""
        agent = AgentRuntime(self, pid, capability, name, handles=False)
        self.agents[pid] = agent
        if default:
            attached[:] = [agent]
        return agent

    def _spawn(self, order: dict) -> None:
        pid = order["pid"]
        agent = AgentRuntime(self, pid, order["capability"], order.get("name"),
                             mailbox_quota=order.get("mailbox", 10_000))
        self.agents[pid] = agent
        if agent.name:
            self.names[agent.name] = agent
        for key in [k for k in self.gates if k[1] == pid]:
            del self.gates[key]
        for sender, newest in (order.get("backlog") or {}).items():
            self.gates[(int(sender), pid)] = newest  # what waits in the kernel comes first
        ctx = contextvars.copy_context()
        ctx.run(current.set, agent)
        agent.task = asyncio.get_running_loop().create_task(
            self._run(agent, order["program"], order.get("args") or {}), context=ctx)

    async def _run(self, agent: AgentRuntime, program: dict, args: dict) -> None:
        exit_: dict[str, Any]
        try:
            entry = load_program(program)
            if inspect.isclass(entry):
                result = await _run_behaviour(agent, entry, args)
            else:
                result = entry(**args)
                if inspect.isawaitable(result):
                    result = await result
            agent.finish_message()
            exit_ = {"reason": "normal", "result": _plain(result)}
        except asyncio.CancelledError:
            exit_ = {"reason": "killed" if agent.killing else "shutdown"}
        except Exception as e:  # noqa: BLE001 - the program crashed: its supervisor decides
            exit_ = {"reason": "error", "handling": agent.handling,
                     "error": {"type": type(e).__name__, "message": str(e),
                               "traceback": traceback.format_exc(limit=20)}}
            agent.log(f"[exit] {type(e).__name__}: {e}\n")
        self.agents.pop(agent.pid, None)
        if agent.name and self.names.get(agent.name) is agent:
            del self.names[agent.name]
        if self.journal is not None:
            self._hand_over(agent)
        self.exits.append({"pid": agent.pid, **exit_})
        self._wake.set()

    async def _kill(self, agent: AgentRuntime, grace_s: float) -> None:
        agent.killing = True
        hook = getattr(agent.behaviour, "terminate", None)
        if hook is not None:
            try:
                result = hook("killed")
                if inspect.isawaitable(result):
                    await asyncio.wait_for(result, grace_s)
            except Exception as e:  # noqa: BLE001 - a failing terminate hook still ends in a kill
                agent.log(f"[terminate failed] {type(e).__name__}: {e}\n")
        if agent.task is not None:
            agent.task.cancel()

    async def _run_tool(self, order: dict) -> None:
        agent = self.agents.get(order["pid"])
        try:
            if agent is None or order["name"] not in agent.tools:
                raise LookupError(f"tool {order['name']!r} is not registered by pid {order['pid']}")
            from llmos_kernel.services.tools import decode_args

            fn = agent.tools[order["name"]]
            ctx = contextvars.copy_context()
            ctx.run(current.set, agent)
            kwargs = decode_args(fn, order["args"])
            if inspect.iscoroutinefunction(fn):
                result = await asyncio.get_running_loop().create_task(fn(**kwargs), context=ctx)
            else:  # a plain function may block: keep the host's loop (other agents) moving
                result = await asyncio.to_thread(ctx.run, fn, **kwargs)
                if inspect.isawaitable(result):
                    result = await asyncio.get_running_loop().create_task(result, context=ctx)
            reply = {"ok": _plain(result)}
        except Exception as e:  # noqa: BLE001 - reported to the caller as a ToolError
            reply = {"error": {"type": "ToolError", "message": f"{type(e).__name__}: {e}"}}
        self.ops.append([f"{self.host_id}:{next(self._ids)}", "", "tools.result",
                         {"call": order["call"], "reply": reply}, None])
        self._wake.set()


def _log_failure(agent: AgentRuntime, what: str, result: dict) -> None:
    if "error" in result:
        agent.log(f"[{what} failed] {result['error'].get('type')}: "
                  f"{result['error'].get('message')}\n")


async def _run_behaviour(agent: AgentRuntime, cls: type, args: dict) -> Any:
    """Run an OTP-like behaviour: ``init(**args)``, then ``on_message(msg)`` per message."""
    behaviour = cls()
    agent.behaviour = behaviour
    init = getattr(behaviour, "init", None)
    if init is not None:
        result = init(**args)
        if inspect.isawaitable(result):
            await result
    on_message = getattr(behaviour, "on_message", None)
    if on_message is None:
        return None
    while True:
        msg = await agent.next_message()
        reply = on_message(msg)
        if inspect.isawaitable(reply):
            reply = await reply
        agent.finish_message(
            {"to": msg.sender, "correlation_id": msg.id, **agent.host.wire(reply)}
            if reply is not None and msg.expects_reply else None)
        if getattr(behaviour, "stopped", False):
            return getattr(behaviour, "result", None)


def load_program(program: dict) -> Any:
    """The entry point (function or behaviour class) a program spec names."""
    kind = program.get("kind")
    if kind == "module":
        module_name, _, attr = program["ref"].partition(":")
        module = importlib.import_module(module_name)
    elif kind == "source":
        # One module per distinct source text: a second spawn of the same program reuses it,
        # so its @message classes are declared once per host.
        name = "llmos_program_" + hashlib.sha1(program["code"].encode()).hexdigest()[:16]
        module = sys.modules.get(name)
        if module is None:
            module = types.ModuleType(name)
            module.__file__ = program.get("filename", "<program>")
            module.__llmos_program__ = {k: program[k] for k in ("kind", "code", "filename")
                                        if k in program}  # lets it spawn its own classes
            sys.modules[name] = module
            try:
                exec(compile(program["code"], module.__file__, "exec"), module.__dict__)  # noqa: S102 - running the user's program is the point
            except BaseException:
                del sys.modules[name]
                raise
        attr = program.get("attr") or ""
    elif kind == "pickle":
        return ray.cloudpickle.loads(program["data"])
    else:
        raise ValueError(f"unknown program kind {kind!r}")
    if attr:
        return getattr(module, attr)
    for default in ("main", "Agent"):
        if hasattr(module, default):
            return getattr(module, default)
    raise ValueError(f"program {program.get('label')!r} defines neither main() nor class Agent")


def _plain(value: Any) -> Any:
    """Make a program's result msgpack-friendly (dataclasses to dicts, others to repr)."""
    from llmos_kernel.services.tools import to_json

    try:
        return to_json(value)
    except TypeError:
        return repr(value)


class _HostActor:
    """The Ray actor around an AgentHost. Ray wraps every method of an actor class (for
    tracing), so the host's own methods, called per message, live on a plain object."""

    def __init__(self, kernel: Any, host_id: str, *, token: str | None = None):
        self.host = AgentHost(kernel, host_id, token=token)

    async def start(self, journal: str | None = None, node: str | None = None) -> dict:
        return await self.host.start(journal, node)

    async def lifetime(self) -> None:
        await self.host.lifetime()

    def info(self) -> dict:
        return self.host.info()

    async def stop(self) -> None:
        await self.host.stop()


RemoteAgentHost = ray.remote(_HostActor)
