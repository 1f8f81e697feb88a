"""Agents' time to first token with and without a LoRA training job in the same kernel.

Starts a kernel in a local Ray session, measures the TTFT of ``--requests`` chat requests
from ``--agents`` concurrent clients, then starts ``llmos train lora --kernel``'s program
(a low-priority kernel process whose trainer runs niced in its own OS process), waits for
it to be training, and measures again; the job is killed at the end.

    python bench/train_ttft.py [--requests 16] [--agents 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

import ray

from llmos_kernel.cli.train import LOW_PRIORITY
from llmos_kernel.client import KernelClient
from llmos_kernel.engine.assembly import LLMConfig
from llmos_kernel.kernel import KernelConfig
from llmos_kernel.launcher import start_kernel
from llmos_kernel.train.facts import DATASETS
from syscalls.proc import program_spec

QUESTION = [{"role": "user", "content": "Say hello to the team in one short sentence."}]


async def ttfts(n: int, agents: int) -> list[float]:
    from syscalls import llm

    out: list[float] = []

    async def agent(k: int) -> None:
        for _ in range(k):
            reply = await llm.chat(QUESTION, max_tokens=8, temperature=0)
            out.append(reply.usage["ttft_s"])

    await asyncio.gather(*(agent(n // agents) for _ in range(agents)))
    return out


def summary(values: list[float]) -> str:
    values = sorted(values)
    return (f"p50 {statistics.median(values) * 1000:.0f} ms, "
            f"p90 {values[int(0.9 * (len(values) - 1))] * 1000:.0f} ms, n={len(values)}")


async def main(args: argparse.Namespace, state: str, name: str) -> None:
    import syscalls

    await syscalls.attach("ttft-bench", kernel=name, state_dir=state)
    client = KernelClient.connect(name, state_dir=state)
    await ttfts(args.agents, args.agents)  # warm-up
    idle = await ttfts(args.requests, args.agents)
    print(f"TTFT without training: {summary(idle)}", flush=True)
    with tempfile.TemporaryDirectory() as out:
        argv = ["--data", str(DATASETS / "capitals_train.jsonl"), "--out", out,
                "--epochs", "5"]
        pid = await client.call("spawn", {"program": program_spec("llmos_kernel.train.job:main"),
                                          "args": {"argv": argv}, "name": "train-bench",
                                          "priority": LOW_PRIORITY})
        await asyncio.sleep(args.settle)  # the trainer loads and starts its steps
        busy = await ttfts(args.requests, args.agents)
        print(f"TTFT while training:   {summary(busy)}", flush=True)
        log = await client.call("logs", pid, 0)
        lines = [ln for ln in str(log.get("text", "")).splitlines() if ln.startswith("step")]
        print(f"the job (pid {pid}) meanwhile: {lines[0] if lines else 'no step yet'} ... "
              f"{lines[-1] if lines else ''}", flush=True)
        await client.call("kill", pid, "kill")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--settle", type=float, default=25.0,
                        help="Seconds between starting the job and measuring.")
    args = parser.parse_args()
    ray.init(address="local", namespace="llmos", include_dashboard=False,
             logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("PYTHONPATH",)
                                       if k in os.environ}})
    with tempfile.TemporaryDirectory() as state:
        handle = start_kernel(KernelConfig(state_dir=state, name="ttft-bench", hosts=1,
                                           llm=LLMConfig(kv_budget="256MiB")), detached=False)
        started = time.perf_counter()
        asyncio.run(main(args, state, "ttft-bench"))
        print(f"({time.perf_counter() - started:.0f} s)")
        ray.kill(handle)
    ray.shutdown()
