"""``llmos bench gemm``: the model's projections per step size, our kernel beside torch's.

For each row count, every projection of every layer (and the output head) runs
once through the kernel ``model.project`` picks for that many rows, and once
through the baseline, alternating, best of ``repeat``. In fp32 the baseline is
MKL's packed fp32 GEMM (the path every step took before the quantized kernels);
with ``dtype="bf16"`` ours is the bf16 kernel (AMX tiles or AVX512-BF16, see bf16_gemm) and the baseline is
torch's own bf16 ``F.linear`` (oneDNN, on AMX where the CPU has it) on the same
bf16 weights, its input and output converted as a caller must. A step of the
model costs about this much matrix time at that batch size.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llmos_kernel.core import packed_gemm
from llmos_kernel.core.model import project
from llmos_kernel.core.options import KernelOptions
from llmos_kernel.core.weights import load_model, projections
from llmos_kernel.errors import Unavailable


def run(model_path: str, rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256),
        repeat: int = 3, dtype: str = "fp32",
        progress: Callable[[str], None] = lambda m: None) -> dict:
    model, _ = load_model(model_path, dtype=dtype, options=KernelOptions.from_env())
    # (what the model reads, the attribute, [N, K], the baseline's copy of the weight)
    if dtype == "bf16":
        if not model.bf16_products:
            raise Unavailable("bf16 products need a CPU with AMX tiles or AVX512-BF16 (and "
                              "projections in whole panels of 32 columns)")
        weights = []
        for module, attr, _ in projections(model, model.config):
            tiles = module.packed[attr + "/bf16"]
            weights.append((module.packed, attr, tiles.shape, tiles.dequantize()))

        def baseline(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return F.linear(x.bfloat16(), w).float()
    else:
        if not packed_gemm.available():
            raise Unavailable("this torch has no MKL packed GEMM to compare against")
        weights = []
        for module, attr, _ in projections(model, model.config):
            ref = module.packed.get(attr + "/fp32") or packed_gemm.pack(getattr(module, attr))
            weights.append((module.packed, attr, tuple(ref.shape.shape), ref))
        baseline = packed_gemm.matmul
    params = sum(n * k for _, _, (n, k), _ in weights)
    out: dict = {"rows": list(rows), "dtype": dtype, "ms": [], "ref_ms": [], "gflops": [],
                 "ref_gflops": []}
    for m in rows:
        inputs = {k: torch.randn(m, k) for _, _, (_, k), _ in weights}
        best, ref_best = float("inf"), float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            for packed, attr, (_, k), _ in weights:
                project(inputs[k], None, packed, attr, options=model.options)
            middle = time.perf_counter()
            for _, _, (_, k), ref in weights:
                baseline(inputs[k], ref)
            end = time.perf_counter()
            best, ref_best = min(best, middle - start), min(ref_best, end - middle)
        flops = 2 * m * params
        out["ms"].append(best * 1e3)
        out["ref_ms"].append(ref_best * 1e3)
        out["gflops"].append(flops / best / 1e9)
        out["ref_gflops"].append(flops / ref_best / 1e9)
        progress(f"{m} rows: {best * 1e3:.1f} ms vs {ref_best * 1e3:.1f} ms")
    return out
