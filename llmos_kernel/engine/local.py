"""Build a complete in-process engine from a model name or path."""

from __future__ import annotations

import torch

from llmos_kernel import store
from llmos_kernel.core.kv_cache import KVPool
from llmos_kernel.core.tokenizer import Tokenizer
from llmos_kernel.core.weights import load_model, parse_dtype, resolve_dtype
from llmos_kernel.engine.engine import EngineConfig, LLMEngine
from llmos_kernel.engine.runner import ModelRunner
from llmos_kernel.memory import MemoryPlan, plan_memory


def set_threads(n: int | None = None) -> None:
    """Use every core for intra-op parallelism (torch's default can be lower in actors)."""
    import os

    torch.set_num_threads(n or len(os.sched_getaffinity(0)))


def load_engine(model: str = store.DEFAULT_MODEL, *, dtype: str = "auto", device: str = "cpu",
                kv_budget: str | int = "auto", swap_budget: str | int = "auto",
                block_size: int = 16, **engine_options) -> LLMEngine:
    """Load weights and tokenizer, size the KV pool, and return a ready engine."""
    runner, tokenizer, plan = load_runner(model, dtype=dtype, device=device, kv_budget=kv_budget,
                                          swap_budget=swap_budget, block_size=block_size)
    cfg = EngineConfig(block_size=block_size, num_blocks=plan.num_blocks,
                       swap_blocks=plan.swap_blocks, **engine_options)
    engine = LLMEngine(tokenizer, runner, runner.model.config.context_length, cfg)
    engine.memory_plan = plan
    engine.load_seconds = runner.model.load_seconds
    return engine


def load_runner(model: str, *, dtype: str = "auto", device: str = "cpu",
                kv_budget: str | int = "auto", swap_budget: str | int = "auto",
                block_size: int = 16) -> tuple[ModelRunner, Tokenizer, MemoryPlan]:
    path = store.resolve_model(model)
    dtype = resolve_dtype(dtype, device)
    transformer, gguf = load_model(path, dtype=dtype, device=device)
    tokenizer = Tokenizer.from_gguf(gguf.metadata)
    plan = plan_memory(transformer.config, parse_dtype(dtype), device, kv_budget, block_size,
                       swap_budget)
    kv = KVPool(transformer.config, plan.num_blocks, block_size, transformer.kv_dtype, device)
    return ModelRunner(transformer, kv), tokenizer, plan
