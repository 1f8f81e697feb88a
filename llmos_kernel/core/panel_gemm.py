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
summation order. ``llmos bench gemm`` on this machine's 2 cores (all of the
default model's projections and its head, per step): 8 rows 22.2 ms vs MKL's
41.6, 32 rows 44.6 vs 61.8, 64 rows 91.1 vs 107.4, 128 rows 162 vs 202; and
still 6–17% ahead at 192 to 512 rows (prefill chunks), where the product is
compute-bound, so every step of two or more rows takes this path.

The kernel is AVX-512; elsewhere ``available()`` is False and MKL serves.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import torch

from llmos_kernel.core import ckernel
from llmos_kernel.core.quant_matmul import QuantWeight, operands

PANEL = 32  # output columns per panel
MIN_ROWS = int(os.environ.get("LLMOS_PANEL_MIN_ROWS", "2"))  # one row: quant_matmul's kernel
MAX_ROWS = int(os.environ.get("LLMOS_PANEL_MAX_ROWS", str(1 << 16)))  # more: MKL's

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define PW 32
#define Q4_1_BYTES 640
#define Q8_0_BYTES 1088

int panels_ok(void) { return 1; }

static inline int64_t block_bytes(int kind) { return kind == 4 ? Q4_1_BYTES : Q8_0_BYTES; }

/* One Q4_1 panel (all of K) into buf[K][32]: w = q·d, then + m, each rounded (as the
   loader does). */
__attribute__((optimize("fp-contract=off")))
static void dequant_q4_1(const uint8_t *p, float *buf, int64_t K) {
    const __m512i low = _mm512_set1_epi32(15);
    for (int64_t b = 0; b < K / 32; b++, p += Q4_1_BYTES) {
        const __m512 d0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
        const __m512 d1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 32)));
        const __m512 m0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 64)));
        const __m512 m1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 96)));
        const uint8_t *q = p + 128;
        float *o = buf + b * 32 * PW;
        for (int pair = 0; pair < 16; pair++, q += 32, o += 2 * PW) {
            const __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
            const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)));
            _mm512_store_ps(o, _mm512_add_ps(_mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_and_si512(a, low)), d0), m0));
            _mm512_store_ps(o + 16, _mm512_add_ps(_mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_and_si512(c, low)), d1), m1));
            _mm512_store_ps(o + PW, _mm512_add_ps(_mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_srli_epi32(a, 4)), d0), m0));
            _mm512_store_ps(o + PW + 16, _mm512_add_ps(_mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_srli_epi32(c, 4)), d1), m1));
        }
    }
}

/* One Q8_0 panel into buf[K][32]: w = q·d. A block: 32 fp16 scales, then 32 K positions
   × 32 signed bytes (byte j of position i: column j's value at 32b + i). */
static void dequant_q8_0(const uint8_t *p, float *buf, int64_t K) {
    for (int64_t b = 0; b < K / 32; b++, p += Q8_0_BYTES) {
        const __m512 d0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
        const __m512 d1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 32)));
        const uint8_t *q = p + 64;
        float *o = buf + b * 32 * PW;
        for (int i = 0; i < 32; i++, q += 32, o += PW) {
            _mm512_store_ps(o, _mm512_mul_ps(_mm512_cvtepi32_ps(
                _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))), d0));
            _mm512_store_ps(o + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(
                _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)))), d1));
        }
    }
}

static inline void dequant(int kind, const uint8_t *p, float *buf, int64_t K) {
    if (kind == 4) dequant_q4_1(p, buf, K); else dequant_q8_0(p, buf, K);
}

/* RB rows × the panel's 32 columns over all of K, the sums in 2·RB registers. */
static inline __attribute__((always_inline)) void tile(const int RB, const float *x,
        const float *buf, float *y, int64_t K, int64_t N) {
    __m512 acc[RB][2];
    for (int r = 0; r < RB; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const __m512 w0 = _mm512_load_ps(buf + k * PW), w1 = _mm512_load_ps(buf + k * PW + 16);
        for (int r = 0; r < RB; r++) {
            const __m512 xv = _mm512_set1_ps(x[r * K + k]);
            acc[r][0] = _mm512_fmadd_ps(xv, w0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(xv, w1, acc[r][1]);
        }
    }
    for (int r = 0; r < RB; r++) {
        _mm512_storeu_ps(y + r * N, acc[r][0]);
        _mm512_storeu_ps(y + r * N + 16, acc[r][1]);
    }
}

#define TILE(n) case n: tile(n, x + r * K, buf, y + r * N, K, N); break;
/* All M rows against one dequantized panel, in tiles of near-equal height ≤ 12. */
static void tiles(const float *x, const float *buf, float *y, int64_t M, int64_t K, int64_t N) {
    const int64_t count = (M + 11) / 12;
    for (int64_t i = 0, r = 0; i < count; i++) {
        const int64_t rb = (M - r) / (count - i);
        switch (rb) { TILE(12) TILE(11) TILE(10) TILE(9) TILE(8) TILE(7) TILE(6) TILE(5)
                      TILE(4) TILE(3) TILE(2) TILE(1) default: break; }
        r += rb;
    }
}

/* y[M][N] = x[M][K] · Wᵀ, W in panels of ``kind`` 4 (Q4_1) or 8 (Q8_0); panels split
   between ``threads`` of torch's OpenMP pool (libgomp by soname; the count is passed, as
   a thread other than the one torch.set_num_threads ran on keeps OpenMP's default). */
void panel_matmul(int kind, const float *x, const uint8_t *panels, float *y, int64_t M,
                  int64_t N, int64_t K, int threads) {
    const int64_t count = N / PW, bytes = (K / 32) * block_bytes(kind);
    #pragma omp parallel num_threads(threads)
    {
        float *buf = aligned_alloc(64, sizeof(float) * K * PW);
        #pragma omp for schedule(static)
        for (int64_t p = 0; p < count; p++) {
            dequant(kind, panels + p * bytes, buf, K);
            tiles(x, buf, y + p * PW, M, K, N);
        }
        free(buf);
    }
}

/* The fp32 weights W[N][K] the panels hold (for tests). */
void panel_dequantize(int kind, const uint8_t *panels, float *w, int64_t N, int64_t K) {
    const int64_t bytes = (K / 32) * block_bytes(kind);
    float *buf = aligned_alloc(64, sizeof(float) * K * PW);
    for (int64_t p = 0; p < N / PW; p++) {
        dequant(kind, panels + p * bytes, buf, K);
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < PW; j++) w[(p * PW + j) * K + k] = buf[k * PW + j];
    }
    free(buf);
}
#else
int panels_ok(void) { return 0; }
void panel_matmul(int kind, const float *x, const uint8_t *panels, float *y, int64_t M,
                  int64_t N, int64_t K, int threads) { abort(); }
void panel_dequantize(int kind, const uint8_t *panels, float *w, int64_t N, int64_t K) {
    abort();
}
#endif
"""


def _declare(lib: ctypes.CDLL) -> None:
    lib.panels_ok.restype = ctypes.c_int
    lib.panel_matmul.restype = lib.panel_dequantize.restype = None
    lib.panel_matmul.argtypes = ([ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
                                 + [ctypes.c_int])
    lib.panel_dequantize.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2


def _lib() -> ctypes.CDLL | None:
    return ckernel.load("panel_gemm", _SOURCE, _declare, openmp=True)


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


def serves(rows: int) -> bool:
    return MIN_ROWS <= rows <= MAX_ROWS


def serves_every_step() -> bool:
    """Whether, with quant_matmul's one-row kernel, panels leave no step to another path."""
    return MIN_ROWS <= 2 and MAX_ROWS >= 1 << 16


def matmul(x: torch.Tensor, w: PanelWeight) -> torch.Tensor:
    """``x [M, K] @ Wᵀ`` → ``[M, N]`` (fp32)."""
    x, y = operands(x, w.shape, "panel matmul")
    n, k = w.shape
    _lib().panel_matmul(_KINDS[w.kind], x.data_ptr(), w.panels.data_ptr(), y.data_ptr(),
                        x.shape[0], n, k, torch.get_num_threads())
    return y
