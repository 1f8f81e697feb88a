"""MKL's packed-weight GEMM against torch's plain matmul, and the loaded model using it."""

from __future__ import annotations

import pytest
import torch

from llmos_kernel.core import packed_gemm


@pytest.mark.parametrize("rows", [1, 3, 5, 17, 32, 64, 257])
@pytest.mark.parametrize("k,n", [(576, 960), (1536, 576), (64, 7)])
def test_packed_product_matches_matmul_for_any_row_count(rows, k, n):
    gen = torch.Generator().manual_seed(rows * 1000 + k + n)
    weight = torch.randn(k, n, generator=gen)
    x = torch.randn(rows, k, generator=gen)
    packed = packed_gemm.pack(weight)
    if not packed_gemm.available():
        assert packed is None
        return
    assert packed is not None
    out = packed_gemm.matmul(x, packed)
    assert out.shape == (rows, n) and out.dtype == torch.float32
    torch.testing.assert_close(out, x @ weight, rtol=1e-5, atol=1e-4)
    strided = torch.randn(k, rows * 2, generator=gen).t()[::2]  # not contiguous
    torch.testing.assert_close(packed_gemm.matmul(strided, packed), strided @ weight,
                               rtol=1e-5, atol=1e-4)


def test_only_fp32_cpu_weights_are_packed():
    assert packed_gemm.pack(torch.randn(64, 8, dtype=torch.bfloat16)) is None
    assert packed_gemm.pack(torch.randn(64, 8, dtype=torch.float64)) is None


def _fp32_packing(model) -> list[tuple[bool, bool]]:
    """(has panels, has an MKL-packed copy) per projection of a loaded model."""
    from llmos_kernel.core.weights import projections

    return [(attr + "/panels" in module.packed, attr + "/fp32" in module.packed)
            for module, attr, _ in projections(model, model.config)]


def test_the_loaded_model_packs_for_mkl_only_what_panels_do_not_serve(engine):
    from llmos_kernel.core import panel_gemm

    model = engine.runner.model
    for panels, fp32 in _fp32_packing(model):
        assert fp32 == (packed_gemm.available() and not panels)
    if panel_gemm.available():  # the default model: Q4_1 and Q8_0 everywhere
        assert all(panels for panels, _ in _fp32_packing(model))
        assert model.blocks[0].ffn.w_down.numel() > 0  # the fp32 weight stays for fallbacks


def test_without_panels_every_projection_is_packed_for_mkl(model_path):
    from llmos_kernel.core.options import KernelOptions
    from llmos_kernel.core.weights import load_model

    model, _ = load_model(model_path, options=KernelOptions(panels=False))
    assert all(fp32 == packed_gemm.available() and not panels
               for panels, fp32 in _fp32_packing(model))
