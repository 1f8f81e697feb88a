"""AgentHost: one Ray actor (or one driver process) running many agent processes.

Agents are asyncio tasks, not actors: a Ray actor is a whole process, an agent here
is a task, a mailbox and a few kilobytes. The host is three parts, each in its own
module:

- the kernel link (``actors.host_transport``): numbered batches of syscalls out,
  numbered chunks of items (spawn/kill orders, messages, tokens, late results) in;
- local delivery (``actors.local_delivery``): messages between this host's agents
  kept in a journal of its own, with the kernel path's guarantees;
- the program runner (``actors.program_runner``): load, run and kill programs, run
  the tools they registered, capture their output;
- sandboxed agents (``actors.sandboxed_agents``): a process spawned with ``sandbox=True``
  runs in a confined child process; the host keeps its record and capability and
  relays its syscalls, messages, tokens, tool calls and kill orders.

This module joins them: a syscall goes local or to the kernel, an item from the kernel
goes to its agent. Delivery is at least once; a message counts as handled when its
handler finishes (``on_message`` returns, or the program asks for its next message,
calls ``ipc.done()``, or exits). Messages a handler sends are committed together
with that acknowledgement, so a handler that finished is never re-run for the same
message and its messages are never sent twice; if the host or the kernel dies first,
the message is delivered again. A driver script is no handler: what it receives is
acknowledged at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import os
import time
from pathlib import Path
from typing import Any

import ray

from actors import program_runner, sandboxed_agents
from actors.host_transport import KernelLink
from actors.local_delivery import LocalDelivery, log_failure
from actors.runtime import AgentRuntime, Message, attached, current
from actors.sandbox_policy import check_available
from actors.sandboxed_agents import SandboxedAgent, Spares
from llmos_kernel import gc_pauses, wire
from llmos_kernel.errors import LlmosError, PermissionDenied
from llmos_kernel.journal import HostJournal
from llmos_kernel.messages import UNTYPED, encode, message_type, new_message_id, schema_of


class AgentHost:
    def __init__(self, kernel: Any, host_id: str, *, token: str | None = None):
        kernel = ray.get_actor(kernel, namespace="llmos") if isinstance(kernel, str) else kernel
        self.host_id = host_id
        self.link = KernelLink(kernel, host_id, token, self._dispatch, self._before_flush,
                               lost=(ray.exceptions.RayError,))
        self.agents: dict[int, AgentRuntime] = {}
        self.names: dict[str, AgentRuntime] = {}
        self.sent_schemas: set[str] = set()  # message types this host has declared to the kernel
        self._schemas: dict[str, dict] = {}  # their schemas, by name
        self.last_encoded: tuple[bytes, str] | None = None  # what encode_message made last
        self.local: LocalDelivery | None = None  # messages between this host's agents
        self.spares = Spares()  # children for sandboxed processes, started ahead
        self.sandbox: str | None = None  # why it cannot run sandboxed processes (None: it can)
        self.started_at = time.time()

    # -- lifecycle ------------------------------------------------------------
    async def start(self, journal: str | None = None, node: str | None = None) -> dict:
        """Start serving; with ``journal`` (a path on the kernel's node ``node``), messages
        between agents of this host are kept there instead of going through the kernel."""
        if journal and self.local is None and node == ray.get_runtime_context().get_node_id():
            try:
                self.local = LocalDelivery(self, HostJournal(Path(journal)))
            except LlmosError as e:
                logging.getLogger("llmos.host").error(
                    "host %s delivers every message through the kernel: %s", self.host_id, e)
        try:
            check_available()
        except LlmosError as e:
            self.sandbox = str(e)
        self.link.start()
        program_runner.Capture.install()
        return {**self.info(), "sandbox": self.sandbox is None}

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
                "rss_bytes": rss, "uptime_s": time.time() - self.started_at,
                "node": ray.get_runtime_context().get_node_id()}

    async def stop(self) -> None:
        sandboxed = []
        for agent in list(self.agents.values()):
            if agent.task:
                agent.task.cancel()
                if isinstance(agent, SandboxedAgent):
                    sandboxed.append(agent.task)
        await asyncio.gather(*sandboxed, *self.link.stop(), return_exceptions=True)
        self.spares.close()

    def logged(self, agent: AgentRuntime) -> None:
        """``agent`` has output to send."""
        self.link.logging.add(agent)
        self.link.wake()

    def _before_flush(self) -> None:
        if self.local is not None:
            self.local.commit()

    # -- syscalls -------------------------------------------------------------
    def encode_message(self, msg: Any) -> dict:
        """A message's type and msgpack payload; with its schema the first time this host
        sends that type, so the kernel can validate types only agent programs define."""
        payload = encode(msg)
        if isinstance(msg, dict):
            self.last_encoded = (payload, UNTYPED)
            return {"type": UNTYPED, "payload": payload}
        name = message_type(msg)
        self.last_encoded = (payload, name)
        if name in self.sent_schemas:
            return {"type": name, "payload": payload}
        self.sent_schemas.add(name)
        schema = self._schemas.get(name)
        if schema is None:
            schema = self._schemas[name] = schema_of(type(msg))
        return {"type": name, "payload": payload, "schema": schema}

    async def syscall(self, agent: AgentRuntime, name: str, args: dict) -> Any:
        if name != "ipc.send":
            return await self._to_kernel(agent, name, args, None)
        if isinstance(args.get("correlation_id"), str):
            agent.answered(args["correlation_id"])
        explicit = "id" in args
        if not explicit:
            args["id"] = new_message_id()
        if args.get("reply_to") != "call" or isinstance(agent, SandboxedAgent):
            return await self._send(agent, args, explicit)  # (a child receives on its own)
        sent_id = f"{agent.pid}:{args['id']}"  # as kernel and journal name it, per sender
        agent.awaiting.add(sent_id)  # before any reply can arrive: no receive takes it
        try:
            return await self._send(agent, args, explicit)
        except BaseException:
            agent.awaiting.discard(sent_id)
            raise

    async def _send(self, agent: AgentRuntime, args: dict, explicit: bool) -> Any:
        gate = None
        if self.local is not None:
            local = self.local.send(agent, args, explicit)
            if isinstance(local, dict):  # held until the handler finishes
                return local
            if local is not None:
                return wire.unwrap(await local)
            gate = self.local.before_kernel_send(agent, args)
        return await self._to_kernel(agent, "ipc.send", args, gate)

    async def _to_kernel(self, agent: AgentRuntime, name: str, args: dict, gate) -> Any:
        try:
            result: wire.Result = await self.link.call(agent.capability, name, args,
                                                       agent.handling)
        except LlmosError as e:  # arguments that cannot cross
            result = wire.failure(e)
        if result.error is not None:
            if gate is not None:
                self.local.send_failed(gate, agent, args["id"])
            if args.get("schema") is not None:  # refused before the kernel learned it, maybe
                self.sent_schemas.discard(args.get("type"))  # (the next send declares it)
        return wire.unwrap(result)

    def queue_ack(self, agent: AgentRuntime, msg_id: str, reply: dict | None = None) -> None:
        """Acknowledge a message without waiting; a failed reply is noted in the agent's log."""
        agent.settled(msg_id, answered=reply is not None)
        if reply is not None:
            reply = {**reply, "id": new_message_id()}
        if self.local is not None and self.local.ack(agent, msg_id, reply):
            return
        if reply is None:
            self.link.cast(agent.capability, "ipc.ack", {"id": msg_id})
            return
        if self.local is not None:
            receiver = self.local.receiver(reply.get("to"))
            if receiver is not None:
                self.local.route_via_kernel(agent.pid, receiver.pid, f"{agent.pid}:{reply['id']}")
        self.link.call(agent.capability, "ipc.ack", {"id": msg_id, "reply": reply}
                       ).add_done_callback(lambda f: log_failure(agent, "reply", f.result()))

    # -- what the kernel sends ----------------------------------------------------
    def _dispatch(self, item: wire.Item) -> None:
        match item:
            case wire.Reply(call=call, result=raw):
                self.link.resolve(call, wire.decode_result(raw))
            case wire.Deliver(pid=pid, envelope=envelope):
                agent = self.agents.get(pid)
                if agent is not None:
                    msg = Message.arrived(envelope)
                    if self.local is not None:
                        self.local.arrived(msg, pid)
                    agent.took(msg)
                    agent.deliver(msg)
            case wire.TokenDelta():
                agent = self.agents.get(item.pid)
                queue = agent.streams.get(item.request_id) if agent else None
                if queue is not None:
                    queue.put_nowait(item)
                elif isinstance(agent, SandboxedAgent):
                    agent.push(item)
            case wire.Spawn():
                self._spawn(item)
            case wire.Kill(pid=pid, grace_s=grace_s):
                agent = self.agents.get(pid)
                if isinstance(agent, SandboxedAgent):
                    asyncio.get_running_loop().create_task(agent.kill(grace_s))
                elif agent is not None:
                    asyncio.get_running_loop().create_task(program_runner.kill(agent, grace_s))
            case wire.ToolCall():
                agent = self.agents.get(item.pid)
                if isinstance(agent, SandboxedAgent):
                    agent.push(item)
                else:
                    asyncio.get_running_loop().create_task(self._run_tool(item))

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

    def _spawn(self, order: wire.Spawn) -> None:
        agent = (SandboxedAgent if order.sandbox else AgentRuntime)(
            self, order.pid, order.capability, order.name, mailbox_quota=order.mailbox)
        self.agents[order.pid] = agent
        if agent.name:
            self.names[agent.name] = agent
        if self.local is not None:
            self.local.spawned(order.pid, order.backlog)
        if order.sandbox:  # started here, on the loop's thread: its child dies with it
            agent.task = asyncio.get_running_loop().create_task(sandboxed_agents.run(
                self, agent, order, self.spares, self._exited))
            return
        ctx = contextvars.copy_context()
        ctx.run(current.set, agent)
        agent.task = asyncio.get_running_loop().create_task(
            program_runner.run(agent, order.program, order.args, self._exited), context=ctx)

    def _exited(self, agent: AgentRuntime, report: wire.ExitReport) -> None:
        # the calls it settled without answering, as this host saw them (never a child's say)
        report.unanswered = [(caller, call) for call, caller in agent.unanswered.items()] \
            or None
        self.agents.pop(agent.pid, None)
        if agent.name and self.names.get(agent.name) is agent:
            del self.names[agent.name]
        if self.local is not None:
            self.local.hand_over(agent)
        self.link.report_exit(report)

    async def _run_tool(self, order: wire.ToolCall) -> None:
        self.tool_result(order.call, await program_runner.run_tool(
            self.agents.get(order.pid), order))

    def tool_result(self, call: str, result: wire.Result) -> None:
        """Answer a ``wire.ToolCall`` this host's agent ran."""
        try:
            self.link.call("", "tools.result", {"call": call, "result": result})
        except LlmosError as e:  # its value cannot cross: the caller hears why, not silence
            failed = wire.Result(error=wire.ErrorInfo("ToolError", f"the tool's result "
                                                      f"cannot be sent: {e}"))
            self.link.call("", "tools.result", {"call": call, "result": failed})


class _HostActor:
    """The Ray actor around an AgentHost. Ray wraps every method of an actor class (for
    tracing), so the host's own methods, called per message, live on a plain object.

    Every method asks for the secret the kernel gave this host: it answers its kernel
    and no one else on the cluster."""

    def __init__(self, kernel: Any, host_id: str, *, token: str):
        gc_pauses.watch()
        self.host = AgentHost(kernel, host_id, token=token)
        self._secret = token

    def _check(self, secret: object) -> None:
        if not isinstance(secret, str) or not hmac.compare_digest(secret, self._secret):
            raise PermissionDenied("an agent host answers only the kernel that started it")

    async def start(self, secret: str, journal: str | None = None,
                    node: str | None = None) -> dict:
        self._check(secret)
        started = await self.host.start(journal, node)
        gc_pauses.settle()  # the runtime, Ray's state: they live as long as the host
        return started

    async def lifetime(self, secret: str) -> None:
        self._check(secret)
        await self.host.lifetime()

    def info(self, secret: str) -> dict:
        self._check(secret)
        return {**self.host.info(), "gc": gc_pauses.snapshot()}

    async def stop(self, secret: str) -> None:
        self._check(secret)
        await self.host.stop()


RemoteAgentHost = ray.remote(_HostActor)
