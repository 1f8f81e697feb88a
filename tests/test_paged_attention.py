"""The C decode-attention kernel against plain torch attention on the same paged pool."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmos_kernel.core import paged_attention


def reference(q, k_cache, v_cache, tables, lens, block_size, scale):
    out = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        slots = torch.tensor([int(tables[b, t // block_size]) * block_size + t % block_size
                              for t in range(n)])
        k = k_cache[slots].transpose(0, 1)  # [kvh, n, d]
        v = v_cache[slots].transpose(0, 1)
        group = q.shape[1] // k.shape[0]
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        weights = torch.softmax((q[b].unsqueeze(1) @ k.transpose(1, 2)) * scale, dim=-1)
        out.append((weights @ v).squeeze(1))
    return torch.stack(out)


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim,block_size", [
    (9, 3, 64, 16), (9, 3, 64, 8), (9, 3, 64, 32), (8, 2, 64, 16), (4, 4, 32, 16),
    (8, 1, 16, 16)])
def test_kernel_matches_torch_attention(heads, kv_heads, dim, block_size, pool_dtype):
    """Head size 64 takes the tiled AVX-512 path (tiles of 16 keys that straddle blocks when
    blocks are 8 or 32 slots); other sizes the generic loop. A bf16 pool is read as the fp32
    values its entries stand for, so the reference is fp32 attention on those values."""
    if not paged_attention.available():
        pytest.fail("no C compiler found: the CPU decode kernel could not be built")
    gen = torch.Generator().manual_seed(heads * 100 + dim + block_size)
    blocks = 64 * 16 // block_size
    k_cache = torch.randn(blocks * block_size, kv_heads, dim, generator=gen).to(pool_dtype)
    v_cache = torch.randn(blocks * block_size, kv_heads, dim, generator=gen).to(pool_dtype)
    lens = torch.tensor([1, 15, 16, 17, 200, 333], dtype=torch.long)
    max_blocks = (int(lens.max()) + block_size - 1) // block_size
    perm = torch.randperm(blocks, generator=gen)  # blocks scattered through the pool
    tables = torch.stack([perm.roll(i)[:max_blocks] for i in range(len(lens))]).long()
    q = torch.randn(len(lens), heads, dim, generator=gen)
    scale = dim ** -0.5
    got = paged_attention.decode(q, k_cache, v_cache, tables, lens, block_size, scale)
    want = reference(q, k_cache.float(), v_cache.float(), tables, lens, block_size, scale)
    assert (got - want).abs().max().item() < 1e-5


def test_loading_the_kernel_keeps_subnormal_floats():
    """A library built with -ffast-math would set flush-to-zero for the whole process."""
    assert paged_attention.available()
    tiny = np.float32(np.finfo(np.float32).smallest_subnormal)
    assert tiny * np.float32(1.0) > 0
    assert torch.tensor(1e-40) * 1.0 != 0
