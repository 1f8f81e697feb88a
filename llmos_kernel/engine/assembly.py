"""One way to put an engine together, for the kernel's LLM service and in-process use alike.

The configuration nests as the parts do: ``KernelConfig`` (the kernel) holds an
``LLMConfig`` (which model, precision, device, memory budgets, which CPU kernels),
which holds an ``EngineConfig`` (KV blocks, prefix caching), which holds a
``SchedulerConfig`` (batch size, running sequences, preemption). Each default is
declared once, on the level that owns it; ``LLMConfig.of`` routes flat keyword options
(as a command line has them) to their level. ``assemble`` reads the model's metadata,
resolves the precision, plans memory and builds the engine; where the weights run (in
this process, or in a ModelShard actor) is the caller's choice of runner.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmos_kernel import store
from llmos_kernel.core.gguf_file import GGUFFile, ModelConfig
from llmos_kernel.core.options import KernelOptions
from llmos_kernel.core.tokenizer import Tokenizer
from llmos_kernel.core.weights import parse_dtype, resolve_dtype
from llmos_kernel.engine.engine import EngineConfig, LLMEngine, Runner
from llmos_kernel.engine.scheduler import SchedulerConfig
from llmos_kernel.memory import Device, MemoryPlan, plan_memory


@dataclass
class LLMConfig:
    model: str = store.DEFAULT_MODEL  # a model store name or a .gguf path
    dtype: str = "auto"  # auto | fp32 | bf16 (resolved by weights.resolve_dtype)
    device: str = "cpu"
    kv_budget: str | int = "auto"  # bytes for the KV pool, e.g. "2GiB"
    swap_budget: str | int = "auto"  # host bytes for preempted and parked KV
    shard_threads: int | None = None  # None: every core the shard may use
    shards: int | str = 1  # pipeline stages, each a ModelShard with a layer range
    # (llmos_kernel.stages); "auto": the fewest that fit the cluster's memory
    stage_budget: str | int = "auto"  # bytes each stage may hold; auto: its node's memory
    kernels: KernelOptions = field(default_factory=KernelOptions)
    engine: EngineConfig = field(default_factory=EngineConfig)

    @classmethod
    def of(cls, **options: Any) -> LLMConfig:
        """Flat options, each given to the level that declares it (unknown: TypeError)."""
        levels = {cls: {}, EngineConfig: {}, SchedulerConfig: {}}
        for key, value in options.items():
            owner = next((c for c in levels if key in _field_names(c)), None)
            if owner is None or key in ("engine", "scheduler"):
                raise TypeError(f"unknown option {key!r}; known: "
                                f"{', '.join(sorted(_flat_names()))}")
            levels[owner][key] = value
        engine = EngineConfig(**levels[EngineConfig],
                              scheduler=SchedulerConfig(**levels[SchedulerConfig]))
        return cls(**levels[cls], engine=engine)


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _flat_names() -> set[str]:
    return (_field_names(LLMConfig) | _field_names(EngineConfig)
            | _field_names(SchedulerConfig)) - {"engine", "scheduler"}


@dataclass
class Assembly:
    """An engine and what it was built from."""

    engine: LLMEngine
    model_path: Path
    model_config: ModelConfig
    tokenizer: Tokenizer
    dtype: str  # resolved: fp32 or bf16
    plan: MemoryPlan


MakeRunner = Callable[[Path, str, MemoryPlan], Runner]
"""Given the model file, the resolved dtype and the memory plan: the runner to use."""


def assemble(cfg: LLMConfig, make_runner: MakeRunner | None = None,
             device_facts: dict | None = None) -> Assembly:
    """Plan memory and build the engine; ``make_runner`` None leaves the runner to be set
    (the kernel's steps run in a ModelShard actor, not through ``engine.runner``).
    ``device_facts`` (``{"devices": [Device fields], "bf16": bool}``): the device as a
    process that holds it sees it, for a CUDA device this process cannot see."""
    path = store.resolve_model(cfg.model)
    gguf = GGUFFile.open(path)
    model_config = gguf.config()
    gguf.check_tensor_types()
    tokenizer = Tokenizer.from_gguf(gguf.metadata)
    found = None if device_facts is None else [Device(**d) for d in device_facts["devices"]]
    dtype = resolve_dtype(cfg.dtype, cfg.device, cfg.kernels,
                          None if device_facts is None else device_facts["bf16"])
    plan = plan_memory(model_config, parse_dtype(dtype), cfg.device, cfg.kv_budget,
                       cfg.engine.block_size, cfg.swap_budget, found)
    engine_cfg = dataclasses.replace(
        cfg.engine, num_blocks=plan.num_blocks,
        scheduler=dataclasses.replace(cfg.engine.scheduler, swap_blocks=plan.swap_blocks))
    runner = make_runner(path, dtype, plan) if make_runner is not None else None
    engine = LLMEngine(tokenizer, runner, model_config.context_length, engine_cfg)
    return Assembly(engine, path, model_config, tokenizer, dtype, plan)
