"""The cluster's nodes as the kernel sees them, and the check of where a spawn asks to run.

A process may ask for Ray resources (``num_cpus``, ``num_gpus``, ``memory`` or a custom
resource a node was started with, ``ray start --resources '{"node_b": 1}'``) or for one
node by its Ray node id; either gives it an agent host of its own placed there. A request
no alive node can satisfy is refused when the spawn is made: Ray would otherwise keep the
host pending forever and the process would never start. (Whether the resources are free
*now* is Ray's to wait for; the check is that some node has them at all.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmos_kernel.errors import InvalidArgument

BUILTIN = ("num_cpus", "num_gpus", "memory")
RAY_NAMES = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}


@dataclass(frozen=True)
class Node:
    node_id: str
    address: str
    resources: dict[str, float] = field(default_factory=dict)  # Ray's names: CPU, GPU, ...


def cluster_nodes() -> list[Node]:
    """The alive nodes of the Ray cluster this process is connected to."""
    import ray

    return [Node(n["NodeID"], n.get("NodeManagerAddress", "?"), dict(n.get("Resources", {})))
            for n in ray.nodes() if n.get("Alive")]


def check_placement(resources: Any, node: Any, nodes: list[Node]) -> tuple[bool, str | None]:
    """Raise InvalidArgument for a malformed or unsatisfiable request; return whether the
    process asked for a place of its own (resources or a node), and the node's full id."""
    if not isinstance(resources, dict):
        raise InvalidArgument("resources must be a dict such as {'num_gpus': 1} or "
                              "{'node_b': 0.01} (a custom resource of a node)")
    for key, amount in resources.items():
        if not isinstance(key, str) or not key:
            raise InvalidArgument("resources keys must be resource names")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise InvalidArgument(f"resources[{key!r}] must be a number >= 0, got {amount!r}")
    if node is not None:
        if not isinstance(node, str):
            raise InvalidArgument("node must be a Ray node id (llmos kernel status lists them)")
        matches = [n for n in nodes if n.node_id == node or
                   (len(node) >= 6 and n.node_id.startswith(node))]
        if len(matches) != 1:
            known = ", ".join(f"{n.node_id[:12]} ({n.address})" for n in nodes) or "none"
            what = "no alive node" if not matches else "more than one node"
            raise InvalidArgument(f"{what} has the id {node!r}; nodes: {known}")
        nodes, node = matches, matches[0].node_id
    wanted = {RAY_NAMES.get(k, k): float(v) for k, v in resources.items() if v}
    if wanted and not any(all(n.resources.get(k, 0.0) >= v for k, v in wanted.items())
                          for n in nodes):
        have = "; ".join(f"{n.node_id[:12]}: " + ", ".join(
            f"{k} {v:g}" for k, v in sorted(n.resources.items())
            if not k.startswith("node:") and k != "object_store_memory") for n in nodes)
        raise InvalidArgument(f"no{' such' if node is not None else ''} node has "
                              f"{', '.join(f'{k} {v:g}' for k, v in wanted.items())}; "
                              f"nodes have: {have or 'nothing'}")
    return bool(resources) or node is not None, node
