"""Matrix products on quantized weights as the GGUF file stores them, for steps of few rows.

One decoding sequence is a step of one row: each weight is used once, so the
step streams all of the model's fp32 weights (540 MB for the default model)
through memory, and memory bandwidth sets the speed. The default model's
projections are Q4_1 in the file (20 bytes per 32 weights, 6.4× fewer than
fp32) and its output head Q8_0 (34 bytes per 32), so for steps of up to
``KernelOptions.quant_max_rows`` rows the model reads those instead.

The values are exactly the file's (the ones the fp32 path dequantizes to:
``w = d·q + m`` with fp16 ``d``, ``m`` widened to fp32; Q8_0 has no ``m``) and the
arithmetic is fp32, so results differ from ``x @ W`` only by summation order:

    y[r, n] = Σ_b d[n,b] · Σ_i q[n,b,i] · x[r, 32b+i]  +  Σ_b m[n,b] · Σ_i x[r, 32b+i]

A Q4_1 block's 32 values are 16 bytes: byte ``i`` holds value ``i`` in its low
nibble and value ``i + 16`` in its high nibble (GGUF's layout, kept as is); a
Q8_0 block's are 32 signed bytes.
"""

from __future__ import annotations

import ctypes
from typing import ClassVar

import numpy as np
import torch

from llmos_kernel.core import ckernel

BLOCK = 32


def _declare(lib: ctypes.CDLL) -> None:
    lib.q4_1_matmul.restype = lib.q8_0_matmul.restype = None
    lib.q4_1_matmul.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
    lib.q8_0_matmul.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3


def _lib() -> ctypes.CDLL | None:
    return ckernel.load("quant_matmul", _declare, openmp=True)


def available() -> bool:
    return _lib() is not None


class QuantWeight:
    """An ``[N, K]`` matrix in GGUF blocks of 32 along K: Q4_1 (nibbles ``[N, K/32, 16]``,
    scales and mins) or Q8_0 (bytes ``[N, K/32, 32]``, scales); scales fp32 ``[N, K/32]``."""

    KINDS: ClassVar[dict[str, int]] = {"Q4_1": 20, "Q8_0": 34}  # bytes per block in the file

    def __init__(self, kind: str, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None):
        self.kind, self.qs, self.d, self.m = kind, qs, d, m
        self.shape = (qs.shape[0], qs.shape[1] * BLOCK)

    @classmethod
    def from_gguf(cls, kind: str, raw: np.ndarray, n: int, k: int) -> QuantWeight:
        """From a GGUF tensor's bytes (``n`` rows of ``k`` values)."""
        if kind not in cls.KINDS:
            raise ValueError(f"no kernel for {kind} weights (have {', '.join(cls.KINDS)})")
        blocks = np.ascontiguousarray(raw).reshape(n, k // BLOCK, cls.KINDS[kind])

        def half(lo: int) -> torch.Tensor:
            return torch.from_numpy(
                blocks[..., lo:lo + 2].copy().view(np.float16)[..., 0].astype(np.float32))

        if kind == "Q4_1":
            return cls(kind, torch.from_numpy(np.ascontiguousarray(blocks[..., 4:])), half(0),
                       half(2))
        return cls(kind, torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8)),
                   half(0), None)

    @classmethod
    def cat(cls, parts: list[QuantWeight]) -> QuantWeight:
        """Rows of several matrices one after another (fused projections)."""
        if len({p.kind for p in parts}) != 1:
            raise ValueError("fused rows must share one kind")
        m = None if parts[0].m is None else torch.cat([p.m for p in parts])
        return cls(parts[0].kind, torch.cat([p.qs for p in parts]),
                   torch.cat([p.d for p in parts]), m)

    def dequantize(self) -> torch.Tensor:
        if self.kind == "Q4_1":
            q = torch.cat([(self.qs & 15).float(), (self.qs >> 4).float()], dim=-1)
            return (q * self.d[..., None] + self.m[..., None]).reshape(self.shape)
        return (self.qs.float() * self.d[..., None]).reshape(self.shape)


def operands(x: torch.Tensor, shape: tuple[int, int], what: str
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``x @ Wᵀ`` with W of ``shape`` [N, K]: ``x`` checked to be fp32 [M, K] and made
    contiguous, and an empty [M, N] result."""
    n, k = shape
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[-1] != k:
        raise ValueError(f"{what} takes fp32 [M, {k}], got {x.dtype} {tuple(x.shape)}")
    return x.contiguous(), torch.empty(x.shape[0], n)


def matmul(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """``x [M, K] @ Wᵀ`` → ``[M, N]`` (fp32)."""
    x, y = operands(x, w.shape, "quantized matmul")
    n, k = w.shape
    if w.kind == "Q4_1":
        _lib().q4_1_matmul(x.data_ptr(), w.qs.data_ptr(), w.d.data_ptr(), w.m.data_ptr(),
                           y.data_ptr(), x.shape[0], n, k)
    else:
        _lib().q8_0_matmul(x.data_ptr(), w.qs.data_ptr(), w.d.data_ptr(), y.data_ptr(),
                           x.shape[0], n, k)
    return y
