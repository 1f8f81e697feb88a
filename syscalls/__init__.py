"""The syscall layer: the only door from an agent program to the world.

    from syscalls import llm, fs, proc, ipc, tools, memory, net

Every call acts as the calling process (the kernel knows it by the
capability it issued at spawn; a program never names itself) and raises a
typed error from ``llmos_kernel.errors`` when it cannot be served.

A plain script becomes a process with ``await syscalls.attach()``.
"""

from __future__ import annotations

from syscalls import fs, ipc, llm, memory, net, proc, tools

__all__ = ["attach", "fs", "ipc", "llm", "memory", "net", "proc", "tools"]


async def attach(name: str | None = None, *, priority: int = 0, kernel: str = "kernel",
                 address: str | None = None, state_dir: str | None = None) -> int:
    """Make this driver script a process of a running kernel; returns its pid."""
    from actors.driver import attach as attach_driver
    from llmos_kernel.client import KernelClient

    client = KernelClient.connect(kernel, address=address, state_dir=state_dir)
    runtime = await attach_driver(client.handle, client.token, name, priority=priority)
    return runtime.pid
