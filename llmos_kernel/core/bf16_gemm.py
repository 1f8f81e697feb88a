"""bf16 matrix products: AMX tiles where the CPU has them, else AVX512-BF16 dot products.

With ``--dtype bf16`` the projections multiply bf16-rounded activations by
bf16-rounded weights and sum in fp32: the precision GPUs serve in, and what
CPUs with bf16 instructions run several times faster than fp32 FMAs. At load
each projection's fp32 weights (the loader's values) are rounded to nearest
even bf16 and laid out in panels of 32 output columns; a product then
multiplies every row of the step against each panel in turn:

    y[r, n] = Σ_k bf16(x[r, k]) · bf16(w[n, k])     (products exact, fp32 sums)

A row's result depends only on that row, never on how many others share the
step, so a request's output is the same alone or in a busy batch.

Two kernels read the same layout. A panel, per chunk of 32 along K and per
half of 16 columns: 16 K pairs × 16 columns × (even k, odd k), which is both an
AMX B tile and, a pair at a time, the operand of one ``vdpbf16ps``.

- **AMX tiles** (Sapphire Rapids and later): 16 rows × 32 bf16 of ``x`` (A),
  a panel's half (B), 16 × 16 fp32 sums (C); a block of 32 rows × 32 columns
  keeps four C tiles. Linux hands AMX's tile state to a process only on request
  (``arch_prctl``), which loading the kernel makes once.
- **AVX512-BF16** (Cooper Lake, Zen 4 and later): up to 12 rows × the panel's 32
  columns in 24 registers; per K pair each row's two bf16 values are broadcast
  and ``vdpbf16ps`` adds both products to each column's sum.

The two sum in different orders (tiles per 32-K chunk, registers per pair), so
their results differ in the last bits, never with the rows around them.
``KernelOptions.bf16_kernel`` (``amx``, ``avx512`` or ``torch``) picks one for a model
(torch: no bf16 products; the whole model then runs in torch's bf16); by default the
fastest one present. Every product names the kernel its model asked for.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from llmos_kernel.core import ckernel
from llmos_kernel.core.options import BF16_KERNELS, KernelOptions
from llmos_kernel.core.quant_matmul import operands

PANEL = 32  # output columns per tile layout panel


def _declare(lib: ctypes.CDLL) -> None:
    for name in ("amx_matmul", "dp_matmul"):
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
    lib.amx_ok.restype = lib.dp_ok.restype = ctypes.c_int


KERNELS = BF16_KERNELS
NAMES = {"amx": "AMX tiles", "avx512": "AVX512-BF16", "torch": "torch"}


@functools.cache
def _choose(wanted: str) -> tuple[str, object]:
    """The kernel bf16 products take here for ``wanted`` (a ``KernelOptions.bf16_kernel``):
    that one if the CPU has it, "" the fastest present: AMX tiles if the CPU has them and
    Linux grants them (asked on first use), else AVX512-BF16; else torch (no bf16
    products). Looked for once per name."""
    KernelOptions(bf16_kernel=wanted)  # a name it does not know is an error
    lib = ckernel.load("bf16_gemm", _declare, openmp=True)
    if lib is not None and wanted in ("", "amx") and lib.amx_ok():
        return "amx", lib.amx_matmul
    if lib is not None and wanted in ("", "avx512") and lib.dp_ok():
        return "avx512", lib.dp_matmul
    return "torch", None


def kernel(wanted: str = "") -> str:
    """``amx``, ``avx512`` or ``torch`` (none: the CPU has no bf16 instructions, or
    ``wanted`` names torch or a kernel it lacks): what bf16 products asking for ``wanted``
    run on."""
    return _choose(wanted)[0]


def available(wanted: str = "") -> bool:
    """Whether this process has the bf16 product kernel ``wanted`` ("" any: AMX tiles or
    AVX512-BF16)."""
    return _choose(wanted)[1] is not None


def amx_available(wanted: str = "") -> bool:
    """Whether bf16 products asking for ``wanted`` run on AMX tiles (which bf16_attention
    needs too)."""
    return kernel(wanted) == "amx"


def _product(wanted: str):
    fn = _choose(wanted)[1]
    if fn is None:
        raise RuntimeError(f"no bf16 product kernel here for {wanted or 'the fastest'!r}: "
                           "check bf16_gemm.available() first")
    return fn


class TileWeight:
    """An ``[N, K]`` matrix as bf16 panels (AMX B tiles), per panel of 32 columns: for each 32-K chunk
    and column half, 16 K pairs × 16 columns × (even k, odd k). Laid out once at load from
    the loader's fp32 weights (2 bytes a weight)."""

    def __init__(self, tiles: torch.Tensor, shape: tuple[int, int]):
        self.tiles, self.shape = tiles, shape

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> TileWeight | None:
        """The tiles of an input-major ``[K, N]`` fp32 weight, rounded to nearest even bf16
        (``Tensor.bfloat16()``); None where N or K is not a multiple of 32."""
        k, n = weight.shape
        if n % PANEL or k % 32:
            return None
        w = weight.t().bfloat16().view(n // PANEL, 2, 16, k // 32, 16, 2)  # [p, h, j, c, pr, e]
        tiles = w.permute(0, 3, 1, 4, 2, 5).contiguous().view(torch.int16).reshape(-1)
        return cls(tiles, (n, k))

    def dequantize(self) -> torch.Tensor:
        """The bf16 weights ``[N, K]`` the tiles hold (for tests)."""
        n, k = self.shape
        t = self.tiles.view(n // PANEL, k // 32, 2, 16, 16, 2)  # panel, chunk, half, pair, col, k&1
        return t.permute(0, 2, 4, 1, 3, 5).reshape(n, k).view(torch.bfloat16)


def matmul(x: torch.Tensor, w: TileWeight, out: torch.Tensor | None = None, *,
           kernel: str = "") -> torch.Tensor:
    """``bf16(x) [M, K] @ Wᵀ`` summed in fp32 → ``[M, N]`` (fp32), on the bf16 kernel
    ``kernel`` names (see ``kernel()``); with ``out`` (fp32 ``[M, N]``, contiguous) the
    products are added to it in place, and it is returned."""
    x, y = operands(x, w.shape, "bf16 matmul")
    n, k = w.shape
    if out is not None:
        if out.dtype != torch.float32 or out.shape != y.shape or not out.is_contiguous():
            raise ValueError(f"bf16 matmul adds into fp32 {tuple(y.shape)}, contiguous; got "
                             f"{out.dtype} {tuple(out.shape)}")
        y = out
    _product(kernel)(x.data_ptr(), w.tiles.data_ptr(), y.data_ptr(), x.shape[0], n, k,
                     0 if out is None else 1, torch.get_num_threads())
    return y


def matmul_silu(x: torch.Tensor, w: TileWeight, *, kernel: str = "") -> torch.Tensor:
    """``silu(x @ Wgᵀ) * (x @ Wuᵀ)`` → ``[M, N/2]`` for W = [Wg; Wu] (``N/2`` a multiple of
    32): the feed-forward's gate and up projections and what follows them in one pass, so
    the ``[M, N]`` intermediate never goes through memory (silu as fused_ops computes it)."""
    x, _ = operands(x, (0, w.shape[1]), "bf16 matmul")
    n, k = w.shape
    if n % (2 * PANEL):
        raise ValueError(f"matmul_silu needs [gate; up] rows in whole panels, got {n}")
    y = torch.empty(x.shape[0], n // 2)
    _product(kernel)(x.data_ptr(), w.tiles.data_ptr(), y.data_ptr(), x.shape[0], n, k, 2,
                     torch.get_num_threads())
    return y
