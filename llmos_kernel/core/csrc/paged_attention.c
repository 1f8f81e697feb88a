/* Decode attention straight from the paged KV pool, fp32 or bf16 (see
   paged_attention.py). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    const float *q; const void *k; const void *v; float *out;  /* k, v: fp32 or bf16 */
    const int64_t *tables; const int64_t *lens;
    int64_t max_blocks, block_size, n_kv, group, dim; float scale; int bf16;
} job_t;

/* Element i of a pool of fp32 or bf16 (a bf16 is the top half of an fp32). */
static inline float kv_at(const void *pool, int64_t i, const int bf16) {
    if (!bf16) return ((const float *)pool)[i];
    union { uint32_t u; float f; } w; w.u = (uint32_t)((const uint16_t *)pool)[i] << 16;
    return w.f;
}

typedef struct { float *scores; int64_t cap; } scratch_t;  /* one per thread, grown as needed */

/* e^x for x <= 0, to ~2e-7 relative (degree-6 Taylor on |f| <= 1/2): 2^(x log2 e) split into 2^int (exponent bits) times
   a polynomial for 2^frac, so the loop vectorizes (libm's expf does not, short of
   -ffast-math). */
static inline float exp_neg(float x) {
    x = x < -87.f ? -87.f : x;
    const float t = x * 1.44269504f, fi = floorf(t + 0.5f), f = t - fi;  /* |f| <= 1/2 */
    const float p = 1.f + f * (0.69314718f + f * (0.24022651f + f * (0.05550411f + f * (
                    0.00961813f + f * (0.00133336f + f * 0.00015404f)))));
    union { float f; int32_t i; } u; u.i = ((int32_t)fi + 127) << 23;
    return p * u.f;
}

/* One sequence: its H = KV*G query heads against its n keys. Each key row holds every KV
   head side by side (KV*D floats), so a pass over the rows reads the sequence's keys and
   values front to back, once. Inlined with D a constant where the model's head size is 64,
   so the dot products unroll. scores: [H][cap]. */
static inline void attend(const job_t *j, int64_t b, float *scores, int64_t cap,
                          const int64_t D, const int bf16) {
    const int64_t G = j->group, KV = j->n_kv, H = KV * G, BS = j->block_size, n = j->lens[b];
    const int64_t *table = j->tables + b * j->max_blocks;
    const float *q = j->q + b * H * D;
    float mx[H];
    for (int64_t i = 0; i < H; i++) mx[i] = -INFINITY;
    for (int64_t t = 0; t < n; t++) {
        const int64_t row = (table[t / BS] * BS + t % BS) * KV * D;
        for (int64_t i = 0; i < H; i++) {
            const float *qi = q + i * D; const int64_t kp = row + (i / G) * D; float s = 0.f;
            for (int64_t d = 0; d < D; d++) s += qi[d] * kv_at(j->k, kp + d, bf16);
            s *= j->scale; scores[i * cap + t] = s;
            mx[i] = s > mx[i] ? s : mx[i];
        }
    }
    for (int64_t i = 0; i < H; i++) {
        float tot = 0.f, *si = scores + i * cap; const float m = mx[i];
        for (int64_t t = 0; t < n; t++) { const float e = exp_neg(si[t] - m); si[t] = e; tot += e; }
        const float inv = 1.f / tot;
        for (int64_t t = 0; t < n; t++) si[t] *= inv;
    }
    float *o = j->out + b * H * D;
    for (int64_t i = 0; i < H * D; i++) o[i] = 0.f;
    for (int64_t t = 0; t < n; t++) {
        const int64_t row = (table[t / BS] * BS + t % BS) * KV * D;
        for (int64_t i = 0; i < H; i++) {
            const float p = scores[i * cap + t]; const int64_t vp = row + (i / G) * D;
            float *oi = o + i * D;
            for (int64_t d = 0; d < D; d++) oi[d] += p * kv_at(j->v, vp + d, bf16);
        }
    }
}

#ifdef __AVX512F__
#include <immintrin.h>

#include "vecmath.h"

#define TILE 16
/* 16 pool elements from i on, as fp32. */
static inline __m512 load16(const void *pool, int64_t i, const int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)pool + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
        _mm256_loadu_si256((const __m256i *)((const uint16_t *)pool + i))), 16));
}

/* Where key ``t`` of a sequence lies in the pool: its row (all KV heads) offset in elements. */
static inline int64_t row_of(const int64_t *table, int64_t t, int64_t BS, int64_t KV) {
    return (table[t / BS] * BS + t % BS) * KV * 64;
}

/* Head size 64, one pass over the keys in tiles of 16 (flash-decoding's online softmax):
   a tile's key rows are read once for every head, its scores live in 16-lane registers
   (one max, one vector exp per head), and its value rows are read once while every head's
   output is rescaled and accumulated. Each row holds all KV heads (KV*64 floats), so a
   tile streams its block's memory front to back. */
static inline __attribute__((always_inline)) void attend64(const job_t *j, int64_t b,
                                                          const int bf16) {
    const int64_t G = j->group, KV = j->n_kv, H = KV * G, BS = j->block_size, n = j->lens[b];
    const int64_t *table = j->tables + b * j->max_blocks;
    const float *q = j->q + b * H * 64;
    float *out = j->out + b * H * 64;
    float m[H], l[H], p[H][TILE];
    __m512 acc[H][4];
    for (int64_t i = 0; i < H; i++) {
        m[i] = -INFINITY; l[i] = 0.f;
        for (int d = 0; d < 4; d++) acc[i][d] = _mm512_setzero_ps();
    }
    const __m512 scale = _mm512_set1_ps(j->scale);
    for (int64_t t0 = 0; t0 < n; t0 += TILE) {
        const int64_t cnt = n - t0 < TILE ? n - t0 : TILE;
        int64_t rows[TILE];  /* each key's row offset in the pool */
        for (int64_t u = 0; u < cnt; u++) rows[u] = row_of(table, t0 + u, BS, KV);
        /* The next tile's rows sit in another block, often in another page: ask for them
           now, so memory works while this tile computes. */
        for (int64_t t = t0 + TILE; t < t0 + 2 * TILE && t < n; t++) {
            const int64_t size = bf16 ? 2 : 4, off = row_of(table, t, BS, KV) * size;
            for (int64_t c = 0; c < KV * 64 * size; c += 64) {
                _mm_prefetch((const char *)j->k + off + c, _MM_HINT_T0);
                _mm_prefetch((const char *)j->v + off + c, _MM_HINT_T0);
            }
        }
        for (int64_t h = 0; h < KV; h++) {
            for (int64_t u = 0; u < cnt; u++) {
                const int64_t kp = rows[u] + h * 64;
                const __m512 k0 = load16(j->k, kp, bf16), k1 = load16(j->k, kp + 16, bf16),
                             k2 = load16(j->k, kp + 32, bf16), k3 = load16(j->k, kp + 48, bf16);
                for (int64_t i = h * G; i < (h + 1) * G; i++) {
                    const float *qi = q + i * 64;
                    __m512 s = _mm512_mul_ps(_mm512_loadu_ps(qi), k0);
                    s = _mm512_fmadd_ps(_mm512_loadu_ps(qi + 16), k1, s);
                    s = _mm512_fmadd_ps(_mm512_loadu_ps(qi + 32), k2, s);
                    s = _mm512_fmadd_ps(_mm512_loadu_ps(qi + 48), k3, s);
                    p[i][u] = _mm512_reduce_add_ps(s);
                }
            }
        }
        const __mmask16 live = (__mmask16)((1u << cnt) - 1);
        for (int64_t i = 0; i < H; i++) {
            const __m512 s = _mm512_mul_ps(_mm512_mask_loadu_ps(
                _mm512_set1_ps(-INFINITY), live, p[i]), scale);
            const float top = _mm512_reduce_max_ps(s), mnew = top > m[i] ? top : m[i];
            const __m512 e = _mm512_maskz_mov_ps(live, exp_neg16(
                _mm512_sub_ps(s, _mm512_set1_ps(mnew))));
            const float corr = exp_neg(m[i] - mnew);  /* 0 on the first tile (m = -inf) */
            l[i] = l[i] * corr + _mm512_reduce_add_ps(e);
            m[i] = mnew;
            _mm512_storeu_ps(p[i], e);
            const __m512 c = _mm512_set1_ps(corr);
            for (int d = 0; d < 4; d++) acc[i][d] = _mm512_mul_ps(acc[i][d], c);
        }
        for (int64_t u = 0; u < cnt; u++) {
            for (int64_t h = 0; h < KV; h++) {
                const int64_t vp = rows[u] + h * 64;
                const __m512 v0 = load16(j->v, vp, bf16), v1 = load16(j->v, vp + 16, bf16),
                             v2 = load16(j->v, vp + 32, bf16), v3 = load16(j->v, vp + 48, bf16);
                for (int64_t i = h * G; i < (h + 1) * G; i++) {
                    const __m512 w = _mm512_set1_ps(p[i][u]);
                    acc[i][0] = _mm512_fmadd_ps(w, v0, acc[i][0]);
                    acc[i][1] = _mm512_fmadd_ps(w, v1, acc[i][1]);
                    acc[i][2] = _mm512_fmadd_ps(w, v2, acc[i][2]);
                    acc[i][3] = _mm512_fmadd_ps(w, v3, acc[i][3]);
                }
            }
        }
    }
    for (int64_t i = 0; i < H; i++) {
        const __m512 inv = _mm512_set1_ps(1.f / l[i]);
        for (int d = 0; d < 4; d++) _mm512_storeu_ps(out + i * 64 + 16 * d, _mm512_mul_ps(acc[i][d], inv));
    }
}
#endif

static void attend_seq(const job_t *j, int64_t b, scratch_t *s) {
    const int64_t n = j->lens[b];
#ifdef __AVX512F__
    if (j->dim == 64) {
        if (j->bf16) attend64(j, b, 1); else attend64(j, b, 0);
        return;
    }
#endif
    if (n > s->cap) {
        free(s->scores); s->cap = n;
        s->scores = malloc(sizeof(float) * j->n_kv * j->group * n);
    }
    if (j->bf16) attend(j, b, s->scores, s->cap, j->dim, 1);
    else if (j->dim == 64) attend(j, b, s->scores, s->cap, 64, 0);
    else attend(j, b, s->scores, s->cap, j->dim, 0);
}

/* q, out: [B, KV*G, D] fp32; k, v: [slots, KV, D], fp32 or (bf16 != 0) bf16;
   tables: [B, max_blocks]; lens: [B]. */
int paged_decode(const float *q, const void *k, const void *v, float *out,
                 const int64_t *tables, const int64_t *lens, int64_t B, int64_t max_blocks,
                 int64_t block_size, int64_t n_kv, int64_t group, int64_t dim, float scale,
                 int64_t threads, int bf16) {
    if (group > 64) return -1;
    int64_t keys = 0;  /* the work: keys read, summed over sequences */
    for (int64_t b = 0; b < B; b++) keys += lens[b] * n_kv;
    const job_t j = {q, k, v, out, tables, lens, max_blocks, block_size, n_kv, group, dim, scale,
                     bf16};
    if (threads < 2 || keys < 4096) {
        scratch_t s = {NULL, 0};
        for (int64_t b = 0; b < B; b++) attend_seq(&j, b, &s);
        free(s.scores);
        return 0;
    }
    /* Sequences of unequal length: hand them out dynamically. The library links libgomp by
       soname, so in a torch process this is torch's OpenMP thread pool. */
    #pragma omp parallel num_threads(threads)
    {
        scratch_t s = {NULL, 0};
        #pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < B; b++) attend_seq(&j, b, &s);
        free(s.scores);
    }
    return 0;
}
