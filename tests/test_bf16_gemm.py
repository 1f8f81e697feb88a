"""The bf16 product kernels (AMX tiles, AVX512-BF16) against bf16-rounded operands
multiplied exactly (in float64). Each test runs on every kernel this CPU has.

Speed (not asserted here): ``llmos bench gemm --dtype bf16`` prints it beside torch's bf16.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from llmos_kernel.core import bf16_gemm, panel_gemm, quant_matmul
from llmos_kernel.core.options import KernelOptions
from tests.test_panel_gemm import _panels, _q8_0  # random Q4_1 / Q8_0 and their weights


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def _has_amx() -> bool:
    """The CPU has AMX bf16 tiles and Linux grants them to this process (5.16 and later)."""
    if not {"amx_tile", "amx_bf16", "avx512_bf16"} <= _cpu_flags():
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    sys_arch_prctl, req_xcomp_perm, xtiledata = 158, 0x1023, 18  # x86-64
    return libc.syscall(sys_arch_prctl, req_xcomp_perm, xtiledata) == 0


def _has_avx512_bf16() -> bool:
    return {"avx512bw", "avx512_bf16"} <= _cpu_flags()


# AMX tiles are Sapphire Rapids and later, AVX512-BF16 Cooper Lake and Zen 4 and later;
# elsewhere bf16 runs the whole model in torch's bf16.
HERE = (["amx"] if _has_amx() else []) + (["avx512"] if _has_avx512_bf16() else [])
needs_bf16_products = pytest.mark.skipif(not HERE, reason="this CPU has no bf16 instructions")


@pytest.fixture(params=HERE or [pytest.param("none", marks=needs_bf16_products)])
def kernel(request) -> str:
    """Each bf16 product kernel this CPU has, by the name a product (and
    ``KernelOptions.bf16_kernel``) asks for it by."""
    assert bf16_gemm.kernel(request.param) == request.param
    return request.param


def test_the_kernels_are_built_exactly_where_the_cpu_has_them():
    assert bf16_gemm.amx_available() == _has_amx()
    assert bf16_gemm.available() == bool(HERE)
    assert bf16_gemm.kernel() == (HERE[0] if HERE else "torch")


def test_a_kernel_can_be_turned_off_or_named_wrongly():
    assert bf16_gemm.kernel("torch") == "torch"
    assert not bf16_gemm.available("torch") and not bf16_gemm.amx_available("torch")
    with pytest.raises(ValueError, match="amx, avx512, torch"):
        bf16_gemm.available("tiles")
    with pytest.raises(ValueError, match="LLMOS_BF16_KERNEL='tiles': use one of amx, avx512, torch"):
        KernelOptions.from_env({"LLMOS_BF16_KERNEL": "tiles"})


def _tiles(weights: torch.Tensor) -> bf16_gemm.TileWeight:
    """The tiles of an ``[N, K]`` matrix (the loader keeps weights input-major)."""
    return bf16_gemm.TileWeight.from_weight(weights.t().contiguous())


def _bf16_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ bf16(x)·bf16(w) with every product and sum exact."""
    return x.bfloat16().double() @ w.bfloat16().double().T


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (got.double() - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_tiles_hold_the_loaders_weights_rounded_to_bf16(kind):
    _, weights = _panels(96, 576, seed=1) if kind == "Q4_1" else _q8_0(96, 576, seed=1)
    assert torch.equal(_tiles(weights).dequantize(), weights.bfloat16())
    assert bf16_gemm.TileWeight.from_weight(torch.zeros(576, 80)) is None  # N not in panels


@pytest.mark.parametrize("rows", [1, 2, 15, 16, 17, 31, 32, 33, 64, 100, 257])
def test_matches_bf16_operands_multiplied_exactly(rows, kernel):
    _, weights = _panels(160, 576, seed=rows)
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows))
    assert _close(bf16_gemm.matmul(x, _tiles(weights), kernel=kernel), _bf16_reference(x, weights))


@pytest.mark.parametrize("rows", [1, 13, 48])
def test_a_long_k(rows, kernel):
    _, weights = _q8_0(96, 1536, seed=rows)
    x = torch.randn(rows, 1536, generator=torch.Generator().manual_seed(rows))
    assert _close(bf16_gemm.matmul(x, _tiles(weights), kernel=kernel), _bf16_reference(x, weights))


def test_the_products_are_not_the_fp32_ones(kernel):
    """bf16 rounding is really applied (an fp32 product would differ from the reference)."""
    _, weights = _panels(64, 576, seed=3)
    x = torch.randn(8, 576, generator=torch.Generator().manual_seed(3))
    got = bf16_gemm.matmul(x, _tiles(weights), kernel=kernel).double()
    assert _close(got, _bf16_reference(x, weights))
    assert not _close(got, x.double() @ weights.double().T)


def test_a_rows_result_does_not_depend_on_the_rows_beside_it(kernel):
    """Bit for bit: what a request computes alone it computes in a busy batch."""
    tiles = _tiles(_panels(96, 576, seed=5)[1])
    x = torch.randn(70, 576, generator=torch.Generator().manual_seed(5))
    batch = bf16_gemm.matmul(x, tiles, kernel=kernel)
    for r in (0, 17, 69):
        assert torch.equal(bf16_gemm.matmul(x[r:r + 1], tiles, kernel=kernel)[0], batch[r])
    assert torch.equal(bf16_gemm.matmul(x[16:40], tiles, kernel=kernel), batch[16:40])


def test_refuses_the_wrong_input(kernel):
    tiles = _tiles(_panels(32, 64, seed=2)[1])
    with pytest.raises(ValueError, match="fp32"):
        bf16_gemm.matmul(torch.randn(4, 32), tiles, kernel=kernel)
    with pytest.raises(ValueError, match="fp32"):
        bf16_gemm.matmul(torch.randn(4, 64, dtype=torch.bfloat16), tiles, kernel=kernel)


def test_a_bf16_model_serves_every_projection_with_bf16_products(model_path, kernel,
                                                                 monkeypatch):
    """On the kernel its options name, for every product."""
    from llmos_kernel.core.weights import load_model, projections

    model, _ = load_model(model_path, dtype="bf16", options=KernelOptions(bf16_kernel=kernel))
    assert model.bf16_products and model.dtype == torch.float32
    assert model.kv_dtype == torch.bfloat16
    for module, attr, _ in projections(model, model.config):
        assert set(module.packed) & {attr, attr + "/panels", attr + "/bf16"} == {attr + "/bf16"}
        assert getattr(module, attr).numel() == 0  # and the fp32 copy is gone
    used = []
    for name in ("matmul", "matmul_silu"):
        real = getattr(bf16_gemm, name)
        monkeypatch.setattr(bf16_gemm, name, lambda x, w, *a, real=real, name=name, **k:
                            used.append((name, x.shape[0], k["kernel"])) or real(x, w, *a, **k))
    monkeypatch.setattr(quant_matmul, "matmul", lambda *a: pytest.fail("fp32 kernel used"))
    monkeypatch.setattr(panel_gemm, "matmul", lambda *a: pytest.fail("fp32 kernel used"))
    d = model.config.d_model
    for rows in (1, 8, 300):
        residual = torch.randn(rows, d)
        out = model.blocks[0].ffn(torch.randn(rows, d), residual=residual)
        assert out is residual  # the down projection summed into it in place
    assert used == [(name, rows, kernel) for rows in (1, 8, 300)
                    for name in ("matmul_silu", "matmul")]


@pytest.mark.parametrize("rows", [1, 17, 40])
def test_out_adds_the_products_in_place(rows, kernel):
    """The residual stream takes a projection's output without a separate add."""
    _, weights = _panels(96, 576, seed=rows)
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows))
    base = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows + 1)) * 10
    out = base.clone()
    assert bf16_gemm.matmul(x, _tiles(weights), out=out, kernel=kernel) is out
    assert _close(out, base.double() + _bf16_reference(x, weights))
    with pytest.raises(ValueError, match="adds into"):
        bf16_gemm.matmul(x, _tiles(weights), out=torch.zeros(rows, 95), kernel=kernel)


@pytest.mark.parametrize("rows", [1, 16, 33, 64])
def test_matmul_silu_is_silu_of_the_gate_times_up(rows, kernel):
    _, weights = _panels(128, 576, seed=rows)  # [gate 64; up 64]
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows))
    ref = _bf16_reference(x, weights)
    want = torch.nn.functional.silu(ref[:, :64]) * ref[:, 64:]
    got = bf16_gemm.matmul_silu(x, _tiles(weights), kernel=kernel)
    assert got.shape == (rows, 64) and _close(got, want)


@needs_bf16_products
def test_bench_gemm_times_our_bf16_products_beside_torchs(model_path):
    from llmos_kernel.bench import gemm

    out = gemm.run(str(model_path), rows=(1, 8), repeat=1, dtype="bf16")
    assert out["rows"] == [1, 8] and out["dtype"] == "bf16"
    assert all(ms > 0 for ms in out["ms"] + out["ref_ms"])
