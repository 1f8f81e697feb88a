"""bf16 matrix products on Intel AMX tiles.

With ``--dtype bf16`` the projections multiply bf16-rounded activations by
bf16-rounded weights and sum in fp32: the precision GPUs serve in, and what
CPUs with AMX tiles (Sapphire Rapids and later) run several times faster than
fp32 FMAs. At load each projection's fp32 weights (the loader's values) are
rounded to nearest even bf16 and laid out as the tiles read them, in panels of
32 output columns; a product then multiplies every row of the step against
each panel in turn:

    y[r, n] = Σ_k bf16(x[r, k]) · bf16(w[n, k])     (products exact, fp32 sums)

A row's result depends only on that row, never on how many others share the
step, so a request's output is the same alone or in a busy batch.

Tiles: 16 rows × 32 bf16 of ``x`` (A), 16 K-pairs × 16 columns of the panel (B),
16 × 16 fp32 sums (C); a block of 32 rows × 32 columns keeps four C tiles.
Linux hands AMX's tile state to a process only on request (``arch_prctl``),
which loading the kernel makes once.
"""

from __future__ import annotations

import ctypes

import torch

from llmos_kernel.core import ckernel
from llmos_kernel.core.quant_matmul import operands

PANEL = 32  # output columns per tile layout panel

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

""" + ckernel.EXP_NEG16 + ckernel.SILU_MUL16 + r"""

#define PW 32
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

int amx_ok(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

/* Row r of x [M][K] fp32 into xb [Mp][K] bf16 (rows M..Mp are zero). */
static inline void row_to_bf16(const float *x, uint16_t *xb, int64_t r, int64_t M, int64_t K) {
    if (r >= M) { memset(xb + r * K, 0, sizeof(uint16_t) * K); return; }
    for (int64_t k = 0; k < K; k += 32) {
        const __m512 a = _mm512_loadu_ps(x + r * K + k), b = _mm512_loadu_ps(x + r * K + k + 16);
        _mm512_storeu_si512((__m512i *)(xb + r * K + k), (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
}

typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16];
                 uint8_t rows[16]; } tilecfg;

static void configure(void) {
    tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
}

/* C tiles 0-3: rows [r, r+16) × B block 0, [r, r+16) × block 1, [r+16, r+32) × block 0,
   [r+16, r+32) × block 1, where a B block is 16 columns (a panel's half); A tiles 4, 5 hold
   the two row halves, B tiles 6, 7 the two blocks. */
#define STORE(t, p, stride) _tile_stored(t, p, stride)
#define LOAD(t, p, stride) _tile_loadd(t, p, stride)
#define EACH_C(op, ...) do { switch (tile) { case 0: op(0, __VA_ARGS__); break; \
    case 1: op(1, __VA_ARGS__); break; case 2: op(2, __VA_ARGS__); break; \
    default: op(3, __VA_ARGS__); } } while (0)

/* C tile ``tile`` into y (row stride N floats), its first ``valid`` rows. */
static inline void store_c(int tile, float *y, int64_t N, int64_t valid, float *scratch) {
    if (valid >= 16) { EACH_C(STORE, y, N * 4); return; }
    EACH_C(STORE, scratch, 64);
    for (int64_t r = 0; r < valid; r++) memcpy(y + r * N, scratch + r * 16, 64);
}

/* C tile ``tile`` from y (its first ``valid`` rows; the rest zero), to add the products to. */
static inline void load_c(int tile, const float *y, int64_t N, int64_t valid, float *scratch) {
    if (valid >= 16) { EACH_C(LOAD, y, N * 4); return; }
    memset(scratch, 0, 1024);
    for (int64_t r = 0; r < valid; r++) memcpy(scratch + r * 16, y + r * N, 64);
    EACH_C(LOAD, scratch, 64);
}

/* The K sums of rows [r, r+16·halves) against B blocks b0 and b1 (chunk c of a block at
   c·1024), into C tiles 0, 1 (and 2, 3 for the second row half), already initialised. */
static inline void dot(const uint16_t *xb, int64_t r, int halves, const uint16_t *b0,
                       const uint16_t *b1, int64_t K) {
    const int64_t lda = K * 2;
    for (int64_t c = 0; c < K / 32; c++) {
        _tile_loadd(4, xb + r * K + c * 32, lda);
        _tile_loadd(6, b0 + c * 1024, 64);
        _tile_loadd(7, b1 + c * 1024, 64);
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
        if (halves == 2) {
            _tile_loadd(5, xb + (r + 16) * K + c * 32, lda);
            _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
        }
    }
}

/* One panel (32 columns at y) for every row: y = x·W, or y += x·W with ``add``. */
static void panel_rows(const uint16_t *xb, const uint16_t *panel, float *y, int64_t M,
                       int64_t Mp, int64_t N, int64_t K, int add, float *scratch) {
    for (int64_t r = 0; r < Mp; r += 32) {
        const int halves = r + 32 <= Mp ? 2 : 1;
        for (int t = 0; t < 2 * halves; t++) {
            float *yt = y + (r + 16 * (t / 2)) * N + 16 * (t % 2);
            const int64_t valid = M - r - 16 * (t / 2);
            if (add) load_c(t, yt, N, valid, scratch);
            else if (t == 0) _tile_zero(0); else if (t == 1) _tile_zero(1);
            else if (t == 2) _tile_zero(2); else _tile_zero(3);
        }
        dot(xb, r, halves, panel, panel + 512, K);
        for (int t = 0; t < 2 * halves; t++) {
            const int64_t valid = M - r - 16 * (t / 2);
            if (valid > 0) store_c(t, y + (r + 16 * (t / 2)) * N + 16 * (t % 2), N, valid, scratch);
        }
    }
}

/* Panel p of the gate and of the up projection (32 columns of the F at y, row stride F):
   y = silu(x·Wg) · (x·Wu), block by block of 16 columns. */
static void silu_panel_rows(const uint16_t *xb, const uint16_t *gate, const uint16_t *up,
                            float *y, int64_t M, int64_t Mp, int64_t F, int64_t K,
                            float *scratch) {
    for (int64_t r = 0; r < Mp; r += 32) {
        const int halves = r + 32 <= Mp ? 2 : 1;
        for (int h = 0; h < 2; h++) {
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            dot(xb, r, halves, gate + h * 512, up + h * 512, K);
            for (int half = 0; half < halves; half++) {
                const int64_t valid = M - r - 16 * half < 16 ? M - r - 16 * half : 16;
                if (half == 0) { _tile_stored(0, scratch, 64); _tile_stored(1, scratch + 256, 64); }
                else { _tile_stored(2, scratch, 64); _tile_stored(3, scratch + 256, 64); }
                for (int64_t i = 0; i < valid; i++)
                    _mm512_storeu_ps(y + (r + 16 * half + i) * F + h * 16, silu_mul16(
                        _mm512_load_ps(scratch + i * 16), _mm512_load_ps(scratch + 256 + i * 16)));
            }
        }
    }
}

/* y[M][N] = bf16(x)[M][K] · Wᵀ (W as TileWeight lays it out; op 1: y += that instead), or
   with op 2 y[M][N/2] = silu(x·Wgᵀ) · (x·Wuᵀ) for W = [Wg; Wu] (the gate's N/2 rows first). */
void amx_matmul(const float *x, const uint16_t *tiles, float *y, int64_t M, int64_t N,
                int64_t K, int op, int threads) {
    const int64_t Mp = (M + 15) / 16 * 16, panels = N / PW, F = N / 2;
    uint16_t *xb = aligned_alloc(64, sizeof(uint16_t) * Mp * K);
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < Mp; r++) row_to_bf16(x, xb, r, M, K);
        float *scratch = aligned_alloc(64, sizeof(float) * 512);
        configure();
        if (op == 2) {
            #pragma omp for schedule(static)
            for (int64_t p = 0; p < panels / 2; p++)
                silu_panel_rows(xb, tiles + p * K * PW, tiles + (p + panels / 2) * K * PW,
                                y + p * PW, M, Mp, F, K, scratch);
        } else {
            #pragma omp for schedule(static)
            for (int64_t p = 0; p < panels; p++)
                panel_rows(xb, tiles + p * K * PW, y + p * PW, M, Mp, N, K, op, scratch);
        }
        _tile_release();
        free(scratch);
    }
    free(xb);
}
#else
int amx_ok(void) { return 0; }
void amx_matmul(const float *x, const uint16_t *tiles, float *y, int64_t M, int64_t N,
                int64_t K, int op, int threads) { abort(); }
#endif
"""


def _declare(lib: ctypes.CDLL) -> None:
    lib.amx_ok.restype = ctypes.c_int
    lib.amx_matmul.restype = None
    lib.amx_matmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2


_usable: ctypes.CDLL | None | bool = False  # False: not yet looked for


def _lib() -> ctypes.CDLL | None:
    """The kernel, once this process may use AMX tiles (asked of Linux on first use)."""
    global _usable
    if _usable is False:
        lib = ckernel.load("amx_gemm", _SOURCE, _declare, openmp=True)
        _usable = lib if lib is not None and lib.amx_ok() else None
    return _usable


def available() -> bool:
    """Whether this CPU has AMX bf16 tiles and the OS lets this process use them."""
    return _lib() is not None


class TileWeight:
    """An ``[N, K]`` matrix as bf16 B tiles, per panel of 32 columns: for each 32-K chunk
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


def matmul(x: torch.Tensor, w: TileWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """``bf16(x) [M, K] @ Wᵀ`` summed in fp32 → ``[M, N]`` (fp32); with ``out`` (fp32
    ``[M, N]``, contiguous) the products are added to it in place, and it is returned."""
    x, y = operands(x, w.shape, "AMX matmul")
    n, k = w.shape
    if out is not None:
        if out.dtype != torch.float32 or out.shape != y.shape or not out.is_contiguous():
            raise ValueError(f"AMX matmul adds into fp32 {tuple(y.shape)}, contiguous; got "
                             f"{out.dtype} {tuple(out.shape)}")
        y = out
    _lib().amx_matmul(x.data_ptr(), w.tiles.data_ptr(), y.data_ptr(), x.shape[0], n, k,
                      0 if out is None else 1, torch.get_num_threads())
    return y


def matmul_silu(x: torch.Tensor, w: TileWeight) -> torch.Tensor:
    """``silu(x @ Wgᵀ) * (x @ Wuᵀ)`` → ``[M, N/2]`` for W = [Wg; Wu] (``N/2`` a multiple of
    32): the feed-forward's gate and up projections and what follows them in one pass, so
    the ``[M, N]`` intermediate never goes through memory (silu as fused_ops computes it)."""
    x, _ = operands(x, (0, w.shape[1]), "AMX matmul")
    n, k = w.shape
    if n % (2 * PANEL):
        raise ValueError(f"matmul_silu needs [gate; up] rows in whole panels, got {n}")
    y = torch.empty(x.shape[0], n // 2)
    _lib().amx_matmul(x.data_ptr(), w.tiles.data_ptr(), y.data_ptr(), x.shape[0], n, k, 2,
                      torch.get_num_threads())
    return y
