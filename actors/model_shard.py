"""ModelShard: a Ray actor holding Transformer weights and their KV pool.

It executes what the kernel decides, one step plan per call, and keeps no
request state of its own (only swapped-out KV), so the kernel can restart it
and recompute. One shard holding every layer is the default; ``layers=(a, b)``
makes it one pipeline stage, holding only those blocks (the embedding with the
first stage, the final norm and head with the last) and a KV pool of only those
layers, with the block count every stage shares. A stage before the last
answers ``execute`` with its hidden states, which the kernel passes on (as a Ray
ObjectRef, never through itself) to the next stage's ``execute``.
"""

from __future__ import annotations

import hmac
import os

import ray

from llmos_kernel import gc_pauses
from llmos_kernel.core import bf16_gemm
from llmos_kernel.core.kv_cache import KVPool
from llmos_kernel.core.options import KernelOptions
from llmos_kernel.core.weights import load_model
from llmos_kernel.engine.runner import ModelRunner, StepPlan
from llmos_kernel.errors import PermissionDenied
from llmos_kernel.memory import devices


class ModelShard:
    """Every method asks for the secret the kernel gave the shard at creation: the shard
    answers its kernel and no one else on the cluster."""

    def __init__(self, secret: str, model_path: str, dtype: str = "fp32", device: str = "cpu",
                 layers: tuple[int, int] | None = None, threads: int | None = None,
                 kernels: dict | None = None, share: int = 1):
        """``threads`` for torch's intra-op work; None: this node's cores, divided among
        the ``share`` pipeline stages placed on the node (stages that share cores and
        each use all of them would contend on every step they overlap)."""
        import torch

        gc_pauses.watch()
        torch.set_num_threads(threads or _cores(share))
        self.kernels = KernelOptions.from_dict(kernels or {})
        self.model, _ = load_model(model_path, dtype=dtype, device=device, options=self.kernels,
                                   layers=None if layers is None else tuple(layers))
        self.device = device
        self.runner: ModelRunner | None = None
        self._secret = secret
        gc_pauses.settle()  # the loaded model's objects live as long as the shard

    def _check(self, secret: object) -> None:
        if not isinstance(secret, str) or not hmac.compare_digest(secret, self._secret):
            raise PermissionDenied("a model shard answers only the kernel that started it")

    def info(self, secret: str) -> dict:
        import torch

        self._check(secret)
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "device": self.device, "layers": list(self.model.layers),
                "kv_bytes": self.runner.kv.nbytes if self.runner is not None else 0, "threads": torch.get_num_threads(),
                "load_seconds": self.model.load_seconds,
                "bf16_products": self.model.bf16_products, "kv_dtype": str(self.model.kv_dtype),
                "bf16_kernel": bf16_gemm.NAMES[bf16_gemm.kernel(self.kernels.bf16_kernel)] if self.model.bf16_products
                else None,
                "devices": [d.__dict__ for d in devices()], "gc": gc_pauses.snapshot()}

    def allocate_kv(self, secret: str, num_blocks: int, block_size: int) -> int:
        """Create the KV pool the kernel sized; returns its bytes."""
        self._check(secret)
        kv = KVPool(self.model.config, num_blocks, block_size, self.model.kv_dtype, self.device,
                    hugepages=self.kernels.kv_hugepages, layers=self.model.layers)
        self.runner = ModelRunner(self.model, kv)
        return kv.nbytes

    def execute(self, secret: str, plan: StepPlan, hidden=None):
        """One step: a ``StepOutput`` from the last stage (or a whole-model shard); from a
        stage before it, the hidden states the next stage's ``execute`` takes and an
        acknowledgement (two returns): the kernel awaits the small one, so a stage that
        dies is seen at once, not left as a lost argument the next stage waits on."""
        self._check(secret)
        out = self.runner.execute(plan, hidden)
        return out if self.model.last else (out, True)

    def share_cores(self, secret: str, share: int) -> dict:
        """Use this node's cores divided among ``share`` stages (after a stage was re-placed
        onto, or away from, this node); returns ``info``."""
        import torch

        self._check(secret)
        torch.set_num_threads(_cores(int(share)))
        return self.info(secret)

    def forget(self, secret: str) -> None:
        """Drop every sequence's lists and swapped blocks: another stage was lost, every
        sequence recomputes, and the kernel's next plans send their lists whole."""
        self._check(secret)
        self.runner.state.clear()
        self.runner.swapped.clear()

    def warm_kv(self, secret: str) -> bool:
        """Fault in a little more of the KV pool (see KVPool.warm); True while some is left."""
        self._check(secret)
        return self.runner.kv.warm()


def _cores(share: int) -> int:
    """This node's cores divided among ``share`` stages (at least one each)."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, share))


RemoteModelShard = ray.remote(ModelShard)
