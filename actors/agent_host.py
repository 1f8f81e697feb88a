"""AgentHost: one Ray actor (or one driver process) running many agent processes.

Agents are asyncio tasks, not actors: a Ray actor costs ~0.5 s and ~100 MB,
an agent here costs a task, a mailbox and a few kilobytes. The host talks to
the kernel over two channels, each with at most one call in flight:

- ``host_batch``: every syscall its agents made since the last batch (sends,
  acks, LLM requests, file operations...), answered per call. Calls that take
  long (an LLM generation, a wait) are answered "pending" and finished later.
- ``host_poll``: a long-poll for whatever the kernel has for this host.

What the kernel has for a host (orders to spawn or kill, delivered messages,
LLM tokens, late syscall results) comes back on whichever channel answers
first, in numbered chunks the host applies in order. If the kernel dies
mid-batch, the host of a driver script (which outlives it) sends the batch's
idempotent calls (sends and acks, which carry their message ids) again once
the kernel is back, in their order, and fails the others with Unavailable.

Delivery is at least once; a message counts as handled when its handler
finishes (``on_message`` returns, or the program asks for its next message,
or exits). Messages a handler sends are committed together with that
acknowledgement, so a handler that finished is never re-run for the same
message and its messages are never sent twice.
"""

from __future__ import annotations

import asyncio
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
from typing import Any

import msgpack
import ray

from llmos_kernel.errors import InvalidArgument, LlmosError, MessageError, Timeout, Unavailable
from llmos_kernel.messages import (
    DEFAULT_REGISTRY,
    UNTYPED,
    Envelope,
    RawMessage,
    decode,
    encode,
    message_type,
    schema_of,
)

log = logging.getLogger("llmos.host")

POLL_TIMEOUT_S = 10.0
KERNEL_RESTART_WAIT_S = 60.0  # how long a driver's host retries a kernel that went away
RETRY_DELAY_S = 0.5
SEEN_LIMIT = 10_000  # message ids an agent remembers, to drop redeliveries
RETRYABLE = frozenset({"ipc.send", "ipc.publish", "ipc.ack", "ipc.subscribe", "ipc.unsubscribe"})

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
        if handle:
            self.finish_message()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for msg_id, msg in self.mailbox.items():
                if match is None or match(msg):
                    del self.mailbox[msg_id]
                    if handle:
                        self.handling = msg_id
                    else:
                        self.host.queue_ack(self, msg_id)
                    return msg
            self.arrived.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise Timeout(f"no matching message within {timeout} s")
            if remaining is None:
                await self.arrived.wait()
                continue
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except TimeoutError:
                raise Timeout(f"no matching message within {timeout} s") from None

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
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._inbound: tuple[str, int] = ("", 0)  # kernel epoch, next chunk start expected
        self._early: dict[int, list] = {}  # chunks that arrived before their predecessors
        self._down_since: float | None = None
        self.started_at = time.time()

    # -- lifecycle ------------------------------------------------------------
    async def start(self) -> dict:
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
            return {"type": UNTYPED, "payload": payload}
        name = message_type(msg)
        if name in self.sent_schemas:
            return {"type": name, "payload": payload}
        self.sent_schemas.add(name)
        return {"type": name, "payload": payload, "schema": schema_of(type(msg))}

    async def syscall(self, agent: AgentRuntime, name: str, args: dict) -> Any:
        call_id = f"{self.host_id}:{next(self._ids)}"
        future = asyncio.get_running_loop().create_future()
        self.futures[call_id] = future
        self.ops.append([call_id, agent.capability, name, args, agent.handling])
        self._wake.set()
        reply = await future
        if "error" in reply:
            raise LlmosError.from_wire(reply["error"])
        return reply.get("ok")

    def queue_ack(self, agent: AgentRuntime, msg_id: str, reply: dict | None = None) -> None:
        """Acknowledge a message without waiting; a failed reply is noted in the agent's log."""
        args: dict[str, Any] = {"id": msg_id}
        if reply is not None:
            args["reply"] = reply
            call_id = f"{self.host_id}:{next(self._ids)}"
            future = asyncio.get_running_loop().create_future()
            future.add_done_callback(lambda f: _log_failure(agent, "reply", f.result()))
            self.futures[call_id] = future
        else:
            call_id = ""  # nobody waits for a plain ack
        self.ops.append([call_id, agent.capability, "ipc.ack", args, None])
        self._wake.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not (self.ops or self.exits or self.logging):
                continue
            ops, self.ops = self.ops, []
            exits, self.exits = self.exits, []
            logs = {a.pid: "".join(a.log_buffer) for a in self.logging}
            for agent in self.logging:
                agent.log_buffer.clear()
            self.logging.clear()
            try:
                reply = await self.kernel.host_batch.remote(self.host_id, ops, exits, logs,
                                                            self.token)
            except ray.exceptions.RayError as e:
                await self._retry_later(ops, exits, e)
                continue
            except Exception as e:  # noqa: BLE001 - e.g. an argument Ray cannot serialize
                self._fail(ops, InvalidArgument(f"cannot send these calls: {e}"))
                continue
            self._down_since = None
            if "error" in reply:
                self._fail(ops, LlmosError.from_wire(reply["error"]))
                continue
            self._receive(reply["ok"]["out"])
            for call_id, result in reply["ok"]["results"].items():
                if "pending" not in result:
                    self._resolve(call_id, result)

    async def _retry_later(self, ops: list[list], exits: list[dict], error: Exception) -> None:
        """The kernel went away mid-batch: keep what can be sent again, fail the rest."""
        now = time.monotonic()
        self._down_since = self._down_since or now
        if now - self._down_since > KERNEL_RESTART_WAIT_S:
            self._fail(ops, Unavailable(f"kernel unreachable for {KERNEL_RESTART_WAIT_S:.0f} s: "
                                        f"{error}"))
            return
        again = [op for op in ops if op[2] in RETRYABLE]
        self._fail([op for op in ops if op[2] not in RETRYABLE], Unavailable(
            f"the kernel went away during this call (it may or may not have happened): {error}"))
        self.ops[:0] = again
        self.exits[:0] = exits
        await asyncio.sleep(RETRY_DELAY_S)
        self._wake.set()

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
                agent.deliver(_message(Envelope(*item["env"])))
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
        ``default``, else only where ``current`` is set to the returned runtime."""
        agent = AgentRuntime(self, pid, capability, name)
        self.agents[pid] = agent
        if default:
            attached[:] = [agent]
        return agent

    def _spawn(self, order: dict) -> None:
        pid = order["pid"]
        agent = AgentRuntime(self, pid, order["capability"], order.get("name"))
        self.agents[pid] = agent
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
            exit_ = {"reason": "error",
                     "error": {"type": type(e).__name__, "message": str(e),
                               "traceback": traceback.format_exc(limit=20)}}
            agent.log(f"[exit] {type(e).__name__}: {e}\n")
        self.agents.pop(agent.pid, None)
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
            result = fn(**decode_args(fn, order["args"]))
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


def _message(env: Envelope) -> Message:
    """The kernel validated the payload; a type this host has no class for stays raw."""
    try:
        body = decode(env.payload, registry=DEFAULT_REGISTRY)
    except MessageError:
        raw = msgpack.unpackb(env.payload, raw=False)
        body = RawMessage(raw["t"], raw["v"], raw["f"])
    return Message(env.id, env.sender, env.type, body, env.correlation_id, env.topic,
                   expects_reply=env.reply_to == "call", timestamp=env.timestamp)


def _plain(value: Any) -> Any:
    """Make a program's result msgpack-friendly (dataclasses to dicts, others to repr)."""
    from llmos_kernel.services.tools import to_json

    try:
        return to_json(value)
    except TypeError:
        return repr(value)


RemoteAgentHost = ray.remote(AgentHost)
