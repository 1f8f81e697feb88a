"""Sandboxed agents in a host: the record the host keeps, the relay, spare children.

A process spawned with ``sandbox=True`` runs in a child process (``actors.sandbox``). Its
host keeps a ``SandboxedAgent`` in its place: the same ``AgentRuntime`` record that local
delivery and the kernel link work with (capability, name, mailbox quota, the message
being handled), whose ``deliver`` hands the message to the child instead of a mailbox
here. ``Relay`` is the host as the child reaches it: each syscall goes through
``AgentHost.syscall`` as that record, with the capability only the host holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from actors.runtime import AgentRuntime, Message
from actors.sandbox import Sandbox, Spare, launch
from actors.sandbox_policy import Limits
from llmos_kernel import wire
from llmos_kernel.errors import LlmosError

if TYPE_CHECKING:
    from actors.agent_host import AgentHost

SPARES = 2  # children a host keeps started ahead, once it has run a sandboxed process


@dataclass(eq=False)
class SandboxedAgent(AgentRuntime):
    """A sandboxed process as its host sees it: what the kernel sends it goes to its child."""

    box: Sandbox | None = None
    started: bool = False
    waiting: list[Any] = field(default_factory=list)  # sent before its child was ready
    grace_s: float = 5.0

    def deliver(self, msg: Message) -> None:
        """Hand a message to the child, whose own runtime keeps the mailbox (and drops
        redeliveries)."""
        self.push(wire.Deliver(self.pid, [
            msg.id, msg.sender, self.pid, msg.type, msg.body, msg.correlation_id,
            "call" if msg.expects_reply else None, None, msg.timestamp, msg.topic]))

    def push(self, item: wire.Deliver | wire.TokenDelta | wire.ToolCall) -> None:
        if self.started:
            self.box.push(item)
        else:
            self.waiting.append(item)

    async def kill(self, grace_s: float) -> None:
        self.killing, self.grace_s = True, grace_s
        if self.started:
            await self.box.kill(grace_s)


class Relay:
    """The ``SandboxHost`` of one sandboxed process: its host, acting as it."""

    def __init__(self, host: AgentHost, agent: SandboxedAgent):
        self.host, self.agent = host, agent

    async def call(self, name: str, args: dict, handling: str | None) -> wire.Result:
        self.agent.handling = handling  # what local delivery reads for this send
        return wire.ok(await self.host.syscall(self.agent, name, args))

    def ack(self, msg_id: str, reply: dict | None) -> None:
        self.host.queue_ack(self.agent, msg_id, reply)

    def output(self, text: str) -> None:
        self.agent.log(text)

    def tool_result(self, call: str, result: wire.Result) -> None:
        self.host.tool_result(call, result)


class Spares:
    """Children started ahead of need (interpreter up, runtime imported): a sandboxed spawn
    takes one instead of waiting a quarter of a second for a fresh one. Started from the
    host's event-loop thread: a child dies with the thread that forked it."""

    def __init__(self, count: int = SPARES):
        self.count = count
        self.ready: list[Spare] = []

    def take(self) -> Spare | None:
        spare = None
        while self.ready and spare is None:
            candidate = self.ready.pop(0)
            if candidate.process.poll() is None:
                spare = candidate
            else:
                candidate.close()
        while len(self.ready) < self.count:
            self.ready.append(launch())
        return spare

    def close(self) -> None:
        for spare in self.ready:
            spare.close()
        self.ready.clear()


async def run(host: AgentHost, agent: SandboxedAgent, order: wire.Spawn, spares: Spares,
              exited: Callable[[AgentRuntime, wire.ExitReport], None]) -> None:
    """Run ``order``'s program in a sandbox to its end; then tell ``exited`` how it ended
    (a child that could not start or be confined is an error exit, so supervision
    applies)."""
    try:
        box = agent.box = Sandbox(
            Relay(host, agent), order.pid, order.program, order.args, name=order.name,
            mailbox=order.mailbox, limits=Limits.from_quotas(order.limits),
            scratch=order.scratch, host_id=host.host_id,
            expect=lambda soon: host.link.expect(agent, soon))
        await box.start(spares.take())
    except LlmosError as e:
        report = wire.ExitReport(order.pid, "error", error={
            "type": type(e).__name__, "message": str(e), "traceback": ""})
    except asyncio.CancelledError:
        if agent.box is not None:
            await agent.box.close()
        raise
    else:
        agent.started = True
        for item in agent.waiting:
            box.push(item)
        agent.waiting.clear()
        try:
            if agent.killing:
                await box.kill(agent.grace_s)
            report = await box.wait()
        except asyncio.CancelledError:
            await box.close()
            raise
    agent.handling = report.handling
    exited(agent, report)
