/* Matrix products straight on GGUF Q4_1 / Q8_0 blocks, for steps of few rows (see
   quant_matmul.py). */
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
