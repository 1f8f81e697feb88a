"""Where a 2-stage pipeline should cut the model: each stage's step time, split two ways.

Loads the default model whole and as pipeline stages in this process (no Ray), and
times a steady decode step (``--seqs`` sequences, ``--context`` tokens each) through
each stage in turn, one after another, as a pipeline's stages run it. Two splits are
timed beside each other: by weight bytes (the embedding weighs on the first stage) and
by per-token work (``placement.split_layers``' default, where the head's GEMM counts
``HEAD_WORK`` of its parameters and the embedding nothing). A pipeline's steady pace
is its slowest stage; the split whose slowest stage is faster is the better one, and
the two stages' times should be close for the work model to be right on this machine.

    python bench/stage_split.py [--shards 2] [--seqs 27] [--context 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from llmos_kernel import store
from llmos_kernel.core.kv_cache import KVPool
from llmos_kernel.core.options import KernelOptions
from llmos_kernel.core.sampling import SamplingParams
from llmos_kernel.core.weights import load_model, parse_dtype
from llmos_kernel.engine.runner import ModelRunner, SeqStep, StepPlan
from llmos_kernel.placement import HEAD_WORK, split_layers

BLOCK = 16


def runners(path, dtype: str, layers: list[tuple[int, int]], num_blocks: int):
    out = []
    for rng in layers:
        model, _ = load_model(path, dtype=dtype, options=KernelOptions.from_env(), layers=rng)
        out.append(ModelRunner(model, KVPool(model.config, num_blocks, BLOCK, model.kv_dtype,
                                             layers=model.layers)))
    return out


def decode_plan(seqs: int, context: int, step: int) -> StepPlan:
    per = -(-(context + 64) // BLOCK)  # blocks each sequence may use
    n = -(-(context + step + 1) // BLOCK)
    return StepPlan(seqs=[SeqStep(i, [100 + i], context + step, list(range(i * per, i * per + n)),
                                  sample=True, params=SamplingParams(temperature=0.0))
                          for i in range(seqs)])


def time_stages(stages: list[ModelRunner], seqs: int, context: int, steps: int) -> list[float]:
    """Each stage's median step seconds over ``steps`` decode steps (after 3 warm-ups)."""
    times: list[list[float]] = [[] for _ in stages]
    for step in range(steps + 3):
        plan, hidden = decode_plan(seqs, context, step), None
        for i, stage in enumerate(stages):
            started = time.perf_counter()
            hidden = stage.execute(plan, hidden)
            if step >= 3:
                times[i].append(time.perf_counter() - started)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--seqs", type=int, default=27,
                    help="sequences per micro-batch (half of a 54-sequence load)")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per stage (stages sharing a 2-core node get 1)")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = store.resolve_model(store.DEFAULT_MODEL)
    dtype = parse_dtype(args.dtype)
    from llmos_kernel.core.gguf_file import GGUFFile

    cfg = GGUFFile.open(path).config()
    num_blocks = args.seqs * -(-(args.context + 64) // BLOCK)
    result = {"seqs": args.seqs, "context": args.context, "threads": args.threads,
              "head_work": HEAD_WORK, "splits": {}}
    for by in ("bytes", "compute"):
        plans = split_layers(cfg, dtype, args.shards, num_blocks, BLOCK, by)
        layers = [p.layers for p in plans]
        seconds = time_stages(runners(path, args.dtype, layers, num_blocks), args.seqs,
                              args.context, args.steps)
        result["splits"][by] = {"layers": [list(rng) for rng in layers], "stage_s": seconds,
                                "pace_tok_s": args.seqs / max(seconds)}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.shards} stages, {args.seqs} sequences x {args.context}-token contexts, "
          f"{args.threads} thread(s) per stage, {args.dtype}; head work {HEAD_WORK}")
    print(f"{'split by':10} {'layers':28} {'stage step p50 s':28} {'pace tok/s':>10}")
    for by, r in result["splits"].items():
        ranges = " ".join(f"{a}-{b - 1}" for a, b in r["layers"])
        times = " ".join(f"{s:.4f}" for s in r["stage_s"])
        print(f"{by:10} {ranges:28} {times:28} {r['pace_tok_s']:10.1f}")
    ratio = result["splits"]["compute"]["pace_tok_s"] / result["splits"]["bytes"]["pace_tok_s"]
    print(f"by work / by bytes: {ratio:.2f}x (the pipeline's pace is its slowest stage's)")


if __name__ == "__main__":
    main()
