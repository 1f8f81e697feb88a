"""AgentHost: one Ray actor (or one driver process) running many agent processes.

Agents are asyncio tasks, not actors: a Ray actor costs ~0.5 s and ~100 MB,
an agent here costs a task, a mailbox and a few kilobytes. The host talks to
the kernel over two channels, each with at most one call in flight:

- ``host_batch``: every syscall its agents made since the last batch (sends,
  acks, LLM requests, file operations...), answered per call. Calls that take
  long (an LLM generation, a wait) are answered "pending" and finished later
  through the poll channel.
- ``host_poll``: a long-poll returning whatever the kernel has for this host:
  orders (spawn, kill, run a tool), delivered messages, LLM tokens, late
  syscall results.

Delivery is at least once; a message counts as handled when its handler
finishes (``on_message`` returns, or the program asks for its next message,
or exits). Messages a handler sends are committed together with that
acknowledgement, so a handler that finished is never re-run for the same
message and its messages are never sent twice.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import inspect
import itertools
import logging
import os
import sys
import time
import traceback
import types
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from llmos_kernel.errors import LlmosError, Timeout, Unavailable
from llmos_kernel.messages import DEFAULT_REGISTRY, Envelope, decode

log = logging.getLogger("llmos.host")

POLL_TIMEOUT_S = 10.0

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
    mailbox: list[Message] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    handling: str | None = None  # id of the message being handled (its sends are held)
    seen: set[str] = field(default_factory=set)  # delivered ids, for dedup
    task: asyncio.Task | None = None
    killing: bool = False
    tools: dict[str, Callable] = field(default_factory=dict)
    streams: dict[str, asyncio.Queue] = field(default_factory=dict)  # LLM request id -> deltas
    log_buffer: list[str] = field(default_factory=list)
    behaviour: Any = None  # the instance, for a program written as a behaviour class

    def deliver(self, msg: Message) -> None:
        if msg.id in self.seen:
            return
        self.seen.add(msg.id)
        self.mailbox.append(msg)
        self.arrived.set()

    async def next_message(self, match: Callable[[Message], bool] | None = None,
                           timeout: float | None = None, *, handle: bool = True) -> Message:
        """The first message in arrival order that ``match`` accepts."""
        if handle:
            await self.finish_message()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for i, msg in enumerate(self.mailbox):
                if match is None or match(msg):
                    del self.mailbox[i]
                    if handle:
                        self.handling = msg.id
                    else:
                        self.host.queue_ack(self, msg.id)
                    return msg
            self.arrived.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise Timeout(f"no matching message within {timeout} s")
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except TimeoutError:
                raise Timeout(f"no matching message within {timeout} s") from None

    async def finish_message(self) -> None:
        """The current handler is done: acknowledge its message (with its held sends)."""
        if self.handling is not None:
            msg_id, self.handling = self.handling, None
            await self.host.syscall(self, "ipc.ack", {"id": msg_id})

    def log(self, text: str) -> None:
        self.log_buffer.append(text)
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
        self.token = token  # set for a driver host: it authenticates as the kernel's root
        self.agents: dict[int, AgentRuntime] = {}
        self.ops: list[list] = []
        self.futures: dict[str, asyncio.Future] = {}
        self.exits: list[dict] = []
        self.sent_schemas: set[str] = set()  # message types this host has declared to the kernel
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
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

    def queue_ack(self, agent: AgentRuntime, msg_id: str) -> None:
        self.ops.append([f"{self.host_id}:{next(self._ids)}", agent.capability, "ipc.ack",
                         {"id": msg_id}, None])
        self._wake.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            logs = {a.pid: "".join(a.log_buffer) for a in self.agents.values() if a.log_buffer}
            for agent in self.agents.values():
                agent.log_buffer.clear()
            if not (self.ops or self.exits or logs):
                continue
            ops, self.ops = self.ops, []
            exits, self.exits = self.exits, []
            try:
                reply = await self.kernel.host_batch.remote(self.host_id, ops, exits, logs,
                                                            self.token)
            except ray.exceptions.RayError as e:
                self._fail(ops, Unavailable(f"kernel unreachable: {e}"))
                continue
            if "error" in reply:
                self._fail(ops, LlmosError.from_wire(reply["error"]))
                continue
            for call_id, result in reply["ok"].items():
                if "pending" not in result:
                    self._resolve(call_id, result)

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
                await asyncio.sleep(1.0)
                continue
            if "error" in reply:
                log.error("host %s poll refused: %s", self.host_id, reply["error"])
                await asyncio.sleep(1.0)
                continue
            for item in reply["ok"]:
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
                agent.deliver(_message(Envelope.from_wire(item["env"])))
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
    def attach(self, pid: int, capability: str, name: str | None = None) -> AgentRuntime:
        """Make the calling task (a driver script) act as process ``pid``."""
        agent = AgentRuntime(self, pid, capability, name)
        self.agents[pid] = agent
        attached[:] = [agent]
        return agent

    def _spawn(self, order: dict) -> None:
        pid = order["pid"]
        agent = AgentRuntime(self, pid, order["capability"], order.get("name"))
        self.agents[pid] = agent
        for wire in order.get("pending", []):
            agent.deliver(_message(Envelope.from_wire(wire)))
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
            await agent.finish_message()
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
        if reply is not None and msg.expects_reply:
            from syscalls import ipc

            await ipc.reply(msg, reply)
        if getattr(behaviour, "stopped", False):
            return getattr(behaviour, "result", None)


def load_program(program: dict) -> Any:
    """The entry point (function or behaviour class) a program spec names."""
    kind = program.get("kind")
    if kind == "module":
        module_name, _, attr = program["ref"].partition(":")
        module = importlib.import_module(module_name)
    elif kind == "source":
        module = types.ModuleType(f"llmos_program_{uuid.uuid4().hex[:8]}")
        module.__file__ = program.get("filename", "<program>")
        sys.modules[module.__name__] = module
        exec(compile(program["code"], module.__file__, "exec"), module.__dict__)  # noqa: S102 - running the user's program is the point
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
    body = decode(env.payload, registry=DEFAULT_REGISTRY)
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
