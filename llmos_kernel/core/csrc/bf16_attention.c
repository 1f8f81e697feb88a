/* Attention from a bf16 KV pool on AMX tiles or AVX512-BF16 (see bf16_attention.py). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>

#include "vecmath.h"

#define D 64
#define BS 16
#define SEG 8  /* tiles of 16 pairs per work item */

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16];
                 uint8_t rows[16]; } tilecfg;

/* tmm0: scores (16 pairs × 16 keys, fp32); tmm1, 2: queries (16 pairs × 32 dims, bf16);
   tmm3, 4: keys as B (16 dim pairs × 16 keys × 2); tmm5: probabilities (16 pairs × 16
   keys, bf16); tmm6: values as B (8 key pairs × 16 dims × 2); tmm7: P·V (16 × 16 dims). */
static void configure(void) {
    tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    cfg.colsb[5] = 32;
    cfg.rows[6] = 8;
    _tile_loadconfig(&cfg);
}

/* scores[16 pairs][16 keys] = Q·Kᵀ of one tile of pairs (qb: 16 × 64 bf16) on AMX. */
static inline void amx_scores(const uint16_t *qb, const uint32_t *kt, float *scores) {
    _tile_loadd(3, kt, 64);
    _tile_loadd(4, kt + 256, 64);
    _tile_loadd(1, qb, 2 * D);
    _tile_loadd(2, qb + 32, 2 * D);
    _tile_zero(0);
    _tile_dpbf16ps(0, 1, 3);
    _tile_dpbf16ps(0, 2, 4);
    _tile_stored(0, scores, 64);
}

/* pv[16 pairs][16 dims] = P·V for dims 16d .. 16d + 15 (pb: 16 × 16 bf16) on AMX. */
static inline void amx_pv(const uint16_t *pb, const uint16_t *vt, int d, float *pv) {
    _tile_loadd(5, pb, 32);
    _tile_loadd(6, vt + d * 8 * 32, 64);
    _tile_zero(7);
    _tile_dpbf16ps(7, 5, 6);
    _tile_stored(7, pv, 64);
}
#define HAVE_AMX 1
#else
static inline void configure(void) {}
static inline void amx_scores(const uint16_t *qb, const uint32_t *kt, float *scores) {}
static inline void amx_pv(const uint16_t *pb, const uint16_t *vt, int d, float *pv) {}
#define _tile_release() do {} while (0)
#define HAVE_AMX 0
#endif

/* The same two products in AVX512-BF16 registers, for the tile's first n pairs only (a
   decode's 3 pairs do not pay for 16): per dim pair (keys) or key pair (values), one
   vdpbf16ps per pair, summed from zero as the tiles do. */
static inline __attribute__((always_inline)) void dp_scores_n(const int N, const uint16_t *qb,
        const uint32_t *kt, float *scores) {
    __m512 acc[N];
    for (int p = 0; p < N; p++) acc[p] = _mm512_setzero_ps();
    for (int c = 0; c < D / 2; c++) {
        const __m512bh k = (__m512bh)_mm512_load_si512(kt + 16 * c);
        for (int p = 0; p < N; p++)
            acc[p] = _mm512_dpbf16_ps(acc[p], (__m512bh)_mm512_set1_epi32(
                *(const int32_t *)(qb + p * D + 2 * c)), k);
    }
    for (int p = 0; p < N; p++) _mm512_store_ps(scores + 16 * p, acc[p]);
}

static inline __attribute__((always_inline)) void dp_pv_n(const int N, const uint16_t *pb,
        const uint16_t *vt, int d, float *pv) {
    __m512 acc[N];
    for (int p = 0; p < N; p++) acc[p] = _mm512_setzero_ps();
    for (int kk = 0; kk < BS / 2; kk++) {
        const __m512bh v = (__m512bh)_mm512_load_si512(vt + (d * 8 + kk) * 32);
        for (int p = 0; p < N; p++)
            acc[p] = _mm512_dpbf16_ps(acc[p], (__m512bh)_mm512_set1_epi32(
                *(const int32_t *)(pb + 16 * p + 2 * kk)), v);
    }
    for (int p = 0; p < N; p++) _mm512_store_ps(pv + 16 * p, acc[p]);
}

#define CASES(F, ...) switch (n) { case 1: F(1, __VA_ARGS__); break; case 2: F(2, __VA_ARGS__); break; \
    case 3: F(3, __VA_ARGS__); break; case 4: F(4, __VA_ARGS__); break; case 5: F(5, __VA_ARGS__); break; \
    case 6: F(6, __VA_ARGS__); break; case 7: F(7, __VA_ARGS__); break; case 8: F(8, __VA_ARGS__); break; \
    case 9: F(9, __VA_ARGS__); break; case 10: F(10, __VA_ARGS__); break; case 11: F(11, __VA_ARGS__); break; \
    case 12: F(12, __VA_ARGS__); break; case 13: F(13, __VA_ARGS__); break; case 14: F(14, __VA_ARGS__); break; \
    case 15: F(15, __VA_ARGS__); break; default: F(16, __VA_ARGS__); }
static void dp_scores(const uint16_t *qb, const uint32_t *kt, float *scores, int n) {
    CASES(dp_scores_n, qb, kt, scores)
}
static void dp_pv(const uint16_t *pb, const uint16_t *vt, int d, float *pv, int n) {
    CASES(dp_pv_n, pb, vt, d, pv)
}

/* The 16 keys of one block, one head, as two B tiles: kt[c][i][j] holds key j's dims
   32c + 2i, 32c + 2i + 1 (a 16 × 16 transpose of 32-bit pairs per 32 dims). */
static inline void keys_as_b(const uint16_t *k, int64_t stride, uint32_t *kt) {
    for (int c = 0; c < 2; c++) {
        __m512i r[16], t[16];
        for (int j = 0; j < 16; j++) r[j] = _mm512_loadu_si512(k + j * stride + 32 * c);
        for (int j = 0; j < 16; j += 2) {
            t[j] = _mm512_unpacklo_epi32(r[j], r[j + 1]);
            t[j + 1] = _mm512_unpackhi_epi32(r[j], r[j + 1]);
        }
        for (int j = 0; j < 16; j += 4) {
            r[j] = _mm512_unpacklo_epi64(t[j], t[j + 2]);
            r[j + 1] = _mm512_unpackhi_epi64(t[j], t[j + 2]);
            r[j + 2] = _mm512_unpacklo_epi64(t[j + 1], t[j + 3]);
            r[j + 3] = _mm512_unpackhi_epi64(t[j + 1], t[j + 3]);
        }
        /* r[4a + b] now holds, per 128-bit lane L, pair 4L + b of keys 4a .. 4a + 3 */
        for (int a = 0; a < 4; a++)
            for (int b = 0; b < 4; b++) t[4 * b + a] = r[4 * a + b];
        /* t[4b + a]: lane L = keys 4a..4a+3 of pair 4L + b; gather lanes across a */
        for (int b = 0; b < 4; b++) {
            const __m512i x0 = _mm512_shuffle_i32x4(t[4 * b], t[4 * b + 1], 0x88),
                          x1 = _mm512_shuffle_i32x4(t[4 * b], t[4 * b + 1], 0xdd),
                          x2 = _mm512_shuffle_i32x4(t[4 * b + 2], t[4 * b + 3], 0x88),
                          x3 = _mm512_shuffle_i32x4(t[4 * b + 2], t[4 * b + 3], 0xdd);
            /* x0: lanes [a0 L0, a0 L2, a1 L0, a1 L2]; x1: [a0 L1, a0 L3, a1 L1, a1 L3] */
            const __m512i p0 = _mm512_shuffle_i32x4(x0, x2, 0x88),  /* L0 of a0..a3 */
                          p2 = _mm512_shuffle_i32x4(x0, x2, 0xdd),  /* L2 */
                          p1 = _mm512_shuffle_i32x4(x1, x3, 0x88),  /* L1 */
                          p3 = _mm512_shuffle_i32x4(x1, x3, 0xdd);  /* L3 */
            _mm512_storeu_si512(kt + (c * 16 + b) * 16, p0);
            _mm512_storeu_si512(kt + (c * 16 + 4 + b) * 16, p1);
            _mm512_storeu_si512(kt + (c * 16 + 8 + b) * 16, p2);
            _mm512_storeu_si512(kt + (c * 16 + 12 + b) * 16, p3);
        }
    }
}

/* The 16 values of one block, one head, as four B tiles: vt[d][kk][2i + e] = value of key
   2kk + e at dim 16d + i. */
static inline void values_as_b(const uint16_t *v, int64_t stride, uint16_t *vt) {
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                        40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1,
                                        32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int kk = 0; kk < 8; kk++)
        for (int h = 0; h < 2; h++) {  /* dims 32h .. 32h + 31 */
            const __m512i a = _mm512_loadu_si512(v + (2 * kk) * stride + 32 * h),
                          b = _mm512_loadu_si512(v + (2 * kk + 1) * stride + 32 * h);
            _mm512_storeu_si512(vt + ((2 * h) * 8 + kk) * 32, _mm512_permutex2var_epi16(a, lo, b));
            _mm512_storeu_si512(vt + ((2 * h + 1) * 8 + kk) * 32, _mm512_permutex2var_epi16(a, hi, b));
        }
}

typedef struct {
    const float *q; const uint16_t *k; const uint16_t *v; float *out;
    const int64_t *groups; const int64_t *tables; int64_t width, n_kv, group; float scale;
} job_t;

/* Pairs [p0, p1) of sequence group g against KV head h. Pair p = (row p / G, query head
   h·G + p % G) of the group's rows; row r is at position first + r. */
static void attend_pairs(const job_t *j, int64_t g, int64_t h, int64_t p0, int64_t p1,
                         int amx) {
    const int64_t G = j->group, KV = j->n_kv, H = KV * G, stride = KV * D;
    const int64_t row0 = j->groups[3 * g], first = j->groups[3 * g + 2];
    const int64_t *table = j->tables + g * j->width;
    const int64_t npairs = p1 - p0, ntiles = (npairs + 15) / 16;
    uint16_t qb[SEG * 16 * D] __attribute__((aligned(64)));
    float acc[SEG * 16 * D] __attribute__((aligned(64)));
    __m512 lsum[SEG * 16];
    float m[SEG * 16], scores[256] __attribute__((aligned(64))), pv[256] __attribute__((aligned(64)));
    uint32_t kt[512] __attribute__((aligned(64)));
    uint16_t vt[4 * 8 * 32] __attribute__((aligned(64))), pb[256] __attribute__((aligned(64)));
    int64_t pos[SEG * 16];
    for (int64_t p = 0; p < ntiles * 16; p++) {
        uint16_t *dst = qb + p * D;
        m[p] = -INFINITY; lsum[p] = _mm512_setzero_ps();
        memset(acc + p * D, 0, sizeof(float) * D);
        if (p >= npairs) { memset(dst, 0, 2 * D); pos[p] = -1; continue; }
        const int64_t pair = p0 + p, row = row0 + pair / G, head = h * G + pair % G;
        pos[p] = first + pair / G;
        const float *src = j->q + (row * H + head) * D;
        for (int c = 0; c < D; c += 32)
            _mm512_storeu_si512(dst + c, (__m512i)_mm512_cvtne2ps_pbh(
                _mm512_loadu_ps(src + c + 16), _mm512_loadu_ps(src + c)));
    }
    const int64_t last = pos[npairs - 1];  /* pairs are in row order: the last is furthest */
    const __m512 scale = _mm512_set1_ps(j->scale);
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t t = 0; t * BS <= last; t++) {
        const int64_t base = (table[t] * BS * KV + h) * D;
        if ((t + 1) * BS <= last) {  /* the next block lies elsewhere: ask for it now */
            const int64_t next = (table[t + 1] * BS * KV + h) * D;
            for (int r = 0; r < BS; r++)
                for (int c = 0; c < D; c += 32) {
                    _mm_prefetch((const char *)(j->k + next + r * stride + c), _MM_HINT_T0);
                    _mm_prefetch((const char *)(j->v + next + r * stride + c), _MM_HINT_T0);
                }
        }
        keys_as_b(j->k + base, stride, kt);
        values_as_b(j->v + base, stride, vt);
        for (int64_t b = 0; b < ntiles; b++) {
            const int64_t top = 16 * b + 15 < npairs ? 16 * b + 15 : npairs - 1;
            const int n = (int)(top - 16 * b + 1);  /* the tile's pairs that are not padding */
            if (pos[top] < t * BS) continue;  /* every pair of this tile ends before */
            if (amx) amx_scores(qb + 16 * b * D, kt, scores);
            else dp_scores(qb + 16 * b * D, kt, scores, n);
            float corr[16];
            for (int i = 0; i < n; i++) {
                const int64_t p = 16 * b + i;
                if (pos[p] < t * BS) {  /* padding, or a pair whose keys end before */
                    corr[i] = 1.f;
                    _mm256_storeu_si256((__m256i *)(pb + 16 * i), _mm256_setzero_si256());
                    continue;
                }
                const __mmask16 live = _mm512_cmple_epi32_mask(
                    _mm512_add_epi32(lanes, _mm512_set1_epi32((int)(t * BS))),
                    _mm512_set1_epi32((int)pos[p]));
                const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), live,
                    _mm512_mul_ps(_mm512_load_ps(scores + 16 * i), scale));
                const float top = _mm512_reduce_max_ps(s), mnew = top > m[p] ? top : m[p];
                const __m512 e = _mm512_maskz_mov_ps(live, exp_neg16(
                    _mm512_sub_ps(s, _mm512_set1_ps(mnew))));
                const __m512 c = exp_neg16(_mm512_set1_ps(m[p] - mnew));
                corr[i] = m[p] == -INFINITY ? 0.f : _mm512_cvtss_f32(c);
                m[p] = mnew;
                lsum[p] = _mm512_add_ps(_mm512_mul_ps(lsum[p], _mm512_set1_ps(corr[i])), e);
                _mm256_storeu_si256((__m256i *)(pb + 16 * i), (__m256i)_mm512_cvtneps_pbh(e));
            }
            for (int i = n; i < 16; i++)  /* padding: zero probabilities for the tile */
                _mm256_storeu_si256((__m256i *)(pb + 16 * i), _mm256_setzero_si256());
            for (int d = 0; d < 4; d++) {
                if (amx) amx_pv(pb, vt, d, pv);
                else dp_pv(pb, vt, d, pv, n);
                for (int i = 0; i < n; i++) {
                    const int64_t p = 16 * b + i;
                    if (pos[p] < t * BS) continue;
                    float *o = acc + p * D + 16 * d;
                    _mm512_store_ps(o, _mm512_fmadd_ps(_mm512_load_ps(o),
                        _mm512_set1_ps(corr[i]), _mm512_load_ps(pv + 16 * i)));
                }
            }
        }
    }
    for (int64_t p = 0; p < npairs; p++) {
        const int64_t pair = p0 + p, row = row0 + pair / G, head = h * G + pair % G;
        const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(lsum[p]));
        float *dst = j->out + (row * H + head) * D;
        for (int c = 0; c < D; c += 16)
            _mm512_storeu_ps(dst + c, _mm512_mul_ps(_mm512_load_ps(acc + p * D + c), inv));
    }
}

/* q, out: [T, KV·G, 64] fp32; k, v: [slots, KV, 64] bf16 in blocks of 16; groups: [n, 3]
   (first row, rows, first position) of each sequence's rows; tables: [n, width]. */
int bf16_attend(const float *q, const uint16_t *k, const uint16_t *v, float *out,
                const int64_t *groups, int64_t n, const int64_t *tables, int64_t width,
                int64_t n_kv, int64_t group, float scale, int amx, int threads) {
    if (amx && !HAVE_AMX) return -2;
    int64_t items = 0;  /* work items: (group, KV head, segment of SEG·16 pairs) */
    for (int64_t g = 0; g < n; g++) items += n_kv * ((groups[3 * g + 1] * group + SEG * 16 - 1) / (SEG * 16));
    int64_t *work = malloc(sizeof(int64_t) * 3 * (items ? items : 1)), w = 0;
    for (int64_t g = 0; g < n; g++) {
        const int64_t pairs = groups[3 * g + 1] * group;
        for (int64_t s = 0; s < pairs; s += SEG * 16)
            for (int64_t h = 0; h < n_kv; h++) {
                work[3 * w] = g; work[3 * w + 1] = h; work[3 * w + 2] = s; w++;
            }
    }
    const job_t j = {q, k, v, out, groups, tables, width, n_kv, group, scale};
    #pragma omp parallel num_threads(threads)
    {
        if (amx) configure();
        #pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < items; i++) {
            const int64_t g = work[3 * i], h = work[3 * i + 1], s = work[3 * i + 2];
            const int64_t pairs = groups[3 * g + 1] * group;
            attend_pairs(&j, g, h, s, s + SEG * 16 < pairs ? s + SEG * 16 : pairs, amx);
        }
        if (amx) _tile_release();
    }
    free(work);
    return 0;
}
#else
int bf16_attend(const float *q, const uint16_t *k, const uint16_t *v, float *out,
                const int64_t *groups, int64_t n, const int64_t *tables, int64_t width,
                int64_t n_kv, int64_t group, float scale, int amx, int threads) { return -2; }
#endif
