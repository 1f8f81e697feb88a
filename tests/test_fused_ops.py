"""The fused RMSNorm and rotary kernels against the torch code they stand in for."""

from __future__ import annotations

import pytest
import torch

from llmos_kernel.core import fused_ops
from llmos_kernel.core.model import RMSNorm, Rotary, apply_rotary
from tests.test_panel_gemm import _has_avx512


def _need_kernels() -> None:
    if not fused_ops.available():
        pytest.fail("no C compiler found: the fused kernels could not be built")


@pytest.mark.parametrize("rows,dim", [(1, 576), (32, 576), (257, 64), (3, 17)])
def test_rms_norm_matches_torch(rows, dim):
    _need_kernels()
    gen = torch.Generator().manual_seed(rows * dim)
    x = torch.randn(rows, dim, generator=gen) * 3
    norm = RMSNorm(dim, 1e-5)
    norm.weight.data = torch.randn(dim, generator=gen)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(fused_ops.rms_norm(x, norm.weight, 1e-5), want)
    torch.testing.assert_close(norm(x), want)  # the module takes the kernel


@pytest.mark.parametrize("rows,heads,extra,dim", [(1, 12, 3, 64), (40, 12, 3, 64), (5, 2, 1, 8)])
def test_rope_in_place_matches_complex_rotation(rows, heads, extra, dim):
    _need_kernels()
    gen = torch.Generator().manual_seed(rows + heads)
    rotary = Rotary(dim, 10000.0, 4096)
    positions = torch.randint(0, 4096, (rows,), generator=gen)
    cos, sin = rotary.table(positions)
    x = torch.randn(rows, (heads + extra) * dim, generator=gen)
    pairs = torch.view_as_complex(x[:, :heads * dim].reshape(rows, heads, dim // 2, 2))
    want = torch.view_as_real(pairs * torch.complex(cos, sin)[:, None, :]).reshape(rows, -1)
    torch.testing.assert_close(  # the torch fallback turns them the same way
        apply_rotary(x[:, :heads * dim].view(rows, heads, dim), cos, sin).reshape(rows, -1), want)
    untouched = x[:, heads * dim:].clone()
    fused_ops.rope_(x, cos, sin, heads, dim)
    torch.testing.assert_close(x[:, :heads * dim], want)
    assert torch.equal(x[:, heads * dim:], untouched)  # only the first `heads` heads turn


def test_only_contiguous_fp32_cpu_tensors_are_taken():
    assert fused_ops.usable(torch.zeros(4, 8))
    assert not fused_ops.usable(torch.zeros(4, 8, dtype=torch.bfloat16))
    assert not fused_ops.usable(torch.zeros(8, 4).t())


@pytest.mark.parametrize("rows,hidden", [(1, 1536), (3, 1536), (300, 1536), (2, 16)])
def test_silu_mul_matches_torch(rows, hidden):
    """Large negative gates (where 1 + e^-g overflows a naive sigmoid), zeros and the rows the
    threads split; the model's feed-forward takes the kernel (see FeedForward)."""
    _need_kernels()
    gen = torch.Generator().manual_seed(rows + hidden)
    gate_up = torch.randn(rows, 2 * hidden, generator=gen) * 6
    gate_up[0, :4] = torch.tensor([0.0, -120.0, 120.0, -1e-20])
    gate, up = gate_up.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    got = fused_ops.silu_mul(gate_up)
    if got is None:  # no AVX-512 here: the model keeps torch's two operators
        assert not _has_avx512()
        return
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)


def test_silu_mul_declines_what_it_cannot_take():
    _need_kernels()
    assert fused_ops.silu_mul(torch.randn(2, 2 * 24)) is None  # 24 columns: not 16-wide

