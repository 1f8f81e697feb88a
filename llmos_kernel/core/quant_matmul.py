"""Matrix products on quantized weights as the GGUF file stores them, for steps of few rows.

One decoding sequence is a step of one row: each weight is used once, so the
step streams all of the model's fp32 weights (540 MB for the default model)
through memory, and memory bandwidth sets the speed. The default model's
projections are Q4_1 in the file (20 bytes per 32 weights, 6.4× fewer than
fp32) and its output head Q8_0 (34 bytes per 32), so for steps of up to
``MAX_ROWS`` rows the model reads those instead.

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
import os
from typing import ClassVar

import numpy as np
import torch

from llmos_kernel.core import ckernel

BLOCK = 32
MAX_ROWS = int(os.environ.get("LLMOS_QUANT_MAX_ROWS", "4"))  # larger steps use fp32 GEMM

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

/* Σ_i q[i]·x[i] + q[i+16]·x[i+16] over one block, times d: 16 partial sums in acc. */
#if defined(__AVX512F__)
typedef __m512 acc_t;
static inline acc_t acc_zero(void) { return _mm512_setzero_ps(); }
static inline acc_t block(acc_t acc, const uint8_t *q, const float *x, float d) {
    const __m512i qi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(qi, _mm512_set1_epi32(15)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(qi, 4));
    const __m512 t = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(x)));
    return _mm512_fmadd_ps(_mm512_set1_ps(d), t, acc);
}
static inline acc_t block8(acc_t acc, const int8_t *q, const float *x, float d) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16))));
    const __m512 t = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(x)));
    return _mm512_fmadd_ps(_mm512_set1_ps(d), t, acc);
}
static inline float acc_sum(acc_t acc) { return _mm512_reduce_add_ps(acc); }
#elif defined(__AVX2__) && defined(__FMA__)
typedef struct { __m256 a, b; } acc_t;
static inline acc_t acc_zero(void) { acc_t z = {_mm256_setzero_ps(), _mm256_setzero_ps()}; return z; }
static inline __m256 half(const uint8_t *q, const float *x) {
    const __m256i qi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));
    const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(qi, _mm256_set1_epi32(15)));
    const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(qi, 4));
    return _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + 16), _mm256_mul_ps(lo, _mm256_loadu_ps(x)));
}
static inline acc_t block(acc_t acc, const uint8_t *q, const float *x, float d) {
    const __m256 dv = _mm256_set1_ps(d);
    acc.a = _mm256_fmadd_ps(dv, half(q, x), acc.a);
    acc.b = _mm256_fmadd_ps(dv, half(q + 8, x + 8), acc.b);
    return acc;
}
static inline __m256 eight(const int8_t *q, const float *x) {
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
        _mm_loadl_epi64((const __m128i *)q))), _mm256_loadu_ps(x));
}
static inline acc_t block8(acc_t acc, const int8_t *q, const float *x, float d) {
    const __m256 dv = _mm256_set1_ps(d);
    acc.a = _mm256_fmadd_ps(dv, _mm256_add_ps(eight(q, x), eight(q + 16, x + 16)), acc.a);
    acc.b = _mm256_fmadd_ps(dv, _mm256_add_ps(eight(q + 8, x + 8), eight(q + 24, x + 24)), acc.b);
    return acc;
}
static inline float acc_sum(acc_t acc) {
    float v[8]; _mm256_storeu_ps(v, _mm256_add_ps(acc.a, acc.b));
    return v[0] + v[1] + v[2] + v[3] + v[4] + v[5] + v[6] + v[7];
}
#else
typedef struct { float v[16]; } acc_t;
static inline acc_t acc_zero(void) { acc_t z = {{0}}; return z; }
static inline acc_t block(acc_t acc, const uint8_t *q, const float *x, float d) {
    for (int i = 0; i < 16; i++) acc.v[i] += d * ((q[i] & 15) * x[i] + (q[i] >> 4) * x[i + 16]);
    return acc;
}
static inline acc_t block8(acc_t acc, const int8_t *q, const float *x, float d) {
    for (int i = 0; i < 16; i++) acc.v[i] += d * (q[i] * x[i] + q[i + 16] * x[i + 16]);
    return acc;
}
static inline float acc_sum(acc_t acc) {
    float s = 0.f; for (int i = 0; i < 16; i++) s += acc.v[i]; return s;
}
#endif

/* One product: y[M][N] = x[M][K] · Wᵀ, its output rows split between threads. */
typedef struct {
    const float *x, *d, *m, *xsum; const void *qs; float *y; int64_t M, N, K;
} job_t;

/* One block of kind 4 (Q4_1: 16 bytes of nibbles) or 8 (Q8_0: 32 signed bytes). */
static inline acc_t any_block(int kind, acc_t acc, const uint8_t *q, const float *x, float d) {
    return kind == 4 ? block(acc, q, x, d) : block8(acc, (const int8_t *)q, x, d);
}

/* Output rows [lo, hi), four at a time (independent FMA chains). Inlined per kind, so each
   kind gets its own loop; Q4_1 adds its mins: Σ_b m[n,b] · Σ_i x[32b+i]. */
static inline void kind_rows(int kind, const job_t *j, int64_t lo, int64_t hi) {
    const int64_t M = j->M, N = j->N, K = j->K, nb = K / 32, bytes = kind == 4 ? 16 : 32;
    const uint8_t *qs = j->qs; const float *d = j->d, *m = j->m, *x = j->x;
    float *y = j->y;
    int64_t n = lo;
    for (; n + 4 <= hi; n += 4) {
        const uint8_t *q0 = qs + n * nb * bytes;
        const float *d0 = d + n * nb;
        for (int64_t r = 0; r < M; r++) {
            const float *xr = x + r * K;
            acc_t a[4] = {acc_zero(), acc_zero(), acc_zero(), acc_zero()};
            float mc[4] = {0.f, 0.f, 0.f, 0.f};
            for (int64_t b = 0; b < nb; b++)
                for (int t = 0; t < 4; t++) {
                    a[t] = any_block(kind, a[t], q0 + (t * nb + b) * bytes, xr + b * 32,
                                     d0[t * nb + b]);
                    if (kind == 4) mc[t] += m[(n + t) * nb + b] * j->xsum[r * nb + b];
                }
            for (int t = 0; t < 4; t++) y[r * N + n + t] = acc_sum(a[t]) + mc[t];
        }
    }
    for (; n < hi; n++)
        for (int64_t r = 0; r < M; r++) {
            acc_t acc = acc_zero(); float mc = 0.f;
            for (int64_t b = 0; b < nb; b++) {
                acc = any_block(kind, acc, qs + (n * nb + b) * bytes, x + r * K + b * 32,
                                d[n * nb + b]);
                if (kind == 4) mc += m[n * nb + b] * j->xsum[r * nb + b];
            }
            y[r * N + n] = acc_sum(acc) + mc;
        }
}

static void rows(int kind, const job_t *j, int64_t lo, int64_t hi) {
    if (kind == 4) kind_rows(4, j, lo, hi); else kind_rows(8, j, lo, hi);
}

/* Output rows in chunks of 64 over OpenMP threads. The library links libgomp by its
   soname, so in a torch process it joins torch's own OpenMP runtime and thread pool
   (torch.set_num_threads applies; no second pool competes for the cores). */
static void run(int kind, const job_t *j) {
    const int64_t chunks = (j->N + 63) / 64;
    #pragma omp parallel for schedule(static) if (j->N * j->K >= (1 << 18))
    for (int64_t c = 0; c < chunks; c++)
        rows(kind, j, c * 64, c * 64 + 64 < j->N ? c * 64 + 64 : j->N);
}

/* y[M][N] = x[M][K] · Wᵀ, W in Q4_1 blocks of 32 along K. */
void q4_1_matmul(const float *x, const uint8_t *qs, const float *d, const float *m, float *y,
                 int64_t M, int64_t N, int64_t K) {
    const int64_t nb = K / 32;
    float *xsum = malloc(sizeof(float) * M * nb);
    for (int64_t r = 0; r < M; r++)
        for (int64_t b = 0; b < nb; b++) {
            float s = 0.f;
            for (int64_t i = 0; i < 32; i++) s += x[r * K + b * 32 + i];
            xsum[r * nb + b] = s;
        }
    const job_t j = {x, d, m, xsum, qs, y, M, N, K};
    run(4, &j);
    free(xsum);
}

/* y[M][N] = x[M][K] · Wᵀ, W in Q8_0 blocks of 32 along K (32 signed bytes each). */
void q8_0_matmul(const float *x, const int8_t *qs, const float *d, float *y,
                 int64_t M, int64_t N, int64_t K) {
    const job_t j = {x, d, NULL, NULL, qs, y, M, N, K};
    run(8, &j);
}
"""


def _declare(lib: ctypes.CDLL) -> None:
    lib.q4_1_matmul.restype = lib.q8_0_matmul.restype = None
    lib.q4_1_matmul.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
    lib.q8_0_matmul.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3


def _lib() -> ctypes.CDLL | None:
    return ckernel.load("quant_matmul", _SOURCE, _declare, openmp=True)


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
