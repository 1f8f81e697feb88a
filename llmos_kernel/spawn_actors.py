"""The one kernel module that creates Ray actors: agent hosts and model shards.

The kernel decides what runs where; the actors in ``actors/`` execute. Keeping their
creation here means the rest of ``llmos_kernel`` never imports ``actors`` (an import
contract checks it), so the actors can import the kernel's declared messages and the
engine without a cycle.
"""

from __future__ import annotations

from typing import Any

from actors.agent_host import RemoteAgentHost
from actors.model_shard import RemoteModelShard


def agent_host(options: dict[str, Any], kernel_name: str, host_id: str, secret: str):
    """A new AgentHost actor serving kernel ``kernel_name`` as ``host_id``."""
    return RemoteAgentHost.options(**options).remote(kernel_name, host_id, token=secret)


def model_shard(options: dict[str, Any], *args: Any):
    """A new ModelShard actor (``args`` as ModelShard takes them)."""
    return RemoteModelShard.options(**options).remote(*args)
