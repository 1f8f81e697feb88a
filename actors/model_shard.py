"""ModelShard: a Ray actor holding Transformer weights and their KV pool.

It executes what the kernel decides, one step plan per call, and keeps no
request state of its own (only swapped-out KV), so the kernel can restart it
and recompute. One shard holding every layer is the default; ``layers``
names the slice a shard would hold when a model is split across devices.
"""

from __future__ import annotations

import os

import ray

from llmos_kernel.core import bf16_gemm
from llmos_kernel.core.kv_cache import KVPool
from llmos_kernel.core.options import KernelOptions
from llmos_kernel.core.weights import load_model
from llmos_kernel.engine.runner import ModelRunner, StepOutput, StepPlan
from llmos_kernel.errors import InvalidArgument
from llmos_kernel.memory import devices


class ModelShard:
    def __init__(self, model_path: str, dtype: str = "fp32", device: str = "cpu",
                 layers: tuple[int, int] | None = None, threads: int | None = None,
                 kernels: dict | None = None):
        import torch

        torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
        self.kernels = KernelOptions.from_dict(kernels or {})
        self.model, _ = load_model(model_path, dtype=dtype, device=device, options=self.kernels)
        cfg = self.model.config
        if layers not in (None, (0, cfg.n_layers)):
            raise InvalidArgument("splitting a model across shards is not implemented yet; "
                                  "run one shard with every layer")
        self.device = device
        self.runner: ModelRunner | None = None

    def info(self) -> dict:
        import torch

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "device": self.device, "threads": torch.get_num_threads(),
                "load_seconds": self.model.load_seconds,
                "bf16_products": self.model.bf16_products, "kv_dtype": str(self.model.kv_dtype),
                "bf16_kernel": bf16_gemm.NAMES[bf16_gemm.kernel(self.kernels.bf16_kernel)] if self.model.bf16_products
                else None,
                "devices": [d.__dict__ for d in devices()]}

    def allocate_kv(self, num_blocks: int, block_size: int) -> int:
        """Create the KV pool the kernel sized; returns its bytes."""
        kv = KVPool(self.model.config, num_blocks, block_size, self.model.kv_dtype, self.device,
                    hugepages=self.kernels.kv_hugepages)
        self.runner = ModelRunner(self.model, kv)
        return kv.nbytes

    def execute(self, plan: StepPlan) -> StepOutput:
        return self.runner.execute(plan)

    def warm_kv(self) -> bool:
        """Fault in a little more of the KV pool (see KVPool.warm); True while some is left."""
        return self.runner.kv.warm()

    def swapped_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.runner.swapped.values())


RemoteModelShard = ray.remote(ModelShard)
