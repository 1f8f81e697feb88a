"""The syscall layer: the only door from an agent program to the world.

    from syscalls import llm, fs, proc, ipc, tools, memory

Every call acts as the calling process (the kernel knows it by the
capability it issued at spawn; a program never names itself) and raises a
typed error from ``llmos_kernel.errors`` when it cannot be served.

A plain script becomes a process with ``await syscalls.attach()``.
"""

from __future__ import annotations

import uuid

from syscalls import fs, ipc, llm, memory, proc, tools

__all__ = ["attach", "fs", "ipc", "llm", "memory", "proc", "tools"]


async def attach(name: str | None = None, *, priority: int = 0, kernel: str = "kernel",
                 address: str | None = None, state_dir: str | None = None) -> int:
    """Make this driver script a process of a running kernel; returns its pid."""
    from actors.agent_host import AgentHost
    from llmos_kernel.client import KernelClient, unwrap

    client = KernelClient.connect(kernel, address=address, state_dir=state_dir)
    host = AgentHost(client.handle, f"driver-{uuid.uuid4().hex[:10]}", token=client.token)
    reply = unwrap(await client.handle.attach.remote(client.token, host.host_id, name, priority))
    await host.start()
    host.attach(reply["pid"], reply["capability"], name)
    return reply["pid"]
