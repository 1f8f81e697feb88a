/* Quantized products from panels of Q4_1 / Q8_0 bytes, dequantized one panel at a time
   (see panel_gemm.py). */
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
