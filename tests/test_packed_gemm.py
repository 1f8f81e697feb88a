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


def test_the_loaded_model_reads_packed_weights_where_mkl_is(engine):
    model = engine.runner.model
    blocks = list(model.blocks)
    has = ["wqkv/fp32" in b.attn.packed and "w_down/fp32" in b.ffn.packed for b in blocks]
    assert all(has) if packed_gemm.available() else not any(has)
    assert ("output/fp32" in model.packed) == packed_gemm.available()
