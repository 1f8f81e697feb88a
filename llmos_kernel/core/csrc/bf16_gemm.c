/* bf16 matrix products on AMX tiles or AVX512-BF16 over panels of 32 columns (see
   bf16_gemm.py). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "vecmath.h"

#define PW 32
int dp_ok(void) { return 1; }

/* Row r of x [M][K] fp32 into xb [Mp][K] bf16 (rows M..Mp are zero). */
static inline void row_to_bf16(const float *x, uint16_t *xb, int64_t r, int64_t M, int64_t K) {
    if (r >= M) { memset(xb + r * K, 0, sizeof(uint16_t) * K); return; }
    for (int64_t k = 0; k < K; k += 32) {
        const __m512 a = _mm512_loadu_ps(x + r * K + k), b = _mm512_loadu_ps(x + r * K + k + 16);
        _mm512_storeu_si512((__m512i *)(xb + r * K + k), (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
}

/* y[RB rows][32] of one panel (its columns at y, row stride N), summing every K pair's two
   products with vdpbf16ps: y = x·W, or y += x·W with ``add``. */
static inline __attribute__((always_inline)) void dp_tile(const int RB, const uint16_t *xb,
        const uint16_t *panel, float *y, int64_t K, int64_t N, int add) {
    __m512 acc[RB][2];
    for (int r = 0; r < RB; r++) {
        acc[r][0] = add ? _mm512_loadu_ps(y + r * N) : _mm512_setzero_ps();
        acc[r][1] = add ? _mm512_loadu_ps(y + r * N + 16) : _mm512_setzero_ps();
    }
    for (int64_t c = 0; c < K / 32; c++) {
        const uint16_t *b = panel + c * 1024;
        for (int j = 0; j < 16; j++) {
            const __m512bh w0 = (__m512bh)_mm512_load_si512(b + j * 32);
            const __m512bh w1 = (__m512bh)_mm512_load_si512(b + 512 + j * 32);
            for (int r = 0; r < RB; r++) {
                const __m512bh xv = (__m512bh)_mm512_set1_epi32(
                    *(const int32_t *)(xb + r * K + c * 32 + 2 * j));
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xv, w0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xv, w1);
            }
        }
    }
    for (int r = 0; r < RB; r++) {
        _mm512_storeu_ps(y + r * N, acc[r][0]);
        _mm512_storeu_ps(y + r * N + 16, acc[r][1]);
    }
}

/* y[RB rows][32] (row stride F) = silu(x·Wg) · (x·Wu) over a gate panel and its up panel. */
static inline __attribute__((always_inline)) void dp_silu_tile(const int RB,
        const uint16_t *xb, const uint16_t *gate, const uint16_t *up, float *y, int64_t K,
        int64_t F) {
    __m512 g[RB][2], u[RB][2];
    for (int r = 0; r < RB; r++) g[r][0] = g[r][1] = u[r][0] = u[r][1] = _mm512_setzero_ps();
    for (int64_t c = 0; c < K / 32; c++) {
        const uint16_t *bg = gate + c * 1024, *bu = up + c * 1024;
        for (int j = 0; j < 16; j++) {
            const __m512bh g0 = (__m512bh)_mm512_load_si512(bg + j * 32);
            const __m512bh g1 = (__m512bh)_mm512_load_si512(bg + 512 + j * 32);
            const __m512bh u0 = (__m512bh)_mm512_load_si512(bu + j * 32);
            const __m512bh u1 = (__m512bh)_mm512_load_si512(bu + 512 + j * 32);
            for (int r = 0; r < RB; r++) {
                const __m512bh xv = (__m512bh)_mm512_set1_epi32(
                    *(const int32_t *)(xb + r * K + c * 32 + 2 * j));
                g[r][0] = _mm512_dpbf16_ps(g[r][0], xv, g0);
                g[r][1] = _mm512_dpbf16_ps(g[r][1], xv, g1);
                u[r][0] = _mm512_dpbf16_ps(u[r][0], xv, u0);
                u[r][1] = _mm512_dpbf16_ps(u[r][1], xv, u1);
            }
        }
    }
    for (int r = 0; r < RB; r++) {
        _mm512_storeu_ps(y + r * F, silu_mul16(g[r][0], u[r][0]));
        _mm512_storeu_ps(y + r * F + 16, silu_mul16(g[r][1], u[r][1]));
    }
}

#define DP(n) case n: dp_tile(n, xb + r * K, panel, y + r * N, K, N, add); break;
#define DP_SILU(n) case n: dp_silu_tile(n, xb + r * K, gate, up, y + r * F, K, F); break;
/* All M rows against one panel (or a gate/up pair), in tiles of near-equal height. */
static void dp_panel_rows(const uint16_t *xb, const uint16_t *panel, float *y, int64_t M,
                          int64_t N, int64_t K, int add) {
    const int64_t count = (M + 11) / 12;
    for (int64_t i = 0, r = 0; i < count; i++) {
        const int64_t rb = (M - r) / (count - i);
        switch (rb) { DP(12) DP(11) DP(10) DP(9) DP(8) DP(7) DP(6) DP(5) DP(4) DP(3) DP(2)
                      DP(1) default: break; }
        r += rb;
    }
}

static void dp_silu_rows(const uint16_t *xb, const uint16_t *gate, const uint16_t *up,
                         float *y, int64_t M, int64_t F, int64_t K) {
    const int64_t count = (M + 5) / 6;
    for (int64_t i = 0, r = 0; i < count; i++) {
        const int64_t rb = (M - r) / (count - i);
        switch (rb) { DP_SILU(6) DP_SILU(5) DP_SILU(4) DP_SILU(3) DP_SILU(2) DP_SILU(1)
                      default: break; }
        r += rb;
    }
}

/* amx_matmul's contract on AVX512-BF16 registers. */
void dp_matmul(const float *x, const uint16_t *tiles, float *y, int64_t M, int64_t N,
               int64_t K, int op, int threads) {
    const int64_t panels = N / PW, F = N / 2;
    uint16_t *xb = aligned_alloc(64, sizeof(uint16_t) * M * K + 64);
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < M; r++) row_to_bf16(x, xb, r, M, K);
        if (op == 2) {
            #pragma omp for schedule(static)
            for (int64_t p = 0; p < panels / 2; p++)
                dp_silu_rows(xb, tiles + p * K * PW, tiles + (p + panels / 2) * K * PW,
                             y + p * PW, M, F, K);
        } else {
            #pragma omp for schedule(static)
            for (int64_t p = 0; p < panels; p++)
                dp_panel_rows(xb, tiles + p * K * PW, y + p * PW, M, N, K, op);
        }
    }
    free(xb);
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

int amx_ok(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

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
#else
int dp_ok(void) { return 0; }
int amx_ok(void) { return 0; }
void dp_matmul(const float *x, const uint16_t *tiles, float *y, int64_t M, int64_t N,
               int64_t K, int op, int threads) { abort(); }
void amx_matmul(const float *x, const uint16_t *tiles, float *y, int64_t M, int64_t N,
                int64_t K, int op, int threads) { abort(); }
#endif
