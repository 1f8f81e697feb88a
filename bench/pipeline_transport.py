"""How a step should travel through pipeline stages: Ray's object store or a compiled graph.

Two stage actors, each spending ``--work`` seconds of CPU per step (a busy loop, so
only the transport differs), chained as ``llmos_kernel.stages`` chains them: the plan
put once, stage 0's output an ObjectRef argument of stage 1, stage 0's small ack
awaited beside stage 1's output, two steps in flight. Beside it, the same chain as a
Ray compiled graph (``experimental_compile``: shared-memory channels between the
actors, two executions in flight). Both run in this process's own Ray session,
alternating; the best of ``--repeat`` runs of each is compared, with the ideal (one
step per ``--work`` seconds, the stages never idle). After each, the stages sit idle
for ``--idle`` seconds and the CPU their processes use meanwhile is reported (a
compiled graph's actors wait for the next execution on their channels by polling).

    python bench/pipeline_transport.py [--work 0.03] [--steps 100] [--repeat 2]

The stages are not compiled graphs in llmos. The gap in steps/s this prints is what one
would buy; against it: a compiled graph's actors keep cores busy while the kernel has
nothing to run (on a CPU node, the cores the stages and agents compute on), they run
the graph on a thread of their own beside the calls the kernel makes between steps
(warming the KV pool, its info, loading adapters), and a lost stage tears the whole
graph down.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time

import numpy as np
import ray

PLAN = {"seqs": list(range(2000))}  # a few KB pickled, as a steady decode step's plan


@ray.remote(num_cpus=0, max_concurrency=1)
class Stage:
    def __init__(self, work: float, last: bool):
        self.work, self.last = work, last

    def _compute(self) -> np.ndarray:
        started = time.perf_counter()
        while time.perf_counter() - started < self.work:
            pass
        return np.zeros((27, 576), np.float32)  # a decode micro-batch's hidden states

    def execute(self, plan, hidden=None):
        out = self._compute()
        return out if self.last else (out, True)

    def execute_graph(self, plan, hidden=None):
        return self._compute()

    def cpu_seconds(self) -> float:
        """CPU time of this actor's process, every thread (a compiled graph's included)."""
        return time.process_time()


async def _two_in_flight(one, steps: int) -> float:
    pending: set = set()
    started = time.perf_counter()
    for _ in range(steps):
        if len(pending) >= 2:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        pending.add(asyncio.ensure_future(one()))
    await asyncio.gather(*pending)
    return steps / (time.perf_counter() - started)


async def idle_cpu(stages, seconds: float) -> float:
    """CPU seconds per second the stages' processes use together while given nothing."""
    before = await asyncio.gather(*(s.cpu_seconds.remote() for s in stages))
    await asyncio.sleep(seconds)
    after = await asyncio.gather(*(s.cpu_seconds.remote() for s in stages))
    return (sum(after) - sum(before)) / seconds


async def object_store(stages, steps: int) -> float:
    first, last = stages

    async def one():
        shared = ray.put(PLAN)
        hidden, ack = first.execute.options(num_returns=2).remote(shared, None)
        await asyncio.gather(last.execute.remote(shared, hidden), ack)

    for _ in range(3):
        await one()
    return await _two_in_flight(one, steps)


async def compiled_graph(stages, steps: int, idle_s: float) -> tuple[float, float]:
    """Steps/s through the graph, and the stages' idle CPU (``idle_cpu``) while it stands."""
    from ray.dag import InputNode

    first, last = stages
    with InputNode() as plan:
        out = last.execute_graph.bind(plan, first.execute_graph.bind(plan, None))
    graph = out.experimental_compile(enable_asyncio=True, _max_inflight_executions=2)

    async def one():
        await (await graph.execute_async(PLAN))

    try:
        for _ in range(3):
            await one()
        rate = await _two_in_flight(one, steps)
        return rate, await idle_cpu(stages, idle_s)
    finally:
        graph.teardown()


async def main(args) -> dict:
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False)
    logging.getLogger("ray").setLevel(logging.WARNING)
    stages = [Stage.remote(args.work, False), Stage.remote(args.work, True)]
    best = {"object_store": 0.0, "compiled_graph": 0.0}
    idle = {}
    for _ in range(args.repeat):
        best["object_store"] = max(best["object_store"], await object_store(stages, args.steps))
        idle["object_store"] = await idle_cpu(stages, args.idle)
        rate, idle["compiled_graph"] = await compiled_graph(stages, args.steps, args.idle)
        best["compiled_graph"] = max(best["compiled_graph"], rate)
    ray.shutdown()
    return {**best, "ideal": 1 / args.work, "work_s": args.work, "steps": args.steps,
            "idle_cpu_per_s": idle}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=float, default=0.03, help="CPU seconds per stage per step")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--idle", type=float, default=2.0,
                    help="seconds the stages sit idle after each transport's run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = asyncio.run(main(args))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"2 stages x {args.work * 1000:.0f} ms of CPU a step, 2 steps in flight, "
              f"best of {args.repeat}")
        for how in ("object_store", "compiled_graph", "ideal"):
            idle_cpu_s = result["idle_cpu_per_s"].get(how)
            print(f"{how.replace('_', ' '):16} {result[how]:7.1f} steps/s" + (
                "" if idle_cpu_s is None else
                f"; idle, the two stages use {idle_cpu_s:.2f} CPU-s per second"))
        print(f"compiled graph / object store: "
              f"{result['compiled_graph'] / result['object_store']:.2f}x")
