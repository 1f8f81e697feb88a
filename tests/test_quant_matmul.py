"""The Q4_1 and Q8_0 matmul kernels against the gguf package's dequantization and torch's matmul."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from llmos_kernel.core import quant_matmul
from llmos_kernel.core.gguf_file import GGUFFile


def random_q4_1(n: int, k: int, seed: int) -> np.ndarray:
    """GGUF Q4_1 bytes for an [n, k] matrix: fp16 scale and min, 16 bytes of nibbles a block."""
    rng = np.random.default_rng(seed)
    blocks = np.zeros((n, k // 32, 20), dtype=np.uint8)
    blocks[..., 0:2] = rng.uniform(0.001, 0.1, (n, k // 32, 1)).astype(np.float16).view(np.uint8)
    blocks[..., 2:4] = rng.uniform(-0.5, 0.0, (n, k // 32, 1)).astype(np.float16).view(np.uint8)
    blocks[..., 4:] = rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8)
    return blocks.reshape(n, -1)


@pytest.mark.parametrize("n,k", [(7, 64), (96, 576), (33, 1536)])
@pytest.mark.parametrize("rows", [1, 2, 3, 5])
def test_matches_dequantize_then_matmul(n, k, rows):
    if not quant_matmul.available():
        pytest.fail("no C compiler found: the Q4_1 kernel could not be built")
    raw = random_q4_1(n, k, seed=n * k + rows)
    w = quant_matmul.QuantWeight.from_gguf("Q4_1", raw, n, k)
    reference = torch.from_numpy(
        dequantize(raw.reshape(-1), GGMLQuantizationType.Q4_1).reshape(n, k).copy())
    assert torch.equal(w.dequantize(), reference)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    got, want = quant_matmul.matmul(x, w), x @ reference.T
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def test_fused_rows_of_the_real_model(model_path):
    gguf = GGUFFile.open(model_path)
    names = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"]
    w = quant_matmul.QuantWeight.cat([quant_matmul.QuantWeight.from_gguf("Q4_1", gguf.raw(n), *gguf.tensors[n].shape)
                                for n in names])
    reference = torch.from_numpy(np.concatenate([gguf.load(n) for n in names]))
    assert torch.equal(w.dequantize(), reference)
    x = torch.randn(3, reference.shape[1], generator=torch.Generator().manual_seed(3))
    got, want = quant_matmul.matmul(x, w), x @ reference.T
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("rows", [1, 4])
def test_the_real_q8_0_output_head(model_path, rows):
    gguf = GGUFFile.open(model_path)
    name = "token_embd.weight"
    assert gguf.tensors[name].type_name == "Q8_0"
    w = quant_matmul.QuantWeight.from_gguf("Q8_0", gguf.raw(name), *gguf.tensors[name].shape)
    reference = torch.from_numpy(gguf.load(name))
    assert torch.equal(w.dequantize(), reference)
    x = torch.randn(rows, reference.shape[1], generator=torch.Generator().manual_seed(rows))
    got, want = quant_matmul.matmul(x, w), x @ reference.T
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_refuses_the_wrong_input_shape():
    w = quant_matmul.QuantWeight.from_gguf("Q4_1", random_q4_1(4, 64, seed=1), 4, 64)
    with pytest.raises(ValueError, match="fp32"):
        quant_matmul.matmul(torch.randn(1, 32), w)
