"""The Q4_1 panel kernel against the loader's fp32 weights and torch's matmul, and the model
choosing it by step size.

Speed (not asserted here): ``python -m llmos_kernel.bench.gemm`` prints it beside MKL's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from llmos_kernel.core import panel_gemm, quant_matmul
from llmos_kernel.core.gguf_file import GGUFFile
from tests.test_quant_matmul import random_q4_1


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512f" in f.read()
    except OSError:
        return False


# The kernel is AVX-512 code; on a CPU without it the model uses MKL for these steps (the
# machine this project targets has it, so nothing below is skipped there).
needs_avx512 = pytest.mark.skipif(not _has_avx512(), reason="this CPU has no AVX-512")


def test_the_kernel_is_built_exactly_where_the_cpu_has_avx512():
    assert panel_gemm.available() == _has_avx512()


def _panels(n: int, k: int, seed: int):
    raw = random_q4_1(n, k, seed=seed)
    reference = torch.from_numpy(
        dequantize(raw.reshape(-1), GGMLQuantizationType.Q4_1).reshape(n, k).copy())
    quant = quant_matmul.QuantWeight.from_gguf("Q4_1", raw, n, k)
    return panel_gemm.PanelWeight.from_quant(quant), reference


@needs_avx512
@pytest.mark.parametrize("n,k", [(32, 32), (96, 576), (64, 1536)])
def test_panels_hold_exactly_the_loaders_weights(n, k):
    panels, reference = _panels(n, k, seed=n + k)
    assert torch.equal(panels.dequantize(), reference)


@needs_avx512
@pytest.mark.parametrize("rows", [1, 2, 5, 12, 13, 31, 32, 64, 100, 128])
def test_matches_dequantize_then_matmul(rows):
    n, k = 160, 576
    panels, reference = _panels(n, k, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    got, want = panel_gemm.matmul(x, panels), (x.double() @ reference.double().T)
    assert (got.double() - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def test_only_whole_panels_get_a_layout():
    raw = random_q4_1(48, 64, seed=1)  # 48 rows: one and a half panels
    assert panel_gemm.PanelWeight.from_quant(
        quant_matmul.QuantWeight.from_gguf("Q4_1", raw, 48, 64)) is None


def _q8_0(n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    blocks = np.zeros((n, k // 32, 34), dtype=np.uint8)
    blocks[..., 0:2] = rng.uniform(0.001, 0.1, (n, k // 32, 1)).astype(np.float16).view(np.uint8)
    blocks[..., 2:] = rng.integers(0, 256, (n, k // 32, 32), dtype=np.uint8)
    raw = blocks.reshape(n, -1)
    reference = torch.from_numpy(
        dequantize(raw.reshape(-1), GGMLQuantizationType.Q8_0).reshape(n, k).copy())
    quant = quant_matmul.QuantWeight.from_gguf("Q8_0", raw, n, k)
    return panel_gemm.PanelWeight.from_quant(quant), reference


@needs_avx512
@pytest.mark.parametrize("rows", [2, 13, 64])
def test_q8_0_panels(rows):
    panels, reference = _q8_0(96, 576, seed=rows)
    assert torch.equal(panels.dequantize(), reference)
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows))
    got, want = panel_gemm.matmul(x, panels), (x.double() @ reference.double().T)
    assert (got.double() - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def test_refuses_the_wrong_input_shape():
    panels, _ = _panels(32, 64, seed=2)
    with pytest.raises(ValueError, match="fp32"):
        panel_gemm.matmul(torch.randn(4, 32), panels)


@needs_avx512
def test_the_real_models_fused_projection(model_path):
    gguf = GGUFFile.open(model_path)
    names = [f"blk.3.ffn_{p}.weight" for p in ("gate", "up")]
    quant = quant_matmul.QuantWeight.cat([
        quant_matmul.QuantWeight.from_gguf("Q4_1", gguf.raw(n), *gguf.tensors[n].shape)
        for n in names])
    panels = panel_gemm.PanelWeight.from_quant(quant)
    reference = torch.from_numpy(np.concatenate([gguf.load(n) for n in names]))
    assert torch.equal(panels.dequantize(), reference)
    x = torch.randn(32, reference.shape[1], generator=torch.Generator().manual_seed(32))
    got, want = panel_gemm.matmul(x, panels), x.double() @ reference.double().T
    assert (got.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@needs_avx512
def test_the_loaded_model_reads_panels_for_steps_of_two_rows_or_more(model_path, monkeypatch):
    from llmos_kernel.core.weights import load_model

    model, _ = load_model(model_path)
    mlp = model.blocks[0].ffn
    assert isinstance(mlp.packed.get("w_gate_up/panels"), panel_gemm.PanelWeight)
    head = model.packed.get("output/panels")  # the tied Q8_0 embedding
    assert head is not None and head.kind == "Q8_0"
    assert torch.equal(head.dequantize(), model.packed["output"].dequantize())
    used = []
    real = panel_gemm.matmul
    monkeypatch.setattr(panel_gemm, "matmul", lambda x, w: used.append(x.shape[0]) or real(x, w))
    for rows in (1, 8, 64, 300):
        mlp(torch.randn(rows, model.config.d_model), residual=torch.zeros(rows, model.config.d_model))
    assert used == [8, 8, 64, 64, 300, 300]  # gate/up and down; one row: quant_matmul


def test_bench_gemm_measures_both_paths_on_the_real_model(model_path):
    """``llmos bench gemm`` packs its own MKL baseline (the loader no longer does where
    panels serve), and times both paths over the same projections."""
    from llmos_kernel.bench import gemm

    out = gemm.run(str(model_path), rows=(1, 8), repeat=1)
    assert out["rows"] == [1, 8]
    assert all(ms > 0 for ms in out["ms"] + out["ref_ms"])
    assert all(g > 0 for g in out["gflops"] + out["ref_gflops"])
