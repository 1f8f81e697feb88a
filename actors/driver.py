"""A driver script as a process: an in-process agent host that acts as one attached pid.

``syscalls.attach()`` and tests that drive a kernel by hand use this; the host is the
same AgentHost the kernel's actors run, only living in the script's own event loop.
"""

from __future__ import annotations

import uuid
from typing import Any

from actors.agent_host import AgentHost
from actors.runtime import AgentRuntime
from llmos_kernel import wire


async def attach(handle: Any, token: str, name: str | None = None, *, priority: int = 0,
                 quotas: dict | None = None, default: bool = True,
                 host: AgentHost | None = None) -> AgentRuntime:
    """Make this script process ``name`` of the kernel ``handle`` (root ``token``), with
    ``priority`` and ``quotas`` as a spawned process has them. ``host``: the in-process
    host of an earlier attach, to carry this process too (one host, one batch, for many)."""
    if host is None:
        host = AgentHost(handle, f"driver-{uuid.uuid4().hex[:10]}", token=token)
        await host.start()
    reply = wire.unwrap(await handle.attach.remote(token, host.host_id, name, priority, quotas))
    return host.attach(reply["pid"], reply["capability"], name, default=default)
