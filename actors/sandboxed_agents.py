"""Sandboxed agents in a host: the record the host keeps, the relay, spare children.

A process spawned with ``sandbox=True`` runs in a child process (``actors.sandbox``). Its
host keeps a ``SandboxedAgent`` in its place: the same ``AgentRuntime`` record that local
delivery and the kernel link work with (capability, name, mailbox quota, the message
being handled), whose ``deliver`` hands the message to the child instead of a mailbox
here. ``Relay`` is the host as the child reaches it: each syscall goes through
``AgentHost.syscall`` as that record, with the capability only the host holds.
``Spares`` is where the children come from: forks of the host's zygote.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from actors.runtime import AgentRuntime, Message
from actors.sandbox import Sandbox, Spare, launch
from actors.sandbox_policy import Limits
from actors.sandbox_zygote import Zygote
from llmos_kernel import wire
from llmos_kernel.errors import LlmosError

if TYPE_CHECKING:
    from actors.agent_host import AgentHost

log = logging.getLogger("llmos.sandbox")

SPARES = 2  # children a host keeps started ahead when it has no zygote to fork them
MAX_ZYGOTE_FAILURES = 3  # zygotes lost or refused before a host launches every child
ZYGOTE_START_S = 30.0  # how long a spawn waits for a starting zygote before launching


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
    """Where a host's sandboxed children come from. Forked from the host's zygote
    (``actors.sandbox_zygote``: an interpreter with the runtime imported, forking in
    milliseconds), started at the host's first sandboxed spawn; until it is ready, or
    where it cannot run, a fresh interpreter each (``launch``, about a quarter of a
    second; ``Sandbox.start`` launches one when ``take`` gives none). Started from the
    host's event-loop thread: a child dies with the thread that forked it."""

    def __init__(self, count: int = SPARES):
        self.count = count  # launched children kept ready while no zygote can fork
        self.ready: list[Spare] = []
        self.zygote: Zygote | None = None
        self.zygote_failures = 0

    async def take(self) -> Spare | None:
        """A child for the next sandboxed process: a fork of the zygote (started now if
        there is none, and waited for: it is ready before a launched child would be), else
        a launched spare, else None (``Sandbox.start`` launches one)."""
        zygote = self.zygote
        if zygote is not None and not zygote.alive:
            zygote.close()
            zygote = self.zygote = None
            self.zygote_failures += 1
        if zygote is None and self.zygote_failures < MAX_ZYGOTE_FAILURES:
            try:
                zygote = self.zygote = Zygote()
            except OSError as e:
                self.zygote_failures += 1
                log.warning("cannot start a sandbox zygote: %s", e)
        if zygote is not None:
            try:
                if not await zygote.started(ZYGOTE_START_S):
                    raise OSError(f"it was not ready within {ZYGOTE_START_S:.0f} s")
                return zygote.fork()
            except OSError as e:
                log.warning("sandbox zygote failed (%s); launching a child instead", e)
                zygote.close()
                if self.zygote is zygote:
                    self.zygote = None
                    self.zygote_failures += 1
        spare = None
        while self.ready and spare is None:
            candidate = self.ready.pop(0)
            if candidate.process.poll() is None:
                spare = candidate
            else:
                candidate.close()
        if self.zygote is None:  # none to fork from: keep launched children ready
            while len(self.ready) < self.count:
                self.ready.append(launch())
        return spare

    def close(self) -> None:
        for spare in self.ready:
            spare.close()
        self.ready.clear()
        if self.zygote is not None:
            self.zygote.close()
            self.zygote = None


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
        await box.start(await spares.take())
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
