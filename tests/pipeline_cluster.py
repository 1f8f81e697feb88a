"""Run as a script by tests/test_pipeline_cluster.py: kernels on a 2-node Ray cluster.

The test suite shares one Ray session per process, so this cluster
(``ray.cluster_utils.Cluster``: two raylets on this machine, each with its own
resource, ``node_a`` and ``node_b``) lives in a process of its own. It starts a
single-shard kernel, then 2- and 3-stage kernels, gives each the same mixed
concurrent batch (short and long prompts, greedy, with logprobs), and then asks
for a split whose stages cannot fit their budget. Then two 2-stage kernels lose a stage
mid-load: one has a stage's actor killed, the other the node holding a stage removed.
It prints one JSON object:
each kernel's tokens, logprobs, stages and steps in flight, and what the refused start
left behind.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from llmos_kernel.bench.prompts import chat_prompts
from llmos_kernel.client import KernelClient
from llmos_kernel.engine.assembly import LLMConfig
from llmos_kernel.errors import LlmosError
from llmos_kernel.kernel import KernelConfig
from llmos_kernel.launcher import start_kernel

MESSAGES = chat_prompts(6, min_words=4, max_words=300, seed=5)


def kernel_config(model: str, name: str, **llm) -> KernelConfig:
    return KernelConfig(state_dir=tempfile.mkdtemp(prefix=f"{name}-"), name=name, hosts=1,
                        llm=LLMConfig.of(model=model, dtype="fp32", kv_budget="192MiB",
                                         swap_budget="64MiB", max_batch_tokens=256, **llm))


def with_kernel(cfg: KernelConfig, body) -> dict:
    """Start the kernel, run ``await body(client)``, and take the kernel down again."""
    handle = start_kernel(cfg, detached=False)
    client = KernelClient(handle, (Path(cfg.state_dir) / "root.token").read_text())

    async def run() -> dict:
        try:
            return await body(client)
        finally:
            await client.close()

    try:
        return asyncio.run(run())
    finally:
        ray.get(handle.shutdown.remote(client.token))
        ray.kill(handle)


def serve(model: str, shards: int | str, **llm) -> dict:
    async def run(client: KernelClient) -> dict:
        done = await asyncio.gather(*(client.generate(
            messages=m, max_tokens=12, temperature=0, ignore_eos=True, logprobs=True)
            for m in MESSAGES))
        actors = await client.call("actors")
        in_flight = (await client.status())["steps_in_flight"]
        return {"tokens": [c.token_ids for c in done], "logprobs": [c.logprobs for c in done],
                "stages": actors["stages"], "steps_in_flight": in_flight}

    return with_kernel(kernel_config(model, f"pipe-{shards}", shards=shards, **llm), run)


def auto_budget(model: str) -> str:
    """A stage budget the whole model (weights + KV, as kernel_config sizes it) exceeds
    but each half of a 2-stage split fits: ``--placement auto`` must choose 2 stages."""
    import torch

    from llmos_kernel.core.gguf_file import GGUFFile
    from llmos_kernel.memory import plan_memory
    from llmos_kernel.placement import split_layers

    cfg = GGUFFile.open(model).config()
    plan = plan_memory(cfg, torch.float32, "cpu", "192MiB", 16, "64MiB")
    whole = split_layers(cfg, torch.float32, 1, plan.num_blocks, 16)[0].bytes
    half = max(s.bytes for s in split_layers(cfg, torch.float32, 2, plan.num_blocks, 16))
    return str((whole + half) // 2)


def faulted(model: str, how: str, cluster: Cluster, worker) -> dict:
    """A 2-stage kernel given the same batch, one of its stages lost mid-load: its actor
    killed (``how="kill"``), or the node holding it removed from the cluster (``"node"``;
    the stage not on the kernel's node)."""
    async def run(client: KernelClient) -> dict:
        stages = (await client.call("actors"))["stages"]
        kernel_node = (await client.status())["placement"]["kernel_node"]
        tasks = [asyncio.ensure_future(client.generate(
            messages=m, max_tokens=12, temperature=0, ignore_eos=True, logprobs=True))
            for m in MESSAGES]
        await asyncio.sleep(1.0)  # under way: prompts prefilled, some tokens out
        mid_load = not all(t.done() for t in tasks)
        if how == "kill":  # the first: the next stage waits on its output, lost with it
            lost = stages[0]
            ray.kill(ray.get_actor(f"pipe-{how}-shard-{lost['index']}", namespace="llmos"),
                     no_restart=True)
        else:
            [lost] = [s for s in stages if s["node"] == worker.node_id]
            assert lost["node"] != kernel_node
            cluster.remove_node(worker)
        done = await asyncio.gather(*tasks)
        status = await client.status()
        after = (await client.call("actors"))["stages"]
        return {"tokens": [c.token_ids for c in done], "mid_load": mid_load,
                "lost_stage": lost["index"], "lost_node": lost["node"],
                "restarts": status["shard"]["restarts"], "stages_before": stages,
                "stages_after": after, "replaced": status["shard"]["stages_replaced"]}

    return with_kernel(kernel_config(model, f"pipe-{how}", shards=2), run)


def _alive(name: str) -> bool:
    try:
        ray.get_actor(name, namespace="llmos")
    except ValueError:  # no live actor of that name
        return False
    return True


def refused(model: str) -> dict:
    try:
        start_kernel(kernel_config(model, "pipe-refused", shards=2, stage_budget="64MiB"),
                     detached=False)
    except LlmosError as e:
        error = {"type": type(e).__name__, "message": str(e)}
    else:
        error = None
    from ray.util import placement_group_table

    alive = [name for name in ("pipe-refused", "pipe-refused-shard-0", "pipe-refused-shard-1")
             if _alive(name)]
    groups = [g["name"] for g in placement_group_table().values()
              if g["state"] != "REMOVED" and g["name"].startswith("pipe-refused")]
    return {"error": error, "alive_actors": alive, "placement_groups": groups}


def main(model: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"node_a": 1}, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2, resources={"node_b": 1})
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, namespace="llmos", logging_level="ERROR",
                 log_to_driver=False)
        nodes = {n["NodeID"]: sorted(k for k in n["Resources"] if k.startswith("node_"))
                 for n in ray.nodes() if n["Alive"]}
        result = {"nodes": nodes, "refused": refused(model)}
        for shards in (1, 2, 3):
            result[str(shards)] = serve(model, shards)
        result["auto"] = serve(model, "auto", stage_budget=auto_budget(model))
        result["killed"] = faulted(model, "kill", cluster, worker)
        result["node_removed"] = faulted(model, "node", cluster, worker)  # last: it shrinks it
        print("RESULT " + json.dumps(result))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
