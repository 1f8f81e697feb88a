"""Quantized projections for steps of two rows or more, read from panels of the file's
bytes.

A busy kernel's decode steps have 8 to 64 rows. MKL's fp32 GEMM then streams
the whole fp32 model (540 MB for the default) from DRAM every step; the file's
Q4_1 and Q8_0 bytes are 6.4× and 3.8× smaller and stay in the last-level cache.
So at load each such projection (and the output head) is also laid out in
panels of 32 output columns, and a product dequantizes one panel at a time into
a small fp32 buffer (a core's L2) and runs every row of the step against it
from there, 12 rows × 32 columns in registers.

A panel, per block of 32 along K: the 32 columns' fp16 scales, then

- Q4_1: their fp16 mins, then 16 pairs of K positions × 32 bytes, byte ``j`` of
  pair ``p`` holding column ``j``'s value at ``2p`` (low nibble) and ``2p + 1``
  (high nibble): 640 bytes;
- Q8_0: 32 K positions × 32 signed bytes, byte ``j`` of position ``i`` column
  ``j``'s value: 1088 bytes.

The buffer holds exactly the fp32 weights the loader dequantizes to (``d·q``,
then ``+ m`` for Q4_1, not fused), so results differ from ``x @ W`` only by
summation order. Panels stay ahead of MKL even where the product is
compute-bound (prefill chunks of hundreds of rows), so by default every step of
two or more rows takes this path (``KernelOptions.panel_min_rows`` and
``panel_max_rows`` bound it); ``llmos bench gemm`` prints both side by side.

The kernel is AVX-512; elsewhere ``available()`` is False and MKL serves.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from llmos_kernel.core import ckernel
from llmos_kernel.core.options import KernelOptions
from llmos_kernel.core.quant_matmul import QuantWeight, operands

PANEL = 32  # output columns per panel


def _declare(lib: ctypes.CDLL) -> None:
    lib.panels_ok.restype = ctypes.c_int
    lib.panel_matmul.restype = lib.panel_dequantize.restype = None
    lib.panel_matmul.argtypes = ([ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
                                 + [ctypes.c_int])
    lib.panel_dequantize.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2


def _lib() -> ctypes.CDLL | None:
    return ckernel.load("panel_gemm", _declare, openmp=True)


def available() -> bool:
    lib = _lib()
    return lib is not None and bool(lib.panels_ok())


_KINDS = {"Q4_1": 4, "Q8_0": 8}


class PanelWeight:
    """A Q4_1 or Q8_0 ``[N, K]`` matrix in panels of 32 output columns (see the module
    docstring)."""

    def __init__(self, kind: str, panels: torch.Tensor, shape: tuple[int, int]):
        self.kind, self.panels, self.shape = kind, panels, shape

    @classmethod
    def from_quant(cls, w: QuantWeight) -> PanelWeight | None:
        """The panel layout of a quantized weight; None where N or K is not a multiple of 32."""
        n, k = w.shape
        if w.kind not in _KINDS or n % PANEL or k % 32:
            return None
        blocks, panels = k // 32, n // PANEL

        def columns_last(values: np.ndarray) -> np.ndarray:  # [n, blocks, 32] -> [P, b, 32, col]
            return values.reshape(panels, PANEL, blocks, 32).transpose(0, 2, 3, 1)

        def scales(t: torch.Tensor) -> np.ndarray:  # fp32 holding fp16 values: exact round trip
            return np.ascontiguousarray(t.numpy().astype(np.float16).reshape(
                panels, PANEL, blocks).transpose(0, 2, 1)).view(np.uint8)

        qs = w.qs.numpy()
        if w.kind == "Q4_1":
            values = columns_last(np.concatenate([qs & 15, qs >> 4], axis=-1))
            nibbles = values[:, :, 0::2, :] | (values[:, :, 1::2, :] << 4)  # [P, b, 16, 32]
            parts = [scales(w.d), scales(w.m), nibbles.reshape(panels, blocks, -1)]
        else:
            parts = [scales(w.d), columns_last(qs).view(np.uint8).reshape(panels, blocks, -1)]
        layout = np.concatenate([p.astype(np.uint8, copy=False) for p in parts], axis=-1)
        return cls(w.kind, torch.from_numpy(np.ascontiguousarray(layout)), (n, k))

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        w = torch.empty(n, k)
        _lib().panel_dequantize(_KINDS[self.kind], self.panels.data_ptr(), w.data_ptr(), n, k)
        return w


def serves(rows: int, options: KernelOptions) -> bool:
    """Whether a step of ``rows`` rows reads panels (fewer: quant_matmul's kernel; more:
    MKL's)."""
    return options.panel_min_rows <= rows <= options.panel_max_rows


def serves_every_step(options: KernelOptions) -> bool:
    """Whether, with quant_matmul's one-row kernel, panels leave no step to another path."""
    return options.panel_min_rows <= 2 and options.panel_max_rows >= 1 << 16


def matmul(x: torch.Tensor, w: PanelWeight) -> torch.Tensor:
    """``x [M, K] @ Wᵀ`` → ``[M, N]`` (fp32)."""
    x, y = operands(x, w.shape, "panel matmul")
    n, k = w.shape
    _lib().panel_matmul(_KINDS[w.kind], x.data_ptr(), w.panels.data_ptr(), y.data_ptr(),
                        x.shape[0], n, k, torch.get_num_threads())
    return y
