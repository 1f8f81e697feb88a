"""Which process is calling: a context variable set by the agent host for each agent task.

A program never passes its own pid or capability: every syscall reads them
from here, as an OS reads them from the running thread. Tasks an agent
starts inherit its context, so they act as the same process.
"""

from __future__ import annotations

from typing import Any

from actors.runtime import AgentRuntime, Host, attached, current
from llmos_kernel.errors import PermissionDenied


def runtime() -> AgentRuntime:
    agent = current.get() or (attached[0] if attached else None)
    if agent is None:
        raise PermissionDenied(
            "not inside an llmos process: run this program with `llmos run`, spawn it with "
            "proc.spawn(), or call llmos.attach() first")
    return agent


def host() -> Host:
    return runtime().host


async def call(name: str, /, **args: Any) -> Any:
    """One syscall as the current process; returns its value or raises its typed error."""
    agent = runtime()
    return await agent.host.syscall(agent, name, args)
