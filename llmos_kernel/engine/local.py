"""An engine in this process: the weights, the KV pool and the steps all run here.

For ``llmos generate``, the benchmarks and tests. The kernel's LLM service builds its
engine through the same ``assemble``; only its runner lives in a ModelShard actor.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llmos_kernel import store
from llmos_kernel.core.kv_cache import KVPool
from llmos_kernel.core.options import KernelOptions
from llmos_kernel.core.weights import load_model
from llmos_kernel.engine.assembly import LLMConfig, assemble
from llmos_kernel.engine.engine import LLMEngine
from llmos_kernel.engine.runner import ModelRunner
from llmos_kernel.memory import MemoryPlan


def set_threads(n: int | None = None) -> None:
    """Use every core for intra-op parallelism (torch's default can be lower in actors)."""
    torch.set_num_threads(n or len(os.sched_getaffinity(0)))


def load_engine(model: str = store.DEFAULT_MODEL, **options) -> LLMEngine:
    """Load weights and tokenizer, size the KV pool, and return a ready engine. ``options``
    are LLMConfig's, EngineConfig's and SchedulerConfig's fields, by name (``dtype``,
    ``kv_budget``, ``max_seqs``...); the kernel switches default to the environment's."""
    options.setdefault("kernels", KernelOptions.from_env())
    cfg = LLMConfig.of(model=model, **options)

    def make_runner(path: Path, dtype: str, plan: MemoryPlan) -> ModelRunner:
        transformer, _ = load_model(path, dtype=dtype, device=cfg.device, options=cfg.kernels)
        kv = KVPool(transformer.config, plan.num_blocks, plan.block_size, transformer.kv_dtype,
                    cfg.device, hugepages=cfg.kernels.kv_hugepages)
        return ModelRunner(transformer, kv)

    built = assemble(cfg, make_runner)
    engine = built.engine
    engine.memory_plan = built.plan
    engine.load_seconds = engine.runner.model.load_seconds
    return engine
