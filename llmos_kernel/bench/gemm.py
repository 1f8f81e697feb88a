"""``llmos bench gemm``: the model's projections per step size, our kernel beside MKL's.

For each row count, every projection of every layer (and the output head) runs
once through the kernel ``model.project`` picks for that many rows, and once
through MKL's packed fp32 GEMM (the path every step took before the quantized
kernels), alternating, best of ``repeat``. A step of the model costs about this
much matrix time at that batch size.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from llmos_kernel.core import packed_gemm
from llmos_kernel.core.model import project
from llmos_kernel.core.weights import load_model, projections


def run(model_path: str, rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256),
        repeat: int = 3, progress: Callable[[str], None] = lambda m: None) -> dict:
    model, _ = load_model(model_path)
    cfg = model.config
    if not packed_gemm.available():
        raise RuntimeError("this torch has no MKL packed GEMM to compare against")
    weights = [  # (what the model reads, the attribute, the baseline's MKL-packed copy)
        (module.packed, attr,
         module.packed.get(attr + "/fp32") or packed_gemm.pack(getattr(module, attr)))
        for module, attr, _ in projections(model, cfg)]
    params = sum(ref.shape.numel() for _, _, ref in weights)
    out: dict = {"rows": list(rows), "ms": [], "ref_ms": [], "gflops": [], "ref_gflops": []}
    for m in rows:
        inputs = {k: torch.randn(m, k) for k in {ref.shape.shape[1] for _, _, ref in weights}}
        best, ref_best = float("inf"), float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            for packed, attr, ref in weights:
                project(inputs[ref.shape.shape[1]], None, packed, attr)
            middle = time.perf_counter()
            for _, _, ref in weights:
                packed_gemm.matmul(inputs[ref.shape.shape[1]], ref)
            end = time.perf_counter()
            best, ref_best = min(best, middle - start), min(ref_best, end - middle)
        flops = 2 * m * params
        out["ms"].append(best * 1e3)
        out["ref_ms"].append(ref_best * 1e3)
        out["gflops"].append(flops / best / 1e9)
        out["ref_gflops"].append(flops / ref_best / 1e9)
        progress(f"{m} rows: {best * 1e3:.1f} ms vs MKL {ref_best * 1e3:.1f} ms")
    return out
