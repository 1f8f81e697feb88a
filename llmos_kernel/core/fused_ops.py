"""RMSNorm and rotary embedding as one C call each, for small steps.

At a decode step of a few dozen rows these are tiny (a few hundred kilobytes),
so what they cost is torch's per-operator overhead: RMSNorm is five
operators, called 61 times a step (31 us at 32 rows; 8 us here), rotary
five (27 us; 5 us here). Each function is one pass over its rows with fp32
arithmetic in the same order as the torch code it replaces (sums are
vectorized, so only their rounding can differ). The feed-forward's
``silu(gate) * up`` is one more (two operators and a temporary in torch: 146 us
at 256 rows), with its own vectorized exp on AVX-512 (libm's expf stays scalar,
which made an earlier C loop 7x slower than torch; elsewhere torch keeps it).

Built on first use (see ``ckernel``); where it cannot be, ``available()`` is
False and the model keeps its torch code.
"""

from __future__ import annotations

import ctypes

import torch

from llmos_kernel.core import ckernel

_SOURCE = r"""
#include <math.h>
#include <stdint.h>

/* out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w */
void rms_norm(const float *x, const float *w, float *out, int64_t T, int64_t d, float eps) {
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * d; float *ot = out + t * d; float ss = 0.f;
        for (int64_t i = 0; i < d; i++) ss += xt[i] * xt[i];
        const float r = 1.f / sqrtf(ss / (float)d + eps);
        for (int64_t i = 0; i < d; i++) ot[i] = xt[i] * r * w[i];
    }
}

/* Rotate, in place, the first `heads` heads of each row of x ([T, row] floats, heads of D
   floats from the row's start) by the row's angles: pairs (2i, 2i+1) times cos + i sin. */
void rope(float *x, const float *cos_t, const float *sin_t, int64_t T, int64_t row,
          int64_t heads, int64_t D) {
    const int64_t P = D / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + t * P, *s = sin_t + t * P;
        for (int64_t h = 0; h < heads; h++) {
            float *p = x + t * row + h * D;
            for (int64_t i = 0; i < P; i++) {
                const float a = p[2 * i], b = p[2 * i + 1];
                p[2 * i] = a * c[i] - b * s[i];
                p[2 * i + 1] = a * s[i] + b * c[i];
            }
        }
    }
}

#ifdef __AVX512F__
#include <immintrin.h>

""" + ckernel.EXP_NEG16 + ckernel.SILU_MUL16 + r"""

/* out[t] = silu(g) * u for each row [g (F floats) | u (F floats)] of gu (see silu_mul16).
   Returns 0, or -1 where F is not a multiple of 16 (the caller keeps torch). */
int silu_mul(const float *gu, float *out, int64_t T, int64_t F, int64_t threads) {
    if (F % 16) return -1;
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && T * F >= 65536)
    for (int64_t t = 0; t < T; t++) {
        const float *g = gu + t * 2 * F, *u = g + F; float *o = out + t * F;
        for (int64_t i = 0; i < F; i += 16)
            _mm512_storeu_ps(o + i, silu_mul16(_mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i)));
    }
    return 0;
}
#else
int silu_mul(const float *gu, float *out, int64_t T, int64_t F, int64_t threads) {
    return -1;
}
#endif
"""


def _declare(lib: ctypes.CDLL) -> None:
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.rms_norm.argtypes = [ptr, ptr, ptr, i64, i64, f32]
    lib.rope.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64]
    lib.silu_mul.argtypes = [ptr, ptr, i64, i64, i64]
    lib.silu_mul.restype = ctypes.c_int
    for fn in (lib.rms_norm, lib.rope):
        fn.restype = None


def _lib() -> ctypes.CDLL | None:
    return ckernel.load("fused_ops", _SOURCE, _declare, openmp=True)


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
