"""RMSNorm and rotary embedding as one C call each, for small steps.

At a decode step of a few dozen rows these are tiny (a few hundred kilobytes),
so what they cost is torch's per-operator overhead: RMSNorm is five
operators, called twice per layer and once more at the end, rotary five.
Each function is one pass over its rows with fp32 arithmetic in the same order
as the torch code it replaces (sums are vectorized, so only their rounding can
differ). The feed-forward's ``silu(gate) * up`` is one more (two operators and
a temporary in torch), with its own vectorized exp on AVX-512 (libm's expf
stays scalar, slower than torch's; elsewhere torch keeps it).

Built on first use (see ``ckernel``); where it cannot be, ``available()`` is
False and the model keeps its torch code.
"""

from __future__ import annotations

import ctypes

import torch

from llmos_kernel.core import ckernel


def _declare(lib: ctypes.CDLL) -> None:
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.rms_norm.argtypes = [ptr, ptr, ptr, i64, i64, f32]
    lib.rope.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64]
    lib.silu_mul.argtypes = [ptr, ptr, i64, i64, i64]
    lib.silu_mul.restype = ctypes.c_int
    for fn in (lib.rms_norm, lib.rope):
        fn.restype = None


def _lib() -> ctypes.CDLL | None:
    return ckernel.load("fused_ops", _declare, openmp=True)


def available() -> bool:
    return _lib() is not None


def usable(x: torch.Tensor) -> bool:
    """Whether a tensor is one these kernels take: fp32, on the CPU, rows contiguous."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(x)
    _lib().rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1],
                    eps)
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, dim: int) -> None:
    """Rotate the first ``heads`` heads of each row of ``x`` ``[T, row]`` in place."""
    _lib().rope(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), x.shape[0], x.shape[1], heads,
                dim)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate) * up`` for ``gate_up`` ``[T, 2F]`` (gate columns first), or None where the
    kernel does not take it (no AVX-512, F not a multiple of 16): then use torch."""
    T, F = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(T, F, dtype=gate_up.dtype)
    if _lib().silu_mul(gate_up.data_ptr(), out.data_ptr(), T, F, torch.get_num_threads()) != 0:
        return None
    return out
